"""TLS on both endpoints as devices built on Aliyun's C Link SDK speak it: TLS 1.2 with RSA key
exchange and AES-CBC only (its mbedtls configuration), beside clients that get TLS 1.3.
A handshake with nothing in common is answered with an alert, a log line and a count."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import subprocess
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import raw_mqtt
from support.harness import Device, OtaServer, free_port, write_catalog
from otacore.errors import ConfigError
from otacore.config.settings import settings_from_mapping

ROOT = Path(__file__).resolve().parents[1]
# What Aliyun's C Link SDK 4.2.0 offers (its mbedtls 2.13 configuration), PSK suites aside.
SDK_SUITES = "AES256-SHA256:AES256-SHA:AES128-SHA256:AES128-SHA"


@pytest.fixture
def cert(tmp_path: Path) -> Path:
    subprocess.run([str(ROOT / "scripts" / "dev-cert"), str(tmp_path / "tls")], check=True, capture_output=True)
    return tmp_path / "tls"


async def tls_server(root: Path, cert: Path, tls: dict | None = None) -> OtaServer:
    """MQTT over TLS on the listener and HTTPS on http.bind, the same certificate; a pushed
    `https` batch."""
    write_catalog(root, """
    - {name: secure, package: fw-1.1.0, type: upgrade, protocol: https, mode: dynamic, push: true}
    """)
    port = free_port()
    options = {"http": {"bind": f"127.0.0.1:{port}", "public_url": f"https://127.0.0.1:{port}",
                        "tls": {"certfile": str(cert / "dev-cert.pem"), "keyfile": str(cert / "dev-key.pem")}},
               "metrics": {"public": True}}
    if tls is not None:
        options["tls"] = tls
    listener = {"ssl": True, "certfile": str(cert / "dev-cert.pem"), "keyfile": str(cert / "dev-key.pem")}
    server = await OtaServer(root, http_port=port, options=options, listener=listener).start()
    server.http_url = f"https://127.0.0.1:{port}"
    return server


def client(cert: Path, *, sdk: bool = False, ciphers: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert / "dev-cert.pem"))
    if sdk or ciphers:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(ciphers or SDK_SUITES)
    return context


async def mqtt_handshake(server: OtaServer, context: ssl.SSLContext, device: str) -> tuple[str, str, int]:
    """(TLS version, cipher, CONNACK return code) of a raw MQTT CONNECT over TLS."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", server.mqtt_port, ssl=context, server_hostname="127.0.0.1"), 5)
    try:
        name, version, _ = writer.get_extra_info("cipher")
        writer.write(raw_mqtt.device_connect(device))
        return version, name, await raw_mqtt.connack(reader)
    finally:
        writer.close()


async def metrics(server: OtaServer) -> dict[tuple[str, str], float]:
    async with aiohttp.ClientSession() as http, \
            http.get(f"{server.http_url}/metrics", ssl=ssl.create_default_context(
                cafile=str(server.root / "tls" / "dev-cert.pem"))) as response:
        text = await response.text()
    return {(s.labels["endpoint"], s.labels["reason"]): s.value for family in text_string_to_metric_families(text)
            if family.name == "ota_tls_handshake_failures" for s in family.samples if s.name.endswith("_total")}


async def test_a_device_with_the_c_sdks_suites_upgrades_over_mqtt_tls_and_https(tmp_path: Path, cert: Path) -> None:
    server = await tls_server(tmp_path, cert)
    try:
        sdk = client(cert, sdk=True)
        assert await mqtt_handshake(server, sdk, "sdk-0") == ("TLSv1.2", "AES256-SHA256", 0)
        async with Device(server, "sdk-1", tls=sdk) as device:
            await device.inform("1.0.0")
            data = (await device.next_push())["data"]
            assert data["url"].startswith(server.http_url + "/files/")
            image = b""
            async with aiohttp.ClientSession() as http:
                while len(image) < data["size"]:  # Range requests, as the SDK downloads
                    end = min(len(image) + 65536, data["size"]) - 1
                    async with http.get(data["url"], ssl=sdk, headers={"Range": f"bytes={len(image)}-{end}"}) as answer:
                        assert answer.status == 206
                        assert answer.connection is None or \
                            answer.connection.transport.get_extra_info("cipher")[0] == "AES256-SHA256"
                        image += await answer.read()
            assert hashlib.md5(image).hexdigest() == data["sign"]
            await device.progress(100)
            await device.inform("1.1.0")
            await server.wait_state("sdk-1", "succeeded")
    finally:
        await server.stop()


