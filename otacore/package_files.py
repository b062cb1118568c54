"""Package files on disk: hashes (computed once, cached by size+mtime) and bsdiff patches.

`PackageFiles.prepare` does the slow work (hashing, building `diff_from` patches, checking
that diff packages apply) before a catalog goes live; afterwards `download_for` is a lookup.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import bsdiff4

from .catalog import Catalog, Package
from .errors import ConfigError, ConfigIssue


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
        try:
            self._entries: dict[str, dict] = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            self._entries = {}
        self._dirty = False

    def _lookup(self, key: str, stamp: os.stat_result) -> FileDigest | None:
        entry = self._entries.get(key)
        if entry and entry.get("stamp") == [stamp.st_size, stamp.st_mtime_ns]:
            return FileDigest(entry["size"], entry["md5"], entry["sha256"], stamp.st_mtime_ns)
        return None

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

    def save(self) -> None:
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._entries, indent=1), encoding="utf-8")
        os.replace(tmp, self.path)
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
        diff package does not apply to its base image.
        """
        full: dict[str, DownloadFile] = {}
        patches: dict[tuple[str, str], DownloadFile] = {}
        issues: list[ConfigIssue] = []
        for package in catalog.packages.values():
            digest = self._cache.digest(package.file)
            if package.type == "full":
                full[package.id] = DownloadFile(package.id, package.file, digest, False, digest)
        for package in catalog.packages.values():
            if package.is_diff:
                base = catalog.full_package(package.product, package.module, package.base_version or "")
                assert base is not None  # load_catalog guarantees it
                try:
                    target = self._cache.patched_digest(base.file, package.file)
                except (ValueError, OSError) as exc:
                    issues.append(ConfigIssue(catalog.path, 0, f"packages[{package.id}].file",
                                              f"patch does not apply to {base.id} ({exc}); rebuild it with bsdiff"))
                    continue
                digest = self._cache.digest(package.file)
                full[package.id] = DownloadFile(package.id, package.file, digest, True, target)
            for old in package.diff_from:
                base = catalog.full_package(package.product, package.module, old)
                assert base is not None
                patch = self._build_patch(base, package)
                patches[(package.id, old)] = DownloadFile(
                    f"{package.id}~from~{old}", patch, self._cache.digest(patch), True, full[package.id].digest)
        self._cache.save()
        if issues:
            raise ConfigError(issues)
        self._full, self._patches = full, patches
        self._by_key = {download.key: download for download in [*full.values(), *patches.values()]}

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

    def by_key(self, key: str) -> DownloadFile | None:
        """Any prepared file by its key (admin downloads)."""
        return self._by_key.get(key)
