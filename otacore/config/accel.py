"""`http.accel` in broker.yaml: nginx in front serves the bytes of authorized downloads
(docs/configuration.md, docs/cluster-downloads.md). Its settings, validated."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ACCEL_KEYS = ("log_bind", "prefix")
# An nginx location prefix: plain path segments, each ending with `/`, so nothing in it is
# an nginx variable, a regex or a quote.
_PREFIX = re.compile(r"(/[A-Za-z0-9._~-]+)+/")
# The server's own routes: an `internal` location there would hide them from everyone.
_TAKEN = ("/files/", "/base-api/", "/admin/", "/metrics/", "/healthz/")


@dataclass(frozen=True)
class AccelSettings:
    """`prefix`: nginx's internal location the server redirects authorized downloads to,
    `{prefix}{absolute file path}`; `log_host`/`log_port` (UDP) or `log_path` (a unix
    datagram socket, which only local processes with the file's permissions can write to):
    where the server listens for nginx's access log lines saying how many bytes each
    download sent (all None: it does not count them)."""

    prefix: str
    log_host: str | None = None
    log_port: int | None = None
    log_path: str | None = None

    @property
    def counts_bytes(self) -> bool:
        return self.log_port is not None or self.log_path is not None

    @property
    def log_address(self) -> str:
        """As nginx's `syslog:server=` names it."""
        return f"unix:{self.log_path}" if self.log_path else f"{self.log_host}:{self.log_port}"

    def redirect_path(self, file_path: str) -> str:
        """The internal location of an absolute, percent-encoded file path."""
        return self.prefix[:-1] + file_path


def accel_settings(value: Any, bad: Callable[[str, str], None],
                   split_host_port: Callable[[str], tuple[str, int]]) -> AccelSettings | None:
    """`http.accel` as AccelSettings; None when absent or wrong (`bad(key, message)` says why)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        bad("http.accel", "must be a mapping with prefix (and log_bind), e.g. {prefix: /_ota_files/, "
                          "log_bind: 127.0.0.1:8514}")
        return None
    for extra in sorted(set(value) - set(ACCEL_KEYS), key=str):
        bad(f"http.accel.{extra}", f"unknown key; known keys are {', '.join(ACCEL_KEYS)}")
    prefix = value.get("prefix")
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix) or len(prefix) > 200 \
            or prefix.startswith(_TAKEN):
        bad("http.accel.prefix", f"{prefix!r} is not an nginx internal location like /_ota_files/ (letters, digits, "
                                 "._~- between slashes, ending with /, not under /files/, /admin/ or /base-api/)")
        return None
    host = port = None
    bind = value.get("log_bind")
    if isinstance(bind, str) and bind.startswith("unix:"):
        path = bind[len("unix:"):]
        if not path.startswith("/") or len(path.encode()) > 100 or "," in path or " " in path:
            bad("http.accel.log_bind", f"{bind!r}: a unix socket is unix:/absolute/path (at most 100 bytes, no "
                                       "comma or space: nginx's syslog:server= names it)")
            return None
        return AccelSettings(prefix, log_path=path)
    if bind is not None:
        try:
            host, port = split_host_port(str(bind))
            if port == 0:
                raise ValueError(f"{bind!r} needs a port from 1 to 65535 (nginx's access_log syslog:server= names it)")
        except ValueError as exc:
            bad("http.accel.log_bind", str(exc))
            return None
    return AccelSettings(prefix, host, port)