async def test_a_default_client_still_gets_tls_1_3_on_both_endpoints(tmp_path: Path, cert: Path) -> None:
    server = await tls_server(tmp_path, cert)
    try:
        version, _, code = await mqtt_handshake(server, client(cert), "modern-1")
        assert (version, code) == ("TLSv1.3", 0)
        tls12 = client(cert, ciphers="ALL")  # a TLS 1.2 client that offers everything gets ECDHE
        assert (await mqtt_handshake(server, tls12, "modern-2"))[1].startswith("ECDHE-RSA-AES")
        async with aiohttp.ClientSession() as http, http.get(f"{server.http_url}/healthz", ssl=client(cert)) as answer:
            assert answer.status == 200
            assert answer.connection is None or answer.connection.transport.get_extra_info("ssl_object").version() \
                == "TLSv1.3"
    finally:
        await server.stop()


async def test_no_suite_in_common_gets_an_alert_a_log_line_and_a_count(
        tmp_path: Path, cert: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    server = await tls_server(tmp_path, cert, {"compatibility": "intermediate"})
    try:
        for port in (server.mqtt_port, server.http_port):
            with pytest.raises(ssl.SSLError) as refused:  # an alert, not a bare close
                await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", port, ssl=client(cert, sdk=True), server_hostname="127.0.0.1"), 5)
            assert "HANDSHAKE_FAILURE" in str(refused.value), refused.value
        reader, writer = await raw_mqtt.open_raw(server.mqtt_port)  # plain MQTT on the TLS port
        writer.write(raw_mqtt.device_connect("plain-1"))
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        lines = [r.getMessage() for r in caplog.records if r.name == "ota.tls"]
        assert any(line.startswith("TLS handshake failed on mqtt from 127.0.0.1:") and ": no_shared_cipher (" in line
                   for line in lines), lines
        assert any(line.startswith("TLS handshake failed on https from 127.0.0.1:") for line in lines), lines
        assert any(": plain_text (" in line for line in lines), lines
        assert await metrics(server) == {("mqtt", "no_shared_cipher"): 1, ("https", "no_shared_cipher"): 1,
                                         ("mqtt", "plain_text"): 1}
    finally:
        await server.stop()


async def test_modern_is_tls_1_3_only_and_a_cipher_list_replaces_the_levels(tmp_path: Path, cert: Path) -> None:
    server = await tls_server(tmp_path, cert, {"compatibility": "modern"})
    try:
        with pytest.raises(ssl.SSLError):
            await mqtt_handshake(server, client(cert, ciphers="ALL"), "old-1")
        assert (await mqtt_handshake(server, client(cert), "new-1"))[0] == "TLSv1.3"
    finally:
        await server.stop()
    server = await tls_server(tmp_path, cert, {"ciphers": "AES128-SHA256", "min_version": "1.2"})
    try:
        assert (await mqtt_handshake(server, client(cert, sdk=True), "one-1"))[1] == "AES128-SHA256"
    finally:
        await server.stop()


@pytest.mark.parametrize("tls, message", [
    ({"compatibility": "legacy"}, "tls.compatibility: 'legacy' is not a level; use one of iot, intermediate, modern"),
    ({"min_version": "1.0"}, "tls.min_version: '1.0' is not a TLS version this server speaks"),
    ({"min_version": 1.1}, "tls.min_version: '1.1' is not a TLS version this server speaks"),
    ({"ciphers": "NOTHING-LIKE-THIS"}, "tls.ciphers: OpenSSL selects no cipher from 'NOTHING-LIKE-THIS'"),
    ({"ciphers": 5}, "tls.ciphers: must be an OpenSSL cipher list"),
    ({"cipher": "ALL"}, "tls.cipher: unknown key; known keys are ciphers, compatibility, min_version"),
])
def test_bad_tls_settings_are_refused_with_the_key(tmp_path: Path, tls: dict, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        settings_from_mapping({"tls": tls}, tmp_path / "broker.yaml")
    assert message in str(refused.value), str(refused.value)


def test_yaml_numbers_for_min_version_are_read_as_versions(tmp_path: Path) -> None:
    settings = settings_from_mapping({"tls": {"min_version": 1.3}}, tmp_path / "broker.yaml")
    assert (settings.tls_compatibility, settings.tls_min_version, settings.tls_ciphers) == ("iot", "1.3", None)
