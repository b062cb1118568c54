"""`otactl backup` and `otactl restore`: one archive holding everything a server needs to go on
where it stood, and putting it back. This module owns the archive's layout and its manifest.

The database is copied from the LIVE server with SQLite's online backup API, through a
separate read-only connection that holds one read transaction (a WAL snapshot) for the whole
copy: every step copies its pages from the same snapshot, so the copy is one consistent
state however much the journal commits meanwhile, and in WAL mode a reader never blocks the
writer (its commits go on into the -wal; checkpoints are passive). The copy is checked with
`PRAGMA quick_check` before the archive is finished.

An archive (tar, gzip'ed when its name ends with .gz or .tgz) holds:

    data/ota.sqlite3          the database (rollback-journal mode: one self-contained file)
    data/url-signing.key      so download URLs already handed out stay valid
    data/admin-token          when data_dir has one (broker.yaml may set admin.token instead)
    data/diffs/*.patch        the bsdiff patches built from `diff_from` (else rebuilt at start)
    catalog/<name>            the catalog file the server serves
    packages/<file>           every package file the catalog names, under its `file:` name
    manifest.json             last: format, versions, time, and every member's size, mode and sha256

It is written under a temporary name beside the target (mode 0600: it holds secrets) and
renamed into place only when complete, so a failed backup leaves no partial file. A restore
checks every member against the manifest before it puts anything in place. The manifest
detects damage and edited files; it is not a signature (whoever can rewrite the archive can
rewrite the manifest too): keep backups where only the server's admins can write.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.metadata
import json
import os
import sqlite3
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Iterator

import yaml

from otacore.catalog.model import load_catalog
from otacore.storage.data_dir import ADMIN_TOKEN, DB_NAME, DataDirInUse, DataDirLock, database_path
from otacore.errors import ConfigError
from otacore.config.settings import Settings
from otacore.storage.store import SCHEMA_VERSION, database_error

FORMAT = 1
MANIFEST = "manifest.json"
SIGNING_KEY = "url-signing.key"
PAGES_PER_STEP = 1024  # 4 MiB of 4 KiB pages per backup step
_CHUNK = 1 << 20
_SECRET_MODE = 0o600


class BackupError(Exception):
    """A backup or restore that cannot be done; the message is one line saying why and what to do."""


@dataclass(frozen=True)
class BackupResult:
    path: Path
    size: int
    schema_version: int
    jobs: int
    catalog: Path
    packages: int
    seconds: float


@dataclass(frozen=True)
class RestoreResult:
    data_dir: Path
    catalog: Path
    packages_dir: Path
    packages: int
    schema_version: int
    server_version: str
    created_at: str
    replaced: list[Path] = field(default_factory=list)  # old files moved aside (with --force)


def server_version() -> str:
    try:
        return importlib.metadata.version("ota-server")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------- backup

def create_backup(settings: Settings, target: Path, catalog_path: Path | None = None,
                  pages_per_step: int = PAGES_PER_STEP) -> BackupResult:
    """Write the archive `target` from data_dir and the catalog (`catalog_path`, default the
    one settings name). Nothing is left at `target` or beside it unless it succeeds."""
    started = time.monotonic()
    target = Path(os.path.abspath(target))
    _check_target(target)
    database = database_path(settings.data_dir)
    if not database.is_file():
        raise BackupError(f"no database at {database}; has the server run with this data_dir?")
    catalog_file = catalog_path or settings.catalog_path
    packages_dir, package_names = _catalog_files(catalog_file, settings)
    tmp_archive = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp_db = target.with_name(f".{target.name}.{os.getpid()}.sqlite3.tmp")
    try:
        schema, jobs = _copy_database(database, tmp_db, pages_per_step)
        members: list[tuple[str, Path, int]] = [(f"data/{DB_NAME}", tmp_db, _SECRET_MODE)]
        for name in (SIGNING_KEY, ADMIN_TOKEN):
            if (settings.data_dir / name).is_file():
                members.append((f"data/{name}", settings.data_dir / name, _SECRET_MODE))
        diffs = settings.data_dir / "diffs"
        if diffs.is_dir():
            members += [(f"data/diffs/{p.name}", p, _SECRET_MODE) for p in sorted(diffs.glob("*.patch")) if p.is_file()]
        members.append((f"catalog/{catalog_file.name}", catalog_file, _mode_of(catalog_file)))
        for name in package_names:
            members.append((f"packages/{name}", packages_dir / name, _mode_of(packages_dir / name)))
        raw_dir = _raw_packages_dir(catalog_file)
        manifest: dict[str, Any] = {
            "format": FORMAT, "server_version": server_version(), "schema_version": schema,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "catalog": {"name": catalog_file.name, "packages_dir": raw_dir, "source": str(catalog_file)},
            "data_dir": str(settings.data_dir), "jobs": jobs, "files": []}
        _write_archive(tmp_archive, target, members, manifest)
        os.replace(tmp_archive, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        if exc.filename and str(exc.filename) not in (str(tmp_archive), str(tmp_db), str(target)):
            raise BackupError(f"cannot read {exc.filename} ({exc.strerror or exc}); run otactl as the user the "
                              "server runs as; nothing was written") from None
        raise BackupError(f"cannot write backup {target} ({exc.strerror or exc}); check that the folder is "
                          "writable and has room; nothing was written") from None
    finally:
        tmp_db.unlink(missing_ok=True)
        tmp_archive.unlink(missing_ok=True)
    return BackupResult(target, target.stat().st_size, schema, jobs, catalog_file, len(package_names),
                        time.monotonic() - started)


def _check_target(target: Path) -> None:
    try:
        if target.is_dir():
            raise BackupError(f"{target} is a folder; name the archive file to write, e.g. "
                              f"{target}/ota-backup.tar.gz")
        if not target.parent.is_dir():
            raise BackupError(f"folder {target.parent} does not exist; create it or name another place for the "
                              "backup")
        if target.exists() and not target.is_file():
            raise BackupError(f"{target} exists and is not a regular file; name another place for the backup")
        os.stat(target.with_name(f".{target.name}.{os.getpid()}.sqlite3.tmp"))  # the longest name we use
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise BackupError(f"cannot write backup {target} ({exc.strerror or exc}); check the path; nothing was "
                          "written") from None


def _catalog_files(catalog_file: Path, settings: Settings) -> tuple[Path, list[str]]:
    """packages_dir and the `file:` name of every package, as the catalog writes them."""
    try:
        catalog = load_catalog(catalog_file, settings)
    except ConfigError as exc:
        raise BackupError(f"the catalog has {len(exc.issues)} error(s), first: {exc.issues[0]}; fix it (otactl "
                          "validate) and back up again") from None
    root = yaml.safe_load(catalog_file.read_text(encoding="utf-8")) or {}
    names = [str(item["file"]) for item in root.get("packages") or []]
    return catalog.packages_dir, list(dict.fromkeys(names))


def _raw_packages_dir(catalog_file: Path) -> str:
    root = yaml.safe_load(catalog_file.read_text(encoding="utf-8")) or {}
    return str(root.get("packages_dir") or "packages")


def _mode_of(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _copy_database(database: Path, copy: Path, pages_per_step: int) -> tuple[int, int]:
    """Online backup of the live database into `copy`; returns (schema version, jobs).
    A separate read-only connection holds one WAL snapshot across all steps: the copy is
    consistent, and the server's writer is never waited for nor made to wait."""
    fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _SECRET_MODE)
    os.close(fd)
    try:
        source = sqlite3.connect(f"file:{database}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise BackupError(f"otactl cannot read the database: {database_error(database, exc)}") from None
    try:
        destination = sqlite3.connect(copy, isolation_level=None)
        try:
            source.execute("PRAGMA busy_timeout=5000")
            source.execute("BEGIN")
            source.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # the snapshot starts here
            source.backup(destination, pages=max(1, pages_per_step))
            source.execute("COMMIT")
            destination.execute("PRAGMA journal_mode=DELETE")
            problems = [row[0] for row in destination.execute("PRAGMA quick_check(5)") if row[0] != "ok"]
            if problems:
                raise BackupError(f"the copy of {database} fails quick_check ({' '.join(problems[0].split())}); "
                                  f"the live database may be damaged: run `otactl validate` and check the server log")
            schema = destination.execute("PRAGMA user_version").fetchone()[0]
            jobs = destination.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        finally:
            destination.close()
    except sqlite3.Error as exc:
        if isinstance(exc, sqlite3.OperationalError) and "disk" in str(exc).lower():
            raise OSError(28, f"writing the database copy failed ({exc})", str(copy)) from None
        raise BackupError(f"cannot copy the database: {database_error(database, exc)}") from None
    finally:
        source.close()
    for suffix in ("-journal", "-wal", "-shm"):
        Path(f"{copy}{suffix}").unlink(missing_ok=True)
    return schema, jobs


class _HashingReader:
    """Reads `size` bytes of a file for tarfile, hashing them on the way."""

    def __init__(self, handle: IO[bytes], size: int) -> None:
        self.handle, self.left, self.sha = handle, size, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.handle.read(n)
        self.left -= len(data)
        self.sha.update(data)
        return data


def _write_archive(tmp: Path, target: Path, members: list[tuple[str, Path, int]], manifest: dict[str, Any]) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _SECRET_MODE)
    os.fchmod(fd, _SECRET_MODE)  # whatever the umask
    compress = target.name.endswith((".gz", ".tgz"))
    now = int(time.time())
    with os.fdopen(fd, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w:gz" if compress else "w", format=tarfile.PAX_FORMAT) as archive:
            for name, path, mode in members:
                with path.open("rb") as handle:
                    size = os.fstat(handle.fileno()).st_size
                    info = tarfile.TarInfo(name)
                    info.size, info.mode, info.mtime = size, mode, now
                    reader = _HashingReader(handle, size)
                    archive.addfile(info, reader)  # type: ignore[arg-type]
                    if reader.left:  # tarfile raises on a short read; be sure
                        raise OSError(5, f"{path} shrank while it was copied; back up again", str(path))
                manifest["files"].append({"name": name, "size": size, "mode": f"{mode:04o}",
                                          "sha256": reader.sha.hexdigest()})
            data = json.dumps(manifest, indent=2).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mode, info.mtime = len(data), 0o600, now
            archive.addfile(info, _BytesReader(data))  # type: ignore[arg-type]
        raw.flush()
        os.fsync(raw.fileno())


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.at + n
        chunk, self.at = self.data[self.at:end], min(end, len(self.data))
        return chunk


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------- restore

def read_manifest(archive: Path) -> dict[str, Any]:
    """The archive's manifest, after checking every member against it (sizes and sha256)."""
    with _open_archive(archive) as tar:
        manifest = _manifest(archive, tar)
        for member, handle in _members(archive, tar, manifest):
            _check_member(archive, manifest, member, _hash_stream(handle))
    return manifest


@contextlib.contextmanager
def _open_archive(archive: Path) -> Iterator[tarfile.TarFile]:
    if archive.is_dir():
        raise BackupError(f"{archive} is a folder; name a backup archive made by `otactl backup`")
    try:
        tar = tarfile.open(archive, "r:*")
    except FileNotFoundError:
        raise BackupError(f"{archive} does not exist") from None
    except OSError as exc:
        raise BackupError(f"cannot read {archive} ({exc.strerror or exc})") from None
    except (tarfile.TarError, EOFError):
        raise BackupError(f"{archive} is not an ota-server backup (not a tar archive, plain or gzip'ed)") from None
    try:
        yield tar
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise BackupError(f"{archive} is damaged ({_one_line(exc)}); nothing was restored") from None
    except OSError as exc:
        if exc.errno is not None:  # ours: writing the restored files
            raise
        raise BackupError(f"{archive} is damaged ({_one_line(exc)}); nothing was restored") from None
    finally:
        tar.close()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def _manifest(archive: Path, tar: tarfile.TarFile) -> dict[str, Any]:
    try:
        member = tar.getmember(MANIFEST)
        handle = tar.extractfile(member)
        manifest = json.loads(handle.read()) if handle is not None else None
    except KeyError:
        raise BackupError(f"{archive} is not an ota-server backup (no {MANIFEST})") from None
    except ValueError:
        raise BackupError(f"{archive} has a damaged {MANIFEST}; nothing was restored") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), list):
        raise BackupError(f"{archive} has a manifest this otactl does not read (format "
                          f"{manifest.get('format') if isinstance(manifest, dict) else '?'}); use the otactl that "
                          "made it")
    names = [entry.get("name") for entry in manifest["files"] if isinstance(entry, dict)]
    if len(names) != len(manifest["files"]) or f"data/{DB_NAME}" not in names or \
            not any(str(n).startswith("catalog/") for n in names):
        raise BackupError(f"{archive} has an incomplete manifest (no database or no catalog); nothing was restored")
    for name in names:
        _safe_name(archive, name)
    catalog = manifest.get("catalog")
    try:  # the manifest is not signed: every field used later is checked here, in one line
        int(manifest.get("schema_version") or 0)
        if not isinstance(catalog, dict) or not isinstance(catalog.get("name"), str) or \
                not isinstance(catalog.get("packages_dir", "packages"), str):
            raise ValueError("catalog")
        for entry in manifest["files"]:
            int(str(entry.get("mode", "600")), 8)
    except (TypeError, ValueError):
        raise BackupError(f"{archive} has a damaged {MANIFEST} (a field of the wrong kind); nothing was "
                          "restored") from None
    return manifest


