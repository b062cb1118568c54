"""Interop: Aliyun's own device SDK, aliyun-iot-linkkit 1.2.13, upgrades unchanged.

Builds a separate venv (linkkit needs paho-mqtt < 2, the project uses 2.x) and runs
scripts/interop/linkkit_device.py against the real server. Needs PyPI, like ./scripts/setup."""
from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from harness import OtaServer, PK, PRODUCT_SECRET, write_catalog
from conftest import UPGRADE_BATCH

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "interop" / "linkkit_device.py"


@pytest.fixture(scope="module")
def linkkit_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("linkkit") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "aliyun-iot-linkkit==1.2.13", "paho-mqtt<2"],
                   check=True, capture_output=True)
    return venv / "bin" / "python"


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
