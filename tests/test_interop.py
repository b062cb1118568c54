"""Interop: Aliyun's own device SDK, aliyun-iot-linkkit 1.2.13, upgrades unchanged.

Builds a separate venv (linkkit needs paho-mqtt < 2, the project uses 2.x) and runs
scripts/interop/linkkit_device.py against the real server. Needs PyPI, like ./scripts/setup."""
from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from support.harness import PK, PRODUCT_SECRET, UPGRADE_BATCH, OtaServer, free_port, write_catalog
from support.processes import linkkit_python

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "interop" / "linkkit_device.py"


@pytest.fixture(scope="module", name="linkkit_python")
def linkkit_python_fixture() -> Path:
    return linkkit_python()


async def test_linkkit_device_upgrades(tmp_path: Path, linkkit_python: Path) -> None:
    write_catalog(tmp_path, UPGRADE_BATCH)
    server = await OtaServer(tmp_path).start()
    try:
        result = await asyncio.to_thread(
            subprocess.run, [str(linkkit_python), str(SCRIPT), "lk-1", "--port", str(server.mqtt_port),
                             "--product", PK, "--product-secret", PRODUCT_SECRET],
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert "lk-1 linkkit: 1.0.0 -> 1.1.0 ok" in result.stdout
        await server.wait_state("lk-1", "succeeded")
    finally:
        await server.stop()


async def test_linkkit_device_upgrades_over_mqtt_tls_and_https(tmp_path: Path, linkkit_python: Path) -> None:
    subprocess.run([str(ROOT / "scripts" / "dev-cert"), str(tmp_path / "tls")], check=True, capture_output=True)
    cert, key = tmp_path / "tls" / "dev-cert.pem", tmp_path / "tls" / "dev-key.pem"
    write_catalog(tmp_path, """
    - {name: secure, package: fw-1.1.0, type: upgrade, protocol: https, mode: dynamic, push: true}
    """)
    port = free_port()
    server = await OtaServer(tmp_path, http_port=port, options={
        "http": {"bind": f"127.0.0.1:{port}", "public_url": f"https://127.0.0.1:{port}",
                 "tls": {"certfile": str(cert), "keyfile": str(key)}}},
        listener={"ssl": True, "certfile": str(cert), "keyfile": str(key)}).start()
    try:
        result = await asyncio.to_thread(
            subprocess.run, [str(linkkit_python), str(SCRIPT), "lk-tls-1", "--port", str(server.mqtt_port),
                             "--product", PK, "--product-secret", PRODUCT_SECRET, "--cafile", str(cert)],
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert "lk-tls-1 linkkit: 1.0.0 -> 1.1.0 ok" in result.stdout
        await server.wait_state("lk-tls-1", "succeeded")
        job = (await server.engine.store.jobs())[0]
        assert job.bytes_served == 160_000  # the whole image, over https
    finally:
        await server.stop()