def _safe_name(archive: Path, name: Any) -> PurePosixPath:
    path = PurePosixPath(str(name))
    if not isinstance(name, str) or path.is_absolute() or ".." in path.parts or len(path.parts) < 2 or \
            path.parts[0] not in ("data", "catalog", "packages") or "\\" in name:
        raise BackupError(f"{archive} names a file outside its layout ({str(name)[:80]!r}); nothing was restored")
    return path


def _members(archive: Path, tar: tarfile.TarFile, manifest: dict[str, Any]) -> Iterator[tuple[str, IO[bytes]]]:
    """Every member but the manifest, each exactly once, each listed in the manifest."""
    listed = {entry["name"] for entry in manifest["files"]}
    seen: set[str] = set()
    for member in tar:
        if member.name == MANIFEST:
            continue
        if member.name not in listed or member.name in seen or not member.isfile():
            raise BackupError(f"{archive} holds {member.name[:80]!r}, which its manifest does not list (or twice, "
                              "or not as a file); nothing was restored")
        seen.add(member.name)
        handle = tar.extractfile(member)
        assert handle is not None
        yield member.name, handle
    missing = listed - seen
    if missing:
        raise BackupError(f"{archive} lacks {sorted(missing)[0]}, which its manifest lists; nothing was restored")


