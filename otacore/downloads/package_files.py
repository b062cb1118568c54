"""Package files on disk: hashes (computed once, cached by size+mtime) and bsdiff patches.

`PackageFiles.prepare` does the slow work (hashing, building `diff_from` patches, checking
that diff packages apply) before a catalog goes live; afterwards `download_for` is a lookup.
A file that cannot be read is a ConfigError there, and `open_hashed` is how the server opens
one to serve it.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import stat as stat_module
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import bsdiff4

from otacore.catalog.model import Catalog, Package
from otacore.errors import ConfigError, ConfigIssue

log = logging.getLogger("ota.files")


@dataclass(frozen=True)
class FileDigest:
    size: int
    md5: str
    sha256: str
    mtime_ns: int = field(default=0, compare=False)  # of the file when it was hashed

    def sign(self, method: str) -> str:
        return self.md5 if method == "MD5" else self.sha256


@dataclass(frozen=True)
class DownloadFile:
    """The bytes one device downloads for one upgrade: an image or a patch."""

    key: str  # URL-safe identity used in download paths and job rows
    path: Path
    digest: FileDigest
    is_diff: bool
    target: FileDigest  # the image after patching (== digest for full images)

    @property
    def name(self) -> str:
        return self.path.name

    def is_current(self) -> bool:
        """Is the file on disk still the one that was hashed? Someone may have copied a new
        build over it; serving that under the old hash would hand devices a mixed image."""
        try:
            stat = self.path.stat()
        except OSError:
            return False
        return stat.st_size == self.digest.size and stat.st_mtime_ns == self.digest.mtime_ns


def open_hashed(download: DownloadFile) -> tuple[BinaryIO, os.stat_result]:
    """Open `download`'s file to serve it, if it is still the file that was hashed.

    FileNotFoundError when it is gone, changed, or replaced by something else (a directory,
    a FIFO); another OSError when it cannot be read (permissions, I/O). O_NONBLOCK: a FIFO
    put in its place must not hang open() waiting for a writer.
    """
    fd = os.open(download.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        stat = os.fstat(fd)
        if not stat_module.S_ISREG(stat.st_mode) \
                or (stat.st_size, stat.st_mtime_ns) != (download.digest.size, download.digest.mtime_ns):
            raise FileNotFoundError(errno.ENOENT, "changed since it was hashed", str(download.path))
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return handle, stat


_unreadable_logged: dict[Path, float] = {}


def log_unreadable(path: Path, error: OSError) -> None:
    """Tell the operator a served file cannot be read; once a minute per file, since every
    device asking for it would repeat the line."""
    now = time.monotonic()
    if now - _unreadable_logged.get(path, -60.0) < 60.0:
        return
    _unreadable_logged[path] = now
    log.error("cannot read %s (%s): devices get an error until the server's user can read it "
              "(check its permissions), or `otactl reload` after replacing it", path, error.strerror or error)


def hash_file(path: Path) -> tuple[str, str]:
    """(md5, sha256) of a file, in one pass, a megabyte at a time."""
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1024 * 1024):
            md5.update(chunk)
            sha256.update(chunk)
    return md5.hexdigest(), sha256.hexdigest()


class HashCache:
    """Digests keyed by file (or file pair), trusted while the file keeps its size and mtime;
    persisted as JSON in data_dir so a restart does not hash a gigabyte image again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, Any] = {}
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            entries = {}
        except (OSError, ValueError) as exc:  # a cache: start over, but say why it is slow
            log.warning("ignoring the hash cache %s (%s); files are hashed again", path, exc)
            entries = {}
        if isinstance(entries, dict):
            self._entries = entries
        self._dirty = False
        self._used: set[str] = set()  # keys looked up or added since this cache was read

    def _lookup(self, key: str, stamp: os.stat_result) -> FileDigest | None:
        self._used.add(key)
        entry = self._entries.get(key)
        if not isinstance(entry, dict) or entry.get("stamp") != [stamp.st_size, stamp.st_mtime_ns]:
            return None
        try:
            return FileDigest(int(entry["size"]), str(entry["md5"]), str(entry["sha256"]), stamp.st_mtime_ns)
        except (KeyError, TypeError, ValueError):
            return None  # an entry someone edited: hash again

    def _remember(self, key: str, stamp: os.stat_result, digest: FileDigest) -> FileDigest:
        self._entries[key] = {"stamp": [stamp.st_size, stamp.st_mtime_ns], "size": digest.size,
                              "md5": digest.md5, "sha256": digest.sha256}
        self._dirty = True
        return digest

    def digest(self, file: Path) -> FileDigest:
        stat = file.stat()
        cached = self._lookup(str(file), stat)
        if cached is not None:
            return cached
        return self._remember(str(file), stat, FileDigest(stat.st_size, *hash_file(file), stat.st_mtime_ns))

    def patched_digest(self, base: Path, patch: Path) -> FileDigest:
        """Digest of `base` patched with `patch` (bsdiff4); ValueError if it does not apply."""
        key, stat = f"{patch}+{self.digest(base).sha256}", patch.stat()
        cached = self._lookup(key, stat)
        if cached is not None:
            return dataclasses.replace(cached, mtime_ns=0)
        with tempfile.TemporaryDirectory() as tmp:
            image = Path(tmp) / "patched"
            bsdiff4.file_patch(str(base), str(image), str(patch))
            digest = FileDigest(image.stat().st_size, *hash_file(image))
        return self._remember(key, stat, digest)

    def forget_unused(self) -> None:
        """Drop the entries of files this catalog did not ask about: a package removed (and
        every earlier build of a file) would otherwise stay in the cache for good."""
        unused = self._entries.keys() - self._used
        for key in unused:
            del self._entries[key]
        self._dirty = self._dirty or bool(unused)

    def save(self) -> None:
        if not self._dirty:
            return
        tmp = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self._entries, indent=1), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as exc:  # a cache: serving does not need it
            log.warning("cannot save the hash cache %s (%s); files are hashed again at the next start",
                        self.path, exc.strerror or exc)
            return
        self._dirty = False


