"""Who a device is: MQTT/HTTP usernames, and the signed and plain password forms (docs/protocol.md 1)."""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from otacore.catalog.model import DEVICE_NAME_RE, PRODUCT_KEY_RE, Catalog

_SIGN_HASHES = {"hmacmd5": hashlib.md5, "hmacsha1": hashlib.sha1, "hmacsha256": hashlib.sha256}


@dataclass(frozen=True)
class DeviceId:
    product_key: str
    device_name: str

    def __str__(self) -> str:
        return f"{self.product_key}/{self.device_name}"


def parse_username(username: str | None) -> DeviceId | None:
    """`{dn}&{pk}` -> DeviceId, or None when malformed."""
    if not username or username.count("&") != 1:
        return None
    device_name, product_key = username.split("&")
    if not DEVICE_NAME_RE.match(device_name) or not PRODUCT_KEY_RE.match(product_key):
        return None
    return DeviceId(product_key, device_name)


def _client_id_params(client_id: str) -> tuple[str, dict[str, str]] | None:
    """`{cid}|k1=v1,k2=v2|` -> (cid, params); None when the client id carries no sign params."""
    if "|" not in client_id:
        return None
    cid, _, rest = client_id.partition("|")
    params: dict[str, str] = {}
    for pair in rest.rstrip("|").split(","):
        key, sep, value = pair.partition("=")
        if sep:
            params[key.strip()] = value.strip()
    return cid, params


def signed_password(secret: str, method: str, client_id: str, device: DeviceId, timestamp: str | None) -> str | None:
    """The password an Aliyun SDK computes; None for an unknown sign method."""
    digest = _SIGN_HASHES.get(method.lower())
    if digest is None:
        return None
    fields = {"clientId": client_id, "deviceName": device.device_name, "productKey": device.product_key}
    if timestamp is not None:
        fields["timestamp"] = timestamp
    content = "".join(key + fields[key] for key in sorted(fields))
    return hmac.new(secret.encode(), content.encode(), digest).hexdigest()


def check_mqtt_login(catalog: Catalog, client_id: str | None, username: str | None,
                     password: str | bytes | None, allow_plain: bool) -> DeviceId | None:
    """The device this CONNECT proves to be, or None (unknown, malformed, or wrong secret)."""
    device = parse_username(username)
    if device is None or password is None:
        return None
    secret = catalog.device_secret(device.product_key, device.device_name)
    if secret is None:
        return None
    given = password.decode("utf-8", "replace") if isinstance(password, bytes) else str(password)
    parsed = _client_id_params(client_id or "")
    if parsed is not None and "signmethod" in parsed[1]:
        cid, params = parsed
        expected = signed_password(secret, params["signmethod"], cid, device, params.get("timestamp"))
        if expected is not None and hmac.compare_digest(expected.encode(), given.lower().encode()):
            return device
    if allow_plain and hmac.compare_digest(secret.encode(), given.encode()):
        return device
    return None


def check_http_login(catalog: Catalog, username: str, password: str, allow_plain: bool) -> DeviceId | None:
    """HTTP Basic for the device API: user `{dn}&{pk}`, password = the device secret."""
    if not allow_plain:
        return None
    return check_mqtt_login(catalog, None, username, password, allow_plain=True)