def _hash_stream(handle: IO[bytes], out: IO[bytes] | None = None) -> tuple[int, str]:
    sha, size = hashlib.sha256(), 0
    while chunk := handle.read(_CHUNK):
        sha.update(chunk)
        size += len(chunk)
        if out is not None:
            out.write(chunk)
    return size, sha.hexdigest()


def _check_member(archive: Path, manifest: dict[str, Any], name: str, got: tuple[int, str]) -> None:
    entry = next(e for e in manifest["files"] if e["name"] == name)
    if (entry.get("size"), entry.get("sha256")) != got:
        raise BackupError(f"{archive} is damaged or was changed: {name} has sha256 {got[1][:16]}... "
                          f"({got[0]} bytes), its manifest says {str(entry.get('sha256'))[:16]}... "
                          f"({entry.get('size')} bytes); nothing was restored")


def _destination(name: str, data_dir: Path, catalog: Path, packages_dir: Path) -> Path:
    parts = PurePosixPath(name).parts
    if parts[0] == "data":
        return data_dir.joinpath(*parts[1:])
    if parts[0] == "catalog":
        return catalog
    return packages_dir.joinpath(*parts[1:])


def _same_file(path: Path, sha256: str) -> bool:
    with path.open("rb") as handle:
        return _hash_stream(handle)[1] == sha256


