"""Long-lived secrets kept in data_dir: the URL signing key and the admin token."""
from __future__ import annotations

import os
import secrets
from pathlib import Path


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
