"""What lives in data_dir besides what otacore.store and package_files own: where the
database is, the URL signing key, the admin token, and `server.json` (where a running
server's admin API listens, for otactl)."""
from __future__ import annotations

import fcntl
import json
import os
import secrets
from pathlib import Path
from typing import Any

DB_NAME = "ota.sqlite3"
SERVER_INFO = "server.json"


def database_path(data_dir: Path) -> Path:
    return data_dir / DB_NAME


def write_server_info(data_dir: Path, info: dict[str, Any]) -> None:
    path = data_dir / SERVER_INFO
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info), encoding="utf-8")
    os.replace(tmp, path)


def read_server_info(data_dir: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((data_dir / SERVER_INFO).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    return info if isinstance(info, dict) and "http_url" in info else None


def remove_server_info(data_dir: Path, pid: int) -> None:
    """Remove server.json if this process (`pid`) wrote it."""
    info = read_server_info(data_dir)
    if info is not None and info.get("pid") == pid:
        (data_dir / SERVER_INFO).unlink(missing_ok=True)


class DataDirInUse(Exception):
    """Another server process holds the data_dir."""


class DataDirLock:
    """One server per data_dir: two would write the same database and server.json."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "ota-server.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataDirInUse(f"another ota-server (pid {holder}) uses data_dir {self.path.parent}; stop it "
                               "or give this one its own --data-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def read_or_create(path: Path, nbytes: int = 32) -> str:
    """The secret in `path`, created (mode 0600, atomically) on first use."""
    try:
        value = path.read_text(encoding="ascii").strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(nbytes)
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(value + "\n")
    try:
        os.link(tmp, path)  # first writer wins if two processes race
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text(encoding="ascii").strip()


def url_signing_key(data_dir: Path) -> bytes:
    return bytes.fromhex(read_or_create(data_dir / "url-signing.key"))


def admin_token(data_dir: Path, configured: str | None) -> str:
    """`admin.token` from broker.yaml, else the one generated into data_dir/admin-token."""
    return configured if configured else read_or_create(data_dir / "admin-token", 24)
