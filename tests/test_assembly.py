"""The composition root (broker_plugin/assembly.py) in the setups users run: ota-server's own
broker, and someone's own broker.yaml with or without DeviceAuthPlugin; what a device can
make the log repeat; a database this version cannot read."""
from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest
from amqtt.broker import Broker

from otacore.storage.store import Store
from support.harness import UPGRADE_BATCH, Device, OtaServer, device_secret, free_port, write_catalog
from support.processes import otactl, ota_server_exit


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Records:
    handler = Records()
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


async def test_publishing_to_another_devices_ota_topic_is_logged_in_bursts(tmp_path: Path, records: Records) -> None:
    write_catalog(tmp_path, UPGRADE_BATCH)
    server = await OtaServer(tmp_path).start()
    try:
        async with Device(server, "d1") as d1:
            for i in range(200):
                await d1.publish("/ota/device/inform/a1Test/d2", {"id": str(i), "params": {"version": "1.0.0"}})
    finally:
        await server.stop()
    lines = [r for r in records.records if "not its own topic" in r.getMessage()]
    assert 1 <= len(lines) <= 20 and {r.name for r in lines} == {"ota.mqtt"}


async def own_broker(tmp_path: Path, plugins: dict, after: dict | None = None) -> tuple[Broker, int]:
    write_catalog(tmp_path, "- {name: up, package: fw-1.1.0, mode: dynamic, push: true}\n")
    mqtt_port, http_port = free_port(), free_port()
    ota = {"broker_plugin.ota.OtaPlugin": {
        "catalog": str(tmp_path / "ota.yaml"), "data_dir": str(tmp_path / "var"), "base_dir": str(tmp_path),
        "http": {"bind": f"127.0.0.1:{http_port}", "public_url": f"http://127.0.0.1:{http_port}"}}}
    broker = Broker({"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{mqtt_port}"}},
                     "plugins": {**plugins, **ota, **(after or {})}})
    await broker.start()
    return broker, mqtt_port


async def report_as_d1(port: int, password: str) -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier="d1", username="d1&a1Test", password=password) as client:
        await client.publish("/ota/device/inform/a1Test/d1", json.dumps({"id": "1", "params": {"version": "1.0.0"}}),
                             qos=1)
        await asyncio.sleep(0.3)


async def test_without_device_auth_the_ota_plugin_leaves_ota_topics_alone(tmp_path: Path, records: Records) -> None:
    # Anyone may log in as any device here: its reports must not reach the engine.
    broker, port = await own_broker(tmp_path, {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                                               {"allow_anonymous": True}})
    try:
        await report_as_d1(port, "anything")
        engine = broker.plugins_manager.get_plugin("OtaPlugin").runtime.engine
        assert not engine.state.versions and not engine.state.jobs
        assert any("DeviceAuthPlugin is not in this broker's plugins" in r.getMessage() for r in records.records)
    finally:
        await broker.shutdown()


async def test_with_device_auth_listed_after_the_ota_plugin_reports_reach_the_engine(tmp_path: Path) -> None:
    broker, port = await own_broker(tmp_path, {}, after={"broker_plugin.auth.DeviceAuthPlugin": {}})
    try:
        await report_as_d1(port, device_secret("d1"))
        engine = broker.plugins_manager.get_plugin("OtaPlugin").runtime.engine
        assert len(engine.state.jobs) == 1
    finally:
        await broker.shutdown()


def broker_yaml(tmp_path: Path) -> Path:
    config = tmp_path / "broker.yaml"
    config.write_text(f"""listeners:
  default: {{type: tcp, bind: "127.0.0.1:{free_port()}"}}
plugins:
  broker_plugin.auth.DeviceAuthPlugin: {{}}
  broker_plugin.ota.OtaPlugin:
    catalog: ota.yaml
    data_dir: var
    http: {{bind: "127.0.0.1:{free_port()}"}}
""")
    return config


def test_amqtt_internals_that_moved_are_one_line(tmp_path: Path) -> None:
    write_catalog(tmp_path, UPGRADE_BATCH)
    config = broker_yaml(tmp_path)
    script = ("import sys\nfrom amqtt.session import Session\ndel Session._on_enter_connected\n"
              "from broker_plugin.server import main\nsys.exit(main(['--config', sys.argv[1]]))\n")
    result = subprocess.run([sys.executable, "-c", script, str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("ota-server: cannot build the broker from its config: ") and "Session" in line, line


def test_a_batch_state_this_version_does_not_know_is_one_line_with_what_to_do(tmp_path: Path) -> None:
    write_catalog(tmp_path, UPGRADE_BATCH)
    config = broker_yaml(tmp_path)
    assert otactl(config, "validate").returncode == 0
    (tmp_path / "var").mkdir(exist_ok=True)
    async def make() -> None:
        store = await Store.open(tmp_path / "var" / "ota.sqlite3")
        await store.close()

    asyncio.run(make())
    with sqlite3.connect(tmp_path / "var" / "ota.sqlite3") as db:
        db.execute("INSERT INTO batches (name, package_id, fingerprint, state, created_at, reason, control) "
                   "VALUES ('legacy', 'fw-1.1.0', '{}', 'paused', 0, '', '{}')")
    for result in (ota_server_exit(config), otactl(config, "plan")):
        assert result.returncode == 1, result.stderr
        [line] = result.stderr.strip().splitlines()
        assert "batch 'legacy' in state 'paused'" in line and "otactl restore" in line, line
