"""Signed, expiring download URLs bound to one file and one device (docs/protocol.md 5)."""
from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import quote, urlencode

from otacore.protocol.credentials import DeviceId


def _signature(key: bytes, path: str, device: DeviceId, job_id: int, expires: int) -> str:
    message = f"{path}\n{device.product_key}\n{device.device_name}\n{job_id}\n{expires}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def download_path(file_key: str, file_name: str) -> str:
    return f"/files/{quote(file_key, safe='')}/{quote(file_name, safe='')}"


def sign_url(key: bytes, base_url: str, file_key: str, file_name: str, device: DeviceId,
             job_id: int, ttl_seconds: int, now: float | None = None) -> str:
    expires = int((time.time() if now is None else now) + ttl_seconds)
    path = download_path(file_key, file_name)
    query = urlencode({"pk": device.product_key, "dn": device.device_name, "job": job_id, "exp": expires,
                       "sig": _signature(key, path, device, job_id, expires)})
    return f"{base_url}{path}?{query}"


class UrlRejected(Exception):
    """Why a download URL is refused (always answered with 403)."""


def _digits(text: str) -> int:
    """A URL's number as the server wrote it: ASCII digits only (int() also takes '٣', '+5', '1_000')."""
    if not (text.isascii() and text.isdigit() and len(text) <= 19):
        raise ValueError(text)
    return int(text)


def verify_url(key: bytes, path: str, query: dict[str, str], now: float | None = None) -> tuple[DeviceId, int]:
    """Check a request's path and query; returns (device, job id) or raises UrlRejected."""
    try:
        device = DeviceId(query["pk"], query["dn"])
        job_id, expires, given = _digits(query["job"]), _digits(query["exp"]), query["sig"]
    except (KeyError, ValueError):
        raise UrlRejected("missing or malformed signature parameters (pk, dn, job, exp, sig)") from None
    expected = _signature(key, path, device, job_id, expires)
    if not hmac.compare_digest(expected.encode(), given.encode()):
        raise UrlRejected("signature does not match this URL")
    if (time.time() if now is None else now) > expires:
        raise UrlRejected("URL expired; ask the server for a new one (firmware/get)")
    return device, job_id
