"""Package files on disk: hashes (computed once, cached by size+mtime) and bsdiff patches.

`PackageFiles.prepare` does the slow work (hashing, building `diff_from` patches, checking
that diff packages apply) before a catalog goes live; afterwards `download_for` is a lookup.
"""
from __future__ import annotations

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


class HashCache:
    """file path -> digest, trusted while size and mtime are unchanged; persisted as JSON."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._entries: dict[str, dict] = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            self._entries = {}
        self._dirty = False

    def digest(self, file: Path) -> FileDigest:
        stat = file.stat()
        entry = self._entries.get(str(file))
        if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            return FileDigest(entry["size"], entry["md5"], entry["sha256"], stat.st_mtime_ns)
        md5, sha256 = hashlib.md5(), hashlib.sha256()
        with file.open("rb") as handle:
            while chunk := handle.read(1024 * 1024):
                md5.update(chunk)
                sha256.update(chunk)
        digest = FileDigest(stat.st_size, md5.hexdigest(), sha256.hexdigest(), stat.st_mtime_ns)
        self._entries[str(file)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                    "md5": digest.md5, "sha256": digest.sha256}
        self._dirty = True
        return digest

    def save(self) -> None:
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._entries, indent=1), encoding="utf-8")
        os.replace(tmp, self.path)
        self._dirty = False


def _patched_digest(cache: HashCache, base: Path, patch: Path) -> FileDigest:
    """Digest of `base` patched with `patch`, remembered under the pair's own key."""
    key = Path(f"{patch}+{cache.digest(base).sha256}")
    entry = cache._entries.get(str(key))
    patch_stat = patch.stat()
    if entry and entry.get("size_patch") == patch_stat.st_size and entry.get("mtime_ns") == patch_stat.st_mtime_ns:
        return FileDigest(entry["size"], entry["md5"], entry["sha256"])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "patched"
        bsdiff4.file_patch(str(base), str(out), str(patch))
        fresh = HashCache(Path(tmp) / "unused.json")
        digest = fresh.digest(out)
    cache._entries[str(key)] = {"size": digest.size, "size_patch": patch_stat.st_size,
                                "mtime_ns": patch_stat.st_mtime_ns, "md5": digest.md5, "sha256": digest.sha256}
    cache._dirty = True
    return digest


class PackageFiles:
    """Digests and patches for one catalog, prepared before it goes live."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.diffs_dir = data_dir / "diffs"
        self._cache = HashCache(data_dir / "file-hashes.json")
        self._full: dict[str, DownloadFile] = {}
        self._patches: dict[tuple[str, str], DownloadFile] = {}

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
                    target = _patched_digest(self._cache, base.file, package.file)
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
        if key in self._full:
            return self._full[key]
        for download in self._patches.values():
            if download.key == key:
                return download
        return None