def restore_backup(archive: Path, data_dir: Path, *, catalog_dir: Path | None = None,
                   catalog_path: Path | None = None, force: bool = False) -> RestoreResult:
    """Check `archive` against its manifest, then put the database, keys and patches into
    `data_dir`, the catalog at `catalog_dir`/its name (or at `catalog_path`) and the packages
    into the packages_dir that catalog names. Refused when a server holds data_dir, and, without
    `force`, when it would replace a database or any file with different content (identical
    files are left as they are). With `force` the old database is kept beside the new one."""
    archive, data_dir = Path(os.path.abspath(archive)), Path(os.path.abspath(data_dir))
    manifest = read_manifest(archive)  # everything checked before anything is touched
    schema = int(manifest.get("schema_version") or 0)
    if schema > SCHEMA_VERSION:
        raise BackupError(f"{archive} holds database schema {schema} (server {manifest.get('server_version')}); "
                          f"this version reads schema {SCHEMA_VERSION}: install server "
                          f"{manifest.get('server_version')} or newer first; nothing was restored")
    catalog_name = str(manifest["catalog"]["name"])
    if "/" in catalog_name or catalog_name in ("", ".", ".."):
        raise BackupError(f"{archive} names its catalog {catalog_name[:80]!r}; nothing was restored")
    catalog = Path(os.path.abspath(catalog_path if catalog_path is not None else
                                   (catalog_dir or Path.cwd()) / catalog_name))
    raw_dir = str(manifest["catalog"].get("packages_dir") or "packages")
    packages_dir = Path(os.path.abspath(catalog.parent / raw_dir))
    if not packages_dir.is_relative_to(catalog.parent):
        # The manifest is not signed: a crafted one must not make restore write anywhere.
        raise BackupError(f"{archive} puts its packages in {raw_dir[:120]!r}, outside the catalog's folder "
                          f"{catalog.parent}; restore writes only below the folders it is given: restore into a "
                          "catalog folder that holds them, or copy packages/ out of the archive yourself; nothing "
                          "was restored")
    lock = DataDirLock(data_dir)
    try:
        lock.acquire()
    except DataDirInUse as exc:
        raise BackupError(f"will not restore into a running server's data_dir: {exc}") from None
    except OSError as exc:
        raise BackupError(f"cannot use data_dir {data_dir} ({exc.strerror or exc}); nothing was restored") from None
    try:
        return _restore_locked(archive, manifest, data_dir, catalog, packages_dir, force)
    finally:
        lock.release()


