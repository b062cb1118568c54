"""`ota-server` and `otactl` as a user runs them: real processes, real files, loopback only."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from support.harness import UPGRADE_BATCH, Device, OtaServer, free_port, write_catalog
from support.processes import LiveServer, ota_server_exit, otactl, server_process, write_broker_yaml


async def wait_for_job_state(data_dir: Path, device: str, state: str, timeout: float = 10) -> None:
    """Poll the server's database (read-only, as otactl does) until the device's job is in `state`."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.closing(sqlite3.connect(f"file:{data_dir / 'ota.sqlite3'}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT state FROM jobs WHERE device_name = ? ORDER BY id DESC LIMIT 1",
                             (device,)).fetchone()
        if row and row[0] == state:
            return
        assert time.monotonic() < deadline, f"{device}: job {row}, expected {state}"
        await asyncio.sleep(0.05)


async def wait_for_output(command: Callable[[], subprocess.CompletedProcess[str]], text: str,
                          timeout: float = 10) -> subprocess.CompletedProcess[str]:
    deadline = time.monotonic() + timeout
    while text not in (result := await asyncio.to_thread(command)).stdout:
        assert time.monotonic() < deadline, f"{text!r} not in {result.stdout!r}"
        await asyncio.sleep(0.1)
    return result


def test_bad_catalog_is_a_one_line_exit(tmp_path: Path) -> None:
    write_catalog(tmp_path, """
    - {name: up, package: fw-9.9.9, type: upgrade, protocol: http, mode: dynamic}
    """)
    config = write_broker_yaml(tmp_path, free_port(), free_port())
    result = ota_server_exit(config)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "ota.yaml:" in result.stderr and "batches[0].package" in result.stderr and "fw-9.9.9" in result.stderr


def test_missing_config_and_bad_flags_exit_cleanly(tmp_path: Path) -> None:
    result = ota_server_exit(tmp_path / "nope.yaml")
    assert result.returncode == 1 and "not found" in result.stderr and "Traceback" not in result.stderr
    write_catalog(tmp_path)
    config = write_broker_yaml(tmp_path, free_port(), free_port())
    result = ota_server_exit(config, "--http-bind", "nonsense")
    assert result.returncode == 2 and "HOST:PORT" in result.stderr


def test_otactl_validate_reports_every_error_with_lines(tmp_path: Path) -> None:
    write_catalog(tmp_path, """
    - {name: up, package: fw-1.1.0, type: sideways, protocol: ftp, mode: dynamic}
    """)
    config = write_broker_yaml(tmp_path, free_port(), free_port())
    result = otactl(config, "validate")
    assert result.returncode == 1
    assert "batches[0].type" in result.stdout and "batches[0].protocol" in result.stdout
    assert f"{tmp_path / 'ota.yaml'}:" in result.stdout
    write_catalog(tmp_path, UPGRADE_BATCH)
    result = otactl(config, "validate")
    assert result.returncode == 0 and "OK: 1 products" in result.stdout


async def test_kill_9_mid_upgrade_then_status_and_reload(tmp_path: Path) -> None:
    write_catalog(tmp_path, UPGRADE_BATCH)
    server = await LiveServer(tmp_path).start()
    config, client_view = server.config, server.view
    try:
        async with Device(client_view, "k-1") as device:
            await device.inform("1.0.0")
            await device.next_push()
            await device.progress(60, "downloading")
            await wait_for_job_state(tmp_path / "var", "k-1", "in_progress")
        await server.kill()  # no shutdown: a crash
        await server.start()
        status = await asyncio.to_thread(otactl, config, "status", "up-1.1.0")
        assert status.returncode == 0, status.stderr
        line = next(l for l in status.stdout.splitlines() if l.startswith("k-1"))
        assert "in_progress" in line and "60%" in line and "downloading" in line
        async with Device(client_view, "k-1") as device:
            await device.progress(100, "installed")
            await device.inform("1.1.0")
            await wait_for_job_state(tmp_path / "var", "k-1", "succeeded")
        summary = await asyncio.to_thread(otactl, config, "status")
        assert "up-1.1.0" in summary.stdout and "100%" in summary.stdout and "succeeded 1" in summary.stdout
        reload = await asyncio.to_thread(otactl, config, "reload")
        assert reload.returncode == 0 and "reloaded" in reload.stdout
        retry = await asyncio.to_thread(otactl, config, "retry", "up-1.1.0")
        assert retry.returncode == 0 and "0 job(s) retried" in retry.stdout
        cancel = await asyncio.to_thread(otactl, config, "cancel", "no-such-batch", "k-1")
        assert cancel.returncode == 1 and "no batch named 'no-such-batch'" in cancel.stderr
    finally:
        output = await server.stop()
    assert "Traceback" not in output


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX only")
async def test_sighup_reloads(tmp_path: Path) -> None:
    write_catalog(tmp_path)
    config = write_broker_yaml(tmp_path, free_port(), free_port())
    process = server_process(config)
    await asyncio.to_thread(process.start)
    try:
        write_catalog(tmp_path, UPGRADE_BATCH)
        assert process.process is not None
        os.kill(process.process.pid, signal.SIGHUP)
        await wait_for_output(lambda: otactl(config, "status"), "running")
    finally:
        output = await asyncio.to_thread(process.stop)
    assert "catalog reloaded" in output


