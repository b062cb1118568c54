"""HTTPS downloads for `https` batches: TLS on http.bind, or on its own http.tls.bind."""
from __future__ import annotations

import hashlib
import ssl
import subprocess
from pathlib import Path

import aiohttp
import pytest

from support.harness import Device, OtaServer, free_port, write_catalog

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    subprocess.run([str(ROOT / "scripts" / "dev-cert"), str(tmp_path / "tls")], check=True, capture_output=True)
    return tmp_path / "tls" / "dev-cert.pem", tmp_path / "tls" / "dev-key.pem"


def trusting(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


async def test_https_batch_downloads_over_tls(tmp_path: Path, cert: tuple[Path, Path]) -> None:
    write_catalog(tmp_path, """
    - {name: secure, package: fw-1.1.0, type: upgrade, protocol: https, mode: dynamic}
    """)
    port = free_port()
    options = {"http": {"bind": f"127.0.0.1:{port}", "public_url": f"https://127.0.0.1:{port}",
                        "tls": {"certfile": str(cert[0]), "keyfile": str(cert[1])}}}
    server = await OtaServer(tmp_path, http_port=port, options=options).start()
    try:
        async with Device(server, "tls-1") as device:
            await device.inform("1.0.0")
            data = (await device.next_push())["data"]
        assert data["url"].startswith(f"https://127.0.0.1:{port}/files/")
        async with aiohttp.ClientSession() as http:
            async with http.get(data["url"], ssl=trusting(cert[0]), headers={"Range": "bytes=0-"}) as response:
                body = await response.read()
            assert response.status == 206 and hashlib.md5(body).hexdigest() == data["sign"]
            with pytest.raises(aiohttp.ClientError):  # plain HTTP is not spoken on a TLS port
                async with http.get(data["url"].replace("https://", "http://")) as response:
                    await response.read()
    finally:
        await server.stop()


async def test_separate_tls_listener_keeps_plain_http_for_http_batches(tmp_path: Path,
                                                                       cert: tuple[Path, Path]) -> None:
    write_catalog(tmp_path, """
    - {name: secure, package: fw-1.1.0, type: upgrade, protocol: https, mode: dynamic, devices: [s-1]}
    - {name: plain, package: fw-1.1.0, type: upgrade, protocol: http, mode: dynamic, devices: [p-1]}
    """)
    http_port, tls_port = free_port(), free_port()
    options = {"http": {"bind": f"127.0.0.1:{http_port}", "public_url": f"http://127.0.0.1:{http_port}",
                        "tls": {"certfile": str(cert[0]), "keyfile": str(cert[1]), "bind": f"127.0.0.1:{tls_port}",
                                "public_url": f"https://localhost:{tls_port}"}}}
    server = await OtaServer(tmp_path, http_port=http_port, options=options).start()
    try:
        async with Device(server, "s-1") as secure, Device(server, "p-1") as plain:
            await secure.inform("1.0.0")
            await plain.inform("1.0.0")
            secure_url = (await secure.next_push())["data"]["url"]
            plain_url = (await plain.next_push())["data"]["url"]
        assert secure_url.startswith(f"https://localhost:{tls_port}/") and plain_url.startswith(server.http_url)
        async with aiohttp.ClientSession() as http:
            async with http.head(secure_url, ssl=trusting(cert[0])) as response:
                assert response.status == 200  # name in the certificate: localhost
            async with http.head(plain_url) as response:
                assert response.status == 200
    finally:
        await server.stop()
