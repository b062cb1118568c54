"""otacore/catalog/versions.py (N.N.N parsing and ordering) and otacore/downloads/signed_urls.py (signed download URLs)."""
from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

import pytest

from otacore.protocol.credentials import DeviceId
from otacore.downloads.signed_urls import UrlRejected, download_path, sign_url, verify_url
from otacore.catalog.versions import is_lower, is_version, parse_version

# --- versions -----------------------------------------------------------------------------


@pytest.mark.parametrize("text, numbers", [
    ("0.0.0", (0, 0, 0)), ("1.2.3", (1, 2, 3)), ("10.20.300", (10, 20, 300)), ("999999999.0.1", (999999999, 0, 1)),
])
def test_parse_version_reads_three_numbers(text, numbers):
    assert parse_version(text) == numbers and is_version(text)


@pytest.mark.parametrize("text", ["", "1", "1.0", "1.0.0.1", "v1.0.0", "01.0.0", "1.00.0", "1.0.0-beta", " 1.0.0",
                                  "1.0.0 ", "1..0", "a.b.c", "1.0.x", "1000000000.0.0", "-1.0.0"])
def test_parse_version_rejects_anything_else(text):
    assert parse_version(text) is None and not is_version(text)


def test_parse_version_rejects_trailing_newline():
    assert parse_version("1.0.0\n") is None


@pytest.mark.parametrize("reported, target", [("1.0.0", "1.0.1"), ("1.9.9", "2.0.0"), ("1.2.3", "1.10.0"),
                                              ("0.0.9", "0.0.10")])
def test_is_lower_compares_numerically(reported, target):
    assert is_lower(reported, target)
    assert not is_lower(target, reported)


def test_equal_version_is_not_lower():
    assert not is_lower("2.0.0", "2.0.0")


@pytest.mark.parametrize("reported", ["1.0", "v1.0.0", "garbage", "", "1.0.0-rc1"])
def test_unparseable_version_is_never_lower(reported):
    assert not is_lower(reported, "9.9.9")
    assert not is_lower("0.0.1", reported)


# --- signed URLs --------------------------------------------------------------------------

KEY = b"server-secret-key"
DEV = DeviceId("a1PK", "dev1")
NOW = 1_700_000_000


def signed(device: DeviceId = DEV, job: int = 42, ttl: int = 3600) -> tuple[str, dict[str, str]]:
    url = sign_url(KEY, "https://ota.example:8443", "abc123", "fw 2.0.0.bin", device, job, ttl, now=NOW)
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == "https://ota.example:8443"
    return parts.path, dict(parse_qsl(parts.query))


def test_signed_url_round_trip():
    path, query = signed()
    assert path == download_path("abc123", "fw 2.0.0.bin") == "/files/abc123/fw%202.0.0.bin"
    assert verify_url(KEY, path, query, now=NOW) == (DEV, 42)
    assert verify_url(KEY, path, query, now=NOW + 3600) == (DEV, 42)  # valid up to its expiry


def test_altered_signature_is_rejected():
    path, query = signed()
    query["sig"] = ("0" if query["sig"][0] != "0" else "1") + query["sig"][1:]
    with pytest.raises(UrlRejected, match="signature"):
        verify_url(KEY, path, query, now=NOW)


def test_altered_path_is_rejected():
    path, query = signed()
    with pytest.raises(UrlRejected, match="signature"):
        verify_url(KEY, path.replace("abc123", "abc124"), query, now=NOW)


@pytest.mark.parametrize("field, value", [("pk", "a1Other"), ("dn", "dev2"), ("job", "43"), ("exp", str(NOW + 99999))])
def test_url_for_other_device_job_or_expiry_is_rejected(field, value):
    path, query = signed()
    query[field] = value
    with pytest.raises(UrlRejected, match="signature"):
        verify_url(KEY, path, query, now=NOW)


def test_url_signed_with_other_key_is_rejected():
    path, query = signed()
    with pytest.raises(UrlRejected):
        verify_url(b"other-key", path, query, now=NOW)


def test_expired_url_is_rejected():
    path, query = signed(ttl=60)
    with pytest.raises(UrlRejected, match="expired"):
        verify_url(KEY, path, query, now=NOW + 61)


@pytest.mark.parametrize("missing", ["pk", "dn", "job", "exp", "sig"])
def test_url_missing_a_parameter_is_rejected(missing):
    path, query = signed()
    del query[missing]
    with pytest.raises(UrlRejected, match="missing or malformed"):
        verify_url(KEY, path, query, now=NOW)


def test_url_with_non_numeric_job_is_rejected():
    path, query = signed()
    query["job"] = "forty-two"
    with pytest.raises(UrlRejected, match="missing or malformed"):
        verify_url(KEY, path, query, now=NOW)