async def test_otactl_reaches_a_tls_only_server(tmp_path: Path) -> None:
    subprocess.run([str(Path(__file__).resolve().parents[1] / "scripts" / "dev-cert"), str(tmp_path / "tls")],
                   check=True, capture_output=True)
    write_catalog(tmp_path, UPGRADE_BATCH.replace("protocol: http", "protocol: https"))
    http_port = free_port()
    config = write_broker_yaml(tmp_path, free_port(), http_port)
    text = config.read_text().replace(
        f"public_url: http://127.0.0.1:{http_port}}}",
        f"public_url: https://127.0.0.1:{http_port}, tls: {{certfile: tls/dev-cert.pem, keyfile: tls/dev-key.pem}}}}")
    config.write_text(text)
    process = server_process(config)
    await asyncio.to_thread(process.start)
    try:
        result = await asyncio.to_thread(otactl, config, "reload")
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        await asyncio.to_thread(process.stop)


async def test_otactl_validate_applies_the_reload_rules_of_the_database(tmp_path: Path) -> None:
    write_catalog(tmp_path, UPGRADE_BATCH)
    server = await OtaServer(tmp_path).start()
    await server.stop()
    write_catalog(tmp_path, UPGRADE_BATCH.replace("protocol: http", "protocol: mqtt"))
    config = write_broker_yaml(tmp_path, free_port(), free_port())
    result = await asyncio.to_thread(otactl, config, "validate")
    assert result.returncode == 1 and "cannot change protocol of a started batch" in result.stdout


async def test_busy_port_or_busy_data_dir_is_a_one_line_exit(tmp_path: Path) -> None:
    write_catalog(tmp_path, UPGRADE_BATCH)
    first = await LiveServer(tmp_path).start()
    config, mqtt_port = first.config, first.mqtt_port
    try:
        # The same config again: data_dir (and both ports) are taken.
        second = await asyncio.to_thread(ota_server_exit, config)
        assert second.returncode == 1 and "already in use" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1 and "Traceback" not in second.stderr
        # Another data_dir, same MQTT port.
        third = await asyncio.to_thread(ota_server_exit, config, "--data-dir", str(tmp_path / "other"),
                                        "--http-bind", f"127.0.0.1:{free_port()}")
        assert third.returncode == 1 and f"127.0.0.1:{mqtt_port} already in use" in third.stderr
        assert len(third.stderr.strip().splitlines()) == 1
        # Free ports, same data_dir: the lock refuses it before it touches the database.
        fourth = await asyncio.to_thread(ota_server_exit, config, "--mqtt-bind", f"127.0.0.1:{free_port()}",
                                         "--http-bind", f"127.0.0.1:{free_port()}")
        assert fourth.returncode == 1 and "another ota-server (pid" in fourth.stderr
        assert len(fourth.stderr.strip().splitlines()) == 1
        status = await asyncio.to_thread(otactl, config, "reload")  # the first server is untouched
        assert status.returncode == 0, status.stdout + status.stderr
    finally:
        await first.stop()


def test_status_tables_escape_what_devices_sent() -> None:
    from otacore.cli.main import _table
    table = _table([["DEVICE", "LAST MESSAGE"], ["d1", "ok\x1b[2J\nFAKE ROW  installed"]])
    assert "\x1b" not in table and table.count("\n") == 1
    assert "\\x1b[2J\\nFAKE ROW" in table
