"""GET /metrics (docs/metrics.md): the Prometheus text format behind the admin token (or
`metrics.public`), parsed with prometheus_client's own parser, and figures that move with a
real upgrade through the broker and the file server."""
from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.harness import Device, OtaServer, write_catalog
from otacore.protocol.codec import decode_block_reply
from otacore.errors import ConfigError
from otacore.config.settings import settings_from_mapping

BATCH = "up-1.1.0"  # conftest's pushed, dynamic http batch

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def get_metrics(server: OtaServer, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, \
            session.get(server.http_url + "/metrics", headers=headers or {}) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.text()


async def scrape(server: OtaServer) -> Samples:
    status, content_type, text = await get_metrics(server, {"Authorization": f"Bearer {server.admin_token}"})
    assert status == 200, text
    assert content_type.startswith("text/plain; version=0.0.4"), content_type
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def download(url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, await response.read()


async def test_counters_move_with_a_real_upgrade(server: OtaServer) -> None:
    async with asyncio.timeout(10):
        before = await scrape(server)
        assert value(before, "ota_reloads_total", result="ok") == 1  # the start
        assert value(before, "ota_pushes_sent_total") == 0
        assert value(before, "ota_devices_online") == 0
        assert value(before, "ota_batch_rollout_state", batch=BATCH, state="active") == 1
        async with Device(server, "met-1") as device:
            await device.inform("1.0.0")
            data = (await device.next_push())["data"]
            during = await scrape(server)
            assert value(during, "ota_devices_online") == 1 and value(during, "ota_mqtt_connections") >= 1
            assert value(during, "ota_pushes_sent_total") == 1
            status, first = await download(data["url"], {"Range": "bytes=0-9999"})
            assert status == 206
            status, rest = await download(data["url"], {"Range": "bytes=10000-"})
            assert status == 206 and len(first + rest) == data["size"]
            status, _ = await download(data["url"].replace("sig=", "sig=0"), {})
            assert status == 403  # a forged signature
            await device.progress(50, "downloading")
            await device.progress(100, "installed, rebooting")
            await server.wait_state("met-1", "installed")
        async with Device(server, "met-1") as device:
            await device.inform("1.1.0")
            await server.wait_state("met-1", "succeeded")
        after = await scrape(server)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("ota_mqtt_messages_received_total", kind="version") == 2
    assert moved("ota_mqtt_messages_received_total", kind="progress") == 2
    assert moved("ota_mqtt_messages_received_total", kind="firmware") == 0
    assert moved("ota_pushes_sent_total") == 1
    assert moved("ota_bytes_served_total", protocol="http") == data["size"]
    assert moved("ota_bytes_served_total", protocol="mqtt") == 0
    assert value(after, "ota_download_requests_total", status="206") == 2
    assert value(after, "ota_download_requests_total", status="403") == 1
    assert value(after, "ota_jobs", batch=BATCH, state="succeeded") == 1
    assert value(after, "ota_jobs", batch=BATCH, state="in_progress") == 0
    assert value(after, "ota_failed_jobs", batch=BATCH, kind="download") == 0
    assert value(after, "ota_devices_online") == 0  # both connections closed


async def test_failures_by_kind_pause_and_reloads(server: OtaServer) -> None:
    async with asyncio.timeout(10):
        for name, step in (("met-f1", "-2"), ("met-f2", "-2"), ("met-f3", "-4")):
            async with Device(server, name) as device:
                await device.inform("1.0.0")
                await device.next_push()
                await device.progress(step, "failed on purpose")
                await server.wait_state(name, "failed")
        await server.engine.pause(BATCH)
        write_catalog(server.root, "- {name: broken, package: no-such-package, type: upgrade}")
        with pytest.raises(ConfigError):
            await server.engine.reload()
        samples = await scrape(server)
    assert value(samples, "ota_jobs", batch=BATCH, state="failed") == 3
    assert value(samples, "ota_failed_jobs", batch=BATCH, kind="download") == 2
    assert value(samples, "ota_failed_jobs", batch=BATCH, kind="flash") == 1
    assert value(samples, "ota_failed_jobs", batch=BATCH, kind="timeout") == 0
    assert value(samples, "ota_batch_rollout_state", batch=BATCH, state="paused") == 1
    assert value(samples, "ota_batch_rollout_state", batch=BATCH, state="active") == 0
    assert value(samples, "ota_reloads_total", result="ok") == 1
    assert value(samples, "ota_reloads_total", result="error") == 1


async def test_mqtt_blocks_count_as_mqtt_bytes(tmp_path: Path) -> None:
    write_catalog(tmp_path, "- {name: over-mqtt, package: fw-1.1.0, type: upgrade, protocol: mqtt, mode: dynamic, "
                            "push: true}")
    server = await OtaServer(tmp_path).start()
    try:
        async with asyncio.timeout(10), Device(server, "met-m") as device:
            await device.inform("1.0.0")
            stream = (await device.next_push())["data"]["streamId"]
            for offset in (0, 4096):
                await device.publish("/sys/a1Test/met-m/thing/file/download", {"id": "1", "params": {
                    "fileInfo": {"streamId": stream, "fileId": 1}, "fileBlock": {"size": 4096, "offset": offset}}})
                header, block = decode_block_reply(await device.receive("download_reply"))
                assert header["code"] == 200 and block is not None and len(block) == 4096
            samples = await scrape(server)
    finally:
        await server.stop()
    assert value(samples, "ota_bytes_served_total", protocol="mqtt") == 8192
    assert value(samples, "ota_bytes_served_total", protocol="http") == 0
    assert value(samples, "ota_mqtt_messages_received_total", kind="block") == 2


async def test_the_admin_token_is_required(server: OtaServer) -> None:
    status, _, text = await get_metrics(server)
    assert status == 401 and "admin token required" in text
    status, _, text = await get_metrics(server, {"Authorization": "Bearer not-the-token"})
    assert status == 401 and "wrong admin token" in text
    status, _, text = await get_metrics(server, {"Authorization": f"Bearer {server.admin_token}"})
    assert status == 200 and "ota_jobs" in text


async def test_metrics_public_needs_no_token(tmp_path: Path) -> None:
    write_catalog(tmp_path)
    server = await OtaServer(tmp_path, options={"metrics": {"public": True}}).start()
    try:
        status, content_type, text = await get_metrics(server)
    finally:
        await server.stop()
    assert status == 200 and content_type.startswith("text/plain")
    assert any(family.name == "ota_mqtt_connections" for family in text_string_to_metric_families(text))


async def test_process_metrics_are_there(server: OtaServer) -> None:
    samples = await scrape(server)
    names = {name for name, _ in samples}
    # prometheus_client's ProcessCollector and PlatformCollector, on this server's own registry.
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
            "process_start_time_seconds", "python_info"} <= names
    assert value(samples, "process_resident_memory_bytes") > 0


@pytest.mark.parametrize("metrics, error", [
    ({"public": "yes"}, "metrics.public: must be true or false"),
    ({"open": True}, "metrics.open: unknown key; known keys are public"),
    ("public", "metrics: must be a mapping"),
])
def test_metrics_settings_are_checked(tmp_path: Path, metrics: object, error: str) -> None:
    with pytest.raises(ConfigError) as raised:
        settings_from_mapping({"metrics": metrics}, tmp_path / "broker.yaml")
    assert error in str(raised.value)


def test_metrics_are_private_by_default(tmp_path: Path) -> None:
    assert settings_from_mapping({}, tmp_path / "broker.yaml").metrics_public is False
    assert settings_from_mapping({"metrics": {"public": True}}, tmp_path / "broker.yaml").metrics_public is True
