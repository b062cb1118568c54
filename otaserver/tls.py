"""TLS for both endpoints: the MQTT listeners with `ssl: on` and the file server's `http.tls`.

One function builds every server context from the OTA plugin's `tls` settings
(compatibility level, minimum version, cipher list), so a device negotiates the same way
on either endpoint. A failed handshake is answered with the alert OpenSSL wrote (asyncio
drops it), logged in bursts with its reason and counted for /metrics.

Levels (docs/configuration.md, "tls"):
- `iot`, the default: TLS 1.3, then TLS 1.2 with ECDHE first, and last the RSA key exchange
  AES-CBC suites that device TLS stacks built small offer alone (Aliyun's C Link SDK with
  its mbedtls configuration). Those devices get no forward secrecy; everyone else still
  negotiates TLS 1.3 or ECDHE, because the server's order wins.
- `intermediate`: TLS 1.3, then TLS 1.2 with ECDHE/DHE AEAD suites only (Python's default).
- `modern`: TLS 1.3 only.
"""
from __future__ import annotations

import asyncio.sslproto
import logging
import ssl
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

from otacore.log_hygiene import Burst
from otacore.config.settings import Settings

log = logging.getLogger("ota.tls")
log.addFilter(Burst(("TLS handshake failed",), burst=5, interval=10.0))

FORWARD_SECRET = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"
# RSA key exchange, AES-CBC with HMAC-SHA256 then SHA-1: what mbedtls builds without ECC offer.
RSA_KEY_EXCHANGE = "AES256-SHA256:AES128-SHA256:AES256-SHA:AES128-SHA"
EXCLUDED = "!aNULL:!eNULL:!aDSS:!AESCCM:!3DES:!RC4:!MD5"
LEVEL_CIPHERS = {
    "iot": f"{FORWARD_SECRET}:ECDHE+AES:{RSA_KEY_EXCHANGE}:{EXCLUDED}",
    "intermediate": f"{FORWARD_SECRET}:{EXCLUDED}",
    "modern": f"{FORWARD_SECRET}:{EXCLUDED}",  # unused: TLS 1.3 only
}
MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

# What a failed handshake's OpenSSL reason means for an operator (the `reason` label).
_REASONS = (
    ("NO_SHARED_CIPHER", "no_shared_cipher"),
    ("UNSUPPORTED_PROTOCOL", "protocol_version"),
    ("PROTOCOL_VERSION", "protocol_version"),
    ("UNKNOWN_CA", "unknown_ca"),
    ("BAD_CERTIFICATE", "bad_certificate"),
    ("CERTIFICATE_UNKNOWN", "bad_certificate"),
    ("DECRYPT_ERROR", "bad_certificate"),
    ("HTTP_REQUEST", "plain_text"),
    ("WRONG_VERSION_NUMBER", "plain_text"),
    ("UNKNOWN_PROTOCOL", "plain_text"),
    ("RECORD_LAYER_FAILURE", "plain_text"),
)
FAILURE_REASONS = ("no_shared_cipher", "protocol_version", "unknown_ca", "bad_certificate", "plain_text", "other")
_HINTS = {
    "no_shared_cipher": "the client offers no suite of tls.compatibility/tls.ciphers (see docs/operations.md, TLS)",
    "protocol_version": "the client's TLS version is below tls.min_version",
    "unknown_ca": "the client does not trust this server's certificate: give it the CA that signed it",
    "bad_certificate": "the client refused this server's certificate (its name, dates or key type)",
    "plain_text": "the client spoke plain MQTT/HTTP on a TLS port",
    "other": "",
}


def failure_reason(exc: BaseException) -> str:
    """The `reason` label of a failed handshake."""
    text = f"{getattr(exc, 'reason', '') or ''} {exc}".upper()
    return next((label for marker, label in _REASONS if marker in text), "other")


def server_context(settings: Settings, certfile: Path | str, keyfile: Path | str | None = None, *,
                   cafile: str | None = None, capath: str | None = None, cadata: str | None = None,
                   endpoint: str = "https", failures: Counter[tuple[str, str]] | None = None) -> ssl.SSLContext:
    """A server context for `endpoint` ("mqtt" or "https") under the `tls` settings.
    With a CA (`cafile`, `capath` or `cadata`, amqtt's listener keys), client certificates
    are asked for and checked when sent; without one none is asked for. Its failed
    handshakes are counted in `failures` by (endpoint, reason)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.minimum_version = MIN_VERSIONS[settings.tls_min_version]
    if settings.tls_compatibility == "modern":
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_ciphers(settings.tls_ciphers or LEVEL_CIPHERS[settings.tls_compatibility])
    context.load_cert_chain(str(certfile), str(keyfile) if keyfile is not None else None)
    if cafile or capath or cadata:
        context.load_verify_locations(cafile=cafile, capath=capath, cadata=cadata)
        context.verify_mode = ssl.CERT_OPTIONAL
    _WATCHED[context] = (endpoint, failures if failures is not None else Counter())
    return context


# -- handshake failures -------------------------------------------------------------------

# Our server contexts -> (endpoint label, their server's failure counts for /metrics).
_WATCHED: weakref.WeakKeyDictionary[ssl.SSLContext, tuple[str, Counter[tuple[str, str]]]] = \
    weakref.WeakKeyDictionary()


def _peer(protocol: Any) -> str:
    transport = getattr(protocol, "_transport", None)
    peer = transport.get_extra_info("peername") if transport is not None else None
    return f"{peer[0]}:{peer[1]}" if peer else "?"


_original_on_handshake_complete = asyncio.sslproto.SSLProtocol._on_handshake_complete


def _on_handshake_complete(self: Any, handshake_exc: BaseException | None) -> None:
    context = getattr(self, "_sslcontext", None)
    watched = _WATCHED.get(context) if handshake_exc is not None and context is not None else None
    if watched is not None:
        try:
            self._process_outgoing()  # the alert OpenSSL wrote: asyncio closes without sending it
        except Exception:  # noqa: BLE001 - the connection is failing anyway; the alert is a courtesy
            pass
        (endpoint, failures), reason = watched, failure_reason(handshake_exc)
        failures[(endpoint, reason)] += 1
        hint = _HINTS[reason]
        log.warning("TLS handshake failed on %s from %s: %s (%s)%s", endpoint, _peer(self), reason,
                    getattr(handshake_exc, "reason", None) or handshake_exc, f"; {hint}" if hint else "")
    _original_on_handshake_complete(self, handshake_exc)


def install() -> None:
    """Patch asyncio's SSLProtocol once per process (it is a class attribute, shared by every
    loop): failed handshakes of our contexts get their alert, a log line and a count.
    Also bound each TLS connection's read buffer: asyncio gives every one 256 KiB from its
    accept, and a flood of idle handshakes took 1,500 of them to 444 MB; TLS records are at
    most 16 KiB."""
    protocol = asyncio.sslproto.SSLProtocol
    if getattr(protocol, "_on_handshake_complete", None) is not _on_handshake_complete:
        if not hasattr(protocol, "_process_outgoing"):
            raise RuntimeError("asyncio.sslproto changed: SSLProtocol._process_outgoing is gone; "
                               "review otaserver/tls.py for this Python version")
        protocol._on_handshake_complete = _on_handshake_complete  # type: ignore[method-assign]
    protocol.max_size = 32 * 1024
