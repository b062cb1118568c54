"""The device side of Aliyun's MQTT login (docs/protocol.md 1): the device secret derived
from the product secret, and the signed password a device sends instead of its secret.

Aliyun SDKs put their parameters in the MQTT client id, `{cid}|securemode=3,signmethod=M,...,
timestamp=T|`, and send as password hex(HMAC-M(deviceSecret, content)), where content is
"clientId{cid}deviceName{dn}productKey{pk}" followed by "timestamp{T}" when the client id
carries a timestamp (the keys sorted, each followed by its value).
"""
from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence

SIGN_METHODS = {"hmacmd5": hashlib.md5, "hmacsha1": hashlib.sha1, "hmacsha256": hashlib.sha256}


def derive_device_secret(product_secret: str, device_name: str) -> str:
    """A device secret the catalog does not list: hex(HMAC-SHA256(productSecret, deviceName))."""
    return hmac.new(product_secret.encode(), device_name.encode(), hashlib.sha256).hexdigest()


def sign_content(client_id: str, device_name: str, product_key: str, timestamp: str | int | None = None) -> str:
    """What is signed: "clientId{cid}deviceName{dn}productKey{pk}[timestamp{ts}]", where
    `client_id` is the id before its "|...|" parameters."""
    fields = {"clientId": client_id, "deviceName": device_name, "productKey": product_key}
    if timestamp is not None:
        fields["timestamp"] = str(timestamp)
    return "".join(key + fields[key] for key in sorted(fields))


def sign(secret: str, content: str, method: str = "hmacsha256") -> str:
    """hex(HMAC(secret, content)) with the hash of `method` (hmacmd5, hmacsha1, hmacsha256)."""
    return hmac.new(secret.encode(), content.encode(), SIGN_METHODS[method]).hexdigest()


def now_ms() -> int:
    """The timestamp SDKs send: milliseconds since the epoch."""
    return int(time.time() * 1000)


def signed_login(secret: str, device_name: str, product_key: str, timestamp: str | int | None, *,
                 method: str = "hmacsha256", client_id: str | None = None,
                 extra: Sequence[str] = ()) -> tuple[str, str]:
    """(MQTT client id, password) of the signed login. The client id is
    `{client_id}|securemode=3,signmethod={method}[,extra...][,timestamp={timestamp}]|`, with
    `client_id` the device name unless given; no timestamp when `timestamp` is None."""
    cid = device_name if client_id is None else client_id
    params = ["securemode=3", f"signmethod={method}", *extra]
    if timestamp is not None:
        params.append(f"timestamp={timestamp}")
    content = sign_content(cid, device_name, product_key, timestamp)
    return f"{cid}|{','.join(params)}|", sign(secret, content, method)