class PackageFiles:
    """Digests and patches for one catalog, prepared before it goes live."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.diffs_dir = data_dir / "diffs"
        self._cache = HashCache(data_dir / "file-hashes.json")
        self._full: dict[str, DownloadFile] = {}
        self._patches: dict[tuple[str, str], DownloadFile] = {}
        self._by_key: dict[str, DownloadFile] = {}

    def prepare(self, catalog: Catalog) -> None:
        """Hash every file, build missing `diff_from` patches, check diff packages apply.

        Blocking (disk and CPU): call it from a worker thread. Raises ConfigError when a
        file cannot be read, a patch cannot be built, or a diff package does not apply to
        its base image.
        """
        full: dict[str, DownloadFile] = {}
        patches: dict[tuple[str, str], DownloadFile] = {}
        issues: list[ConfigIssue] = []
        for package in catalog.packages.values():
            if package.type == "full" and (digest := self._digest(catalog, package, package.file, issues)):
                full[package.id] = DownloadFile(package.id, package.file, digest, False, digest)
        for package in catalog.packages.values():
            if package.is_diff:
                self._prepare_diff(catalog, package, full, issues)
            if package.id not in full:
                continue  # its file has an issue already
            for old in package.diff_from:
                patch = self._prepare_patch(catalog, package, old, issues)
                if patch is not None:
                    patches[(package.id, old)] = DownloadFile(
                        f"{package.id}~from~{old}", patch[0], patch[1], True, full[package.id].digest)
        if not issues:
            self._cache.forget_unused()
        self._cache.save()
        if issues:
            raise ConfigError(issues)
        self._full, self._patches = full, patches
        self._by_key = {download.key: download for download in [*full.values(), *patches.values()]}

    def _digest(self, catalog: Catalog, package: Package, path: Path, issues: list[ConfigIssue]) -> FileDigest | None:
        try:
            return self._cache.digest(path)
        except OSError as exc:  # changed since load_catalog looked, or an I/O error
            issues.append(_file_issue(catalog, package, f"{path} cannot be read ({exc.strerror or exc}); "
                                      "make it a readable file for the server's user"))
            return None

    def _prepare_diff(self, catalog: Catalog, package: Package, full: dict[str, DownloadFile],
                      issues: list[ConfigIssue]) -> None:
        base = catalog.full_package(package.product, package.module, package.base_version or "")
        assert base is not None  # load_catalog guarantees it
        if base.id not in full:
            return  # the base image has an issue already
        try:
            target = self._cache.patched_digest(base.file, package.file)
        except ValueError as exc:
            issues.append(_file_issue(catalog, package, f"patch does not apply to {base.id} ({exc}); "
                                      "rebuild it with bsdiff"))
            return
        except OSError as exc:
            issues.append(_file_issue(catalog, package, f"patch {package.file} cannot be applied to {base.id} "
                                      f"({exc.strerror or exc}); check both files are readable, or rebuild it"))
            return
        digest = self._digest(catalog, package, package.file, issues)
        if digest is not None:
            full[package.id] = DownloadFile(package.id, package.file, digest, True, target)

    def _prepare_patch(self, catalog: Catalog, package: Package, old: str,
                       issues: list[ConfigIssue]) -> tuple[Path, FileDigest] | None:
        base = catalog.full_package(package.product, package.module, old)
        assert base is not None
        try:
            patch = self._build_patch(base, package)
            return patch, self._cache.digest(patch)
        except OSError as exc:
            issues.append(ConfigIssue(catalog.path, package.line, f"packages[{package.id}].diff_from",
                                      f"cannot build the patch from {old} in {self.diffs_dir} "
                                      f"({exc.strerror or exc}); check that data_dir is writable and "
                                      f"{base.file} readable"))
            return None

    def _build_patch(self, base: Package, target: Package) -> Path:
        base_hash = self._cache.digest(base.file).sha256[:16]
        target_hash = self._cache.digest(target.file).sha256[:16]
        patch = self.diffs_dir / f"{target.id}-from-{base.version}-{base_hash}-{target_hash}.patch"
        if not patch.exists():
            self.diffs_dir.mkdir(parents=True, exist_ok=True)
            tmp = patch.with_suffix(".tmp")
            bsdiff4.file_diff(str(base.file), str(target.file), str(tmp))
            os.replace(tmp, patch)
        return patch

    def download_for(self, package: Package, from_version: str | None) -> DownloadFile:
        """The file a device on `from_version` gets for `package`: a patch when one exists."""
        if from_version is not None and (package.id, from_version) in self._patches:
            return self._patches[(package.id, from_version)]
        return self._full[package.id]

    def downloads(self) -> list[DownloadFile]:
        """Every file this catalog serves: full images and patches."""
        return list(self._by_key.values())

    def by_key(self, key: str) -> DownloadFile | None:
        """Any prepared file by its key (admin downloads)."""
        return self._by_key.get(key)


def _file_issue(catalog: Catalog, package: Package, message: str) -> ConfigIssue:
    return ConfigIssue(catalog.path, package.file_line or package.line, f"packages[{package.id}].file", message)
