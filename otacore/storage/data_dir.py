"""What lives in data_dir besides what otacore.storage.store and package_files own: where the
database is, the URL signing key, the admin token, `server.json` (where a running server's
admin API listens, for otactl), the lock that keeps a second server out, and the checks a
running server makes that data_dir is still the directory it opened."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import Any

DB_NAME = "ota.sqlite3"
SERVER_INFO = "server.json"
ADMIN_TOKEN = "admin-token"
PID_FILE = "ota-server.lock"

log = logging.getLogger("ota.server")

# (st_dev, st_ino): what deleting a file or directory, or moving another one into its place, changes.
FileId = tuple[int, int]


def database_path(data_dir: Path) -> Path:
    return data_dir / DB_NAME


def file_id(path: Path) -> FileId | None:
    """The (device, inode) at `path` now; None when nothing is there."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_dev, st.st_ino


def write_server_info(data_dir: Path, info: dict[str, Any]) -> None:
    path = data_dir / SERVER_INFO
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info), encoding="utf-8")
    os.replace(tmp, path)


def read_server_info(data_dir: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((data_dir / SERVER_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, or data_dir itself gone or unreadable
        return None
    return info if isinstance(info, dict) and "http_url" in info else None


def remove_server_info(data_dir: Path, pid: int) -> None:
    """Remove server.json if this process (`pid`) wrote it."""
    info = read_server_info(data_dir)
    if info is not None and info.get("pid") == pid:
        (data_dir / SERVER_INFO).unlink(missing_ok=True)


class DataDirInUse(Exception):
    """Another server process holds the data_dir, or it cannot be locked; the message says what to do."""


class DataDirLock:
    """One server per data_dir: two would write the same database and server.json.

    The flock is on the directory itself, so deleting a file in it frees nothing. On Linux the
    server also binds an abstract socket named after data_dir's path: it lives as long as the
    process, so a server on a data_dir deleted and made again is refused while the first one
    still runs (that one stops within a second, when it notices). `ota-server.lock` only holds
    the pid, for the message."""

    def __init__(self, data_dir: Path, *, shared: bool = False) -> None:
        self.data_dir = data_dir
        # Shared: workers of one cluster on one machine (PostgreSQL journal) hold it together;
        # a server of its own still cannot start beside them, nor they beside it.
        self.shared = shared
        self.identity: FileId | None = None  # of the directory locked
        self._fd: int | None = None
        self._name: socket.socket | None = None

    def acquire(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        name = None if self.shared else self._claim_name()
        fd = os.open(self.data_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if name is not None:
                name.close()
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise self._in_use() from None
            raise DataDirInUse(f"cannot lock data_dir {self.data_dir} ({exc.strerror}); put it on a local "
                               "filesystem") from None
        st = os.fstat(fd)
        self._fd, self._name, self.identity = fd, name, (st.st_dev, st.st_ino)
        if not self.shared:
            _write_new(self.data_dir / PID_FILE, str(os.getpid()), replace=True)

    def _claim_name(self) -> socket.socket | None:
        if not sys.platform.startswith("linux"):
            return None
        digest = hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:40]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(f"\0ota-server/{digest}")
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise self._in_use() from None
            return None  # no abstract sockets here (a sandbox): the flock still holds
        return sock

    def _in_use(self) -> DataDirInUse:
        holder = "?"
        try:
            holder = (self.data_dir / PID_FILE).read_text(encoding="ascii").strip() or "?"
        except OSError:
            holder = str((read_server_info(self.data_dir) or {}).get("pid", "?"))
        return DataDirInUse(f"another ota-server (pid {holder}) uses data_dir {self.data_dir}; stop it "
                            "or give this one its own --data-dir")

    def release(self) -> None:
        if self._fd is not None:
            if file_id(self.data_dir) == self.identity and not self.shared:  # not a new server's file in a new data_dir
                (self.data_dir / PID_FILE).unlink(missing_ok=True)
            os.close(self._fd)  # closing drops the flock
            self._fd = None
        if self._name is not None:
            self._name.close()
            self._name = None


def _write_new(path: Path, value: str, replace: bool = False) -> None:
    """Write `value` to `path`, mode 0600, atomically. Without `replace`, a file already there
    wins (two processes racing to create a secret agree on one)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(value + "\n")
    try:
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def read_or_create(path: Path, nbytes: int = 32) -> str:
    """The secret in `path`, created (mode 0600, atomically) on first use."""
    try:
        value = path.read_text(encoding="ascii").strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_new(path, secrets.token_hex(nbytes))
    return path.read_text(encoding="ascii").strip()


def url_signing_key(data_dir: Path) -> bytes:
    return bytes.fromhex(read_or_create(data_dir / "url-signing.key"))


def admin_token(data_dir: Path, configured: str | None) -> str:
    """For the server: `admin.token` from broker.yaml, else the one generated into data_dir/admin-token."""
    return configured if configured else read_or_create(data_dir / ADMIN_TOKEN, 24)


class NoAdminToken(Exception):
    """otactl has no admin token to send; the message says what to do."""


def read_admin_token(data_dir: Path, configured: str | None) -> str:
    """For otactl: the token the server holds. Never creates one: the server would not know it."""
    if configured:
        return configured
    path = data_dir / ADMIN_TOKEN
    try:
        value = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        value = ""
    except OSError as exc:
        raise NoAdminToken(f"cannot read the admin token {path} ({exc.strerror}); run otactl as the user the "
                           "server runs as, or set admin.token in broker.yaml") from None
    if not value:
        raise NoAdminToken(f"no admin token in {path}; a running server writes it back within a second (try "
                           "again), else start ota-server on this data_dir, or set admin.token in broker.yaml")
    return value


class DataDirWatch:
    """What a running server checks every second, with a few stat() calls: that data_dir is the
    directory it locked (the database is the journal's to check), and that the admin token it
    generated is still in its file, written back (same value) if someone deleted it."""

    def __init__(self, data_dir: Path, identity: FileId | None, token: str | None) -> None:
        """`token`: the generated token to keep in data_dir/admin-token; None when broker.yaml sets it."""
        self.data_dir, self.identity, self.token = data_dir, identity, token

    def moved(self) -> str | None:
        """Why data_dir is not the directory the server locked (deleted, replaced), or None."""
        if file_id(self.data_dir) != self.identity:
            return f"data_dir {self.data_dir} was deleted or replaced while the server ran"
        return None

    def restore_token(self) -> None:
        path = self.data_dir / ADMIN_TOKEN
        if self.token is None or path.exists():
            return
        _write_new(path, self.token)
        log.warning("%s was deleted; wrote the token this server holds back into it", path)
