"""otacore/protocol/credentials.py: usernames, the Aliyun signed password, and the plain secret (docs/protocol.md 1)."""
from __future__ import annotations

import hashlib
import hmac

import pytest

from devicekit import signing
from otacore.catalog.model import derive_device_secret, load_catalog
from otacore.protocol.credentials import DeviceId, check_http_login, check_mqtt_login, parse_username
from otacore.config.settings import settings_from_mapping

SECRET = "dev1-secret"
LINKKIT_CLIENT_ID = "a1PK&dev1|securemode=3,signmethod=hmacsha1,ext=1,_ss=1,lan=Python,_v=1.2.13,timestamp=1795728922|"
LINKKIT_CONTENT = "clientIda1PK&dev1deviceNamedev1productKeya1PKtimestamp1795728922"


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("creds")
    (root / "packages").mkdir()
    (root / "ota.yaml").write_text(
        "products:\n"
        "  - key: a1PK\n"
        "    devices:\n"
        f"      - name: dev1\n        secret: {SECRET}\n"
        "  - key: a1Fleet\n"
        "    secret: fleet-secret\n")
    return load_catalog(root / "ota.yaml", settings_from_mapping({}, root / "broker.yaml"))


def sign(method: str, content: str, secret: str = SECRET) -> str:
    """The password a device sends: devicekit's signer, over exactly `content`."""
    return signing.sign(secret, content, method)


# --- usernames ----------------------------------------------------------------------------

def test_parse_username_splits_device_and_product():
    assert parse_username("dev1&a1PK") == DeviceId("a1PK", "dev1")
    assert str(parse_username("gw-0001&a1GateWay")) == "a1GateWay/gw-0001"


@pytest.mark.parametrize("username", [None, "", "dev1", "dev1&", "&a1PK", "dev1&a1PK&x", "dev 1&a1PK",
                                      "dev1&a1/PK", "dev1&" + "p" * 65])
def test_parse_username_rejects_malformed(username):
    assert parse_username(username) is None


def test_parse_username_rejects_trailing_newline():
    assert parse_username("dev1\n&a1PK") is None


# --- signed passwords ---------------------------------------------------------------------

def test_linkkit_example_content_is_what_the_protocol_says(catalog):
    expected = sign("hmacsha1", LINKKIT_CONTENT)
    assert check_mqtt_login(catalog, LINKKIT_CLIENT_ID, "dev1&a1PK", expected, allow_plain=False) == \
        DeviceId("a1PK", "dev1")


@pytest.mark.parametrize("method", ["hmacmd5", "hmacsha1", "hmacsha256"])
def test_signed_password_with_timestamp_is_accepted(catalog, method):
    client_id = LINKKIT_CLIENT_ID.replace("signmethod=hmacsha1", f"signmethod={method}")
    password = sign(method, LINKKIT_CONTENT)
    assert check_mqtt_login(catalog, client_id, "dev1&a1PK", password, allow_plain=False) == DeviceId("a1PK", "dev1")
    assert check_mqtt_login(catalog, client_id, "dev1&a1PK", password.encode(), allow_plain=False) is not None


@pytest.mark.parametrize("method", ["hmacmd5", "hmacsha1", "hmacsha256"])
def test_signed_password_without_timestamp_is_accepted(catalog, method):
    client_id = f"a1PK&dev1|securemode=3,signmethod={method}|"
    password = sign(method, "clientIda1PK&dev1deviceNamedev1productKeya1PK")
    assert check_mqtt_login(catalog, client_id, "dev1&a1PK", password, allow_plain=False) == DeviceId("a1PK", "dev1")


def test_signed_password_ignores_hex_case(catalog):
    password = sign("hmacsha1", LINKKIT_CONTENT).upper()
    assert check_mqtt_login(catalog, LINKKIT_CLIENT_ID, "dev1&a1PK", password, allow_plain=False) is not None