def _restore_locked(archive: Path, manifest: dict[str, Any], data_dir: Path, catalog: Path, packages_dir: Path,
                    force: bool) -> RestoreResult:
    entries = {e["name"]: e for e in manifest["files"]}
    plan = {name: _destination(name, data_dir, catalog, packages_dir) for name in entries}
    database = database_path(data_dir)
    has_database = any(Path(f"{database}{s}").exists() for s in ("", "-wal"))
    if has_database and not force:
        raise BackupError(f"{data_dir} already has a database ({DB_NAME}); pass --force to replace it (the old one "
                          f"is kept as {DB_NAME}.before-restore-<time>); nothing was restored")
    different = [path for name, path in plan.items() if name != f"data/{DB_NAME}" and path.exists()
                 and (not path.is_file() or not _same_file(path, entries[name]["sha256"]))]
    if different and not force:
        raise BackupError(f"{len(different)} file(s) there differ from the backup's, first {different[0]}; pass "
                          "--force to replace them; nothing was restored")
    staged: dict[Path, Path] = {}
    try:
        with _open_archive(archive) as tar:
            for name, handle in _members(archive, tar, manifest):
                final = plan[name]
                if name != f"data/{DB_NAME}" and final.is_file() and _same_file(final, entries[name]["sha256"]):
                    continue  # already this file
                final.parent.mkdir(parents=True, exist_ok=True)
                tmp = final.with_name(f".{final.name}.restore-{os.getpid()}.tmp")
                staged[final] = tmp
                mode = _SECRET_MODE if name.startswith("data/") else int(str(entries[name].get("mode", "600")), 8) & 0o666
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
                os.fchmod(fd, mode)
                with os.fdopen(fd, "wb") as out:
                    got = _hash_stream(handle, out)
                    out.flush()
                    os.fsync(out.fileno())
                _check_member(archive, manifest, name, got)
        _check_restored_database(archive, staged.get(database))
        replaced = _move_old_database(database) if has_database else []
        for final, tmp in staged.items():
            os.replace(tmp, final)
        (data_dir / "file-hashes.json").unlink(missing_ok=True)  # a cache by size and mtime: start afresh
        for folder in {final.parent for final in staged}:
            _fsync_dir(folder)
    except OSError as exc:
        raise BackupError(f"cannot restore into {exc.filename or data_dir} ({exc.strerror or exc}); check that it "
                          "is writable and has room") from None
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    packages = sum(1 for name in entries if name.startswith("packages/"))
    return RestoreResult(data_dir, catalog, packages_dir, packages, int(manifest.get("schema_version") or 0),
                         str(manifest.get("server_version")), str(manifest.get("created_at")), replaced)


def _check_restored_database(archive: Path, staged: Path | None) -> None:
    if staged is None:
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{staged}?mode=ro", uri=True)) as db:
            problems = [row[0] for row in db.execute("PRAGMA quick_check(5)") if row[0] != "ok"]
    except sqlite3.Error as exc:
        problems = [str(exc)]
    if problems:
        raise BackupError(f"the database in {archive} fails quick_check ({' '.join(problems[0].split())}); "
                          "nothing was restored")


def _move_old_database(database: Path) -> list[Path]:
    """Set the database being replaced aside with its -wal (named so SQLite pairs them again)."""
    aside = database.with_name(f"{database.name}.before-restore-{time.strftime('%Y%m%dT%H%M%S')}")
    moved = []
    for suffix in ("", "-wal"):
        old = Path(f"{database}{suffix}")
        if old.exists():
            os.rename(old, f"{aside}{suffix}")
            moved.append(Path(f"{aside}{suffix}"))
    Path(f"{database}-shm").unlink(missing_ok=True)
    return moved