def test_signed_password_with_derived_secret(catalog):
    client_id = "cam-7|signmethod=hmacsha256,timestamp=1700000000000|"
    content = "clientIdcam-7deviceNamecam-7productKeya1Fleettimestamp1700000000000"
    password = sign("hmacsha256", content, derive_device_secret("fleet-secret", "cam-7"))
    assert check_mqtt_login(catalog, client_id, "cam-7&a1Fleet", password, allow_plain=False) == \
        DeviceId("a1Fleet", "cam-7")


def test_signed_password_with_wrong_secret_is_rejected(catalog):
    password = sign("hmacsha1", LINKKIT_CONTENT, secret="not-the-secret")
    assert check_mqtt_login(catalog, LINKKIT_CLIENT_ID, "dev1&a1PK", password, allow_plain=True) is None


def test_signed_password_for_other_timestamp_is_rejected(catalog):
    password = sign("hmacsha1", LINKKIT_CONTENT.replace("1795728922", "1795728923"))
    assert check_mqtt_login(catalog, LINKKIT_CLIENT_ID, "dev1&a1PK", password, allow_plain=True) is None


def test_unknown_sign_method_is_rejected(catalog):
    client_id = LINKKIT_CLIENT_ID.replace("hmacsha1", "hmacsha512")
    password = hmac.new(SECRET.encode(), LINKKIT_CONTENT.encode(), hashlib.sha512).hexdigest()
    assert check_mqtt_login(catalog, client_id, "dev1&a1PK", password, allow_plain=True) is None


def test_unknown_device_is_rejected(catalog):
    password = sign("hmacsha1", LINKKIT_CONTENT.replace("dev1", "dev2"))
    client_id = LINKKIT_CLIENT_ID.replace("dev1", "dev2")
    assert check_mqtt_login(catalog, client_id, "dev2&a1PK", password, allow_plain=True) is None
    assert check_mqtt_login(catalog, "x", "dev2&a1PK", SECRET, allow_plain=True) is None
    assert check_mqtt_login(catalog, "x", "dev1&a1Nope", SECRET, allow_plain=True) is None


@pytest.mark.parametrize("username", [None, "", "dev1", "a1PK&dev1&x", "dev1 & a1PK"])
def test_malformed_username_is_rejected(catalog, username):
    assert check_mqtt_login(catalog, LINKKIT_CLIENT_ID, username, SECRET, allow_plain=True) is None


def test_missing_password_is_rejected(catalog):
    assert check_mqtt_login(catalog, LINKKIT_CLIENT_ID, "dev1&a1PK", None, allow_plain=True) is None


# --- plain secret -------------------------------------------------------------------------

def test_plain_secret_accepted_only_when_allowed(catalog):
    assert check_mqtt_login(catalog, "anything", "dev1&a1PK", SECRET, allow_plain=True) == DeviceId("a1PK", "dev1")
    assert check_mqtt_login(catalog, "anything", "dev1&a1PK", SECRET.encode(), allow_plain=True) is not None
    assert check_mqtt_login(catalog, "anything", "dev1&a1PK", SECRET, allow_plain=False) is None


def test_plain_secret_with_a_signing_client_id_follows_allow_plain(catalog):
    assert check_mqtt_login(catalog, LINKKIT_CLIENT_ID, "dev1&a1PK", SECRET, allow_plain=True) is not None
    assert check_mqtt_login(catalog, LINKKIT_CLIENT_ID, "dev1&a1PK", SECRET, allow_plain=False) is None


def test_plain_wrong_secret_is_rejected(catalog):
    assert check_mqtt_login(catalog, "anything", "dev1&a1PK", SECRET + "x", allow_plain=True) is None
    assert check_mqtt_login(catalog, "anything", "dev1&a1PK", "", allow_plain=True) is None


def test_http_login_is_plain_secret_only(catalog):
    assert check_http_login(catalog, "dev1&a1PK", SECRET, allow_plain=True) == DeviceId("a1PK", "dev1")
    assert check_http_login(catalog, "dev1&a1PK", SECRET, allow_plain=False) is None
    assert check_http_login(catalog, "dev1&a1PK", "wrong", allow_plain=True) is None
