"""A report acknowledged is a report counted, and one device's reports count in the order sent.

The OTA plugin decides device reports in the broker's packet path, before the PUBACK
(broker_plugin/amqtt_patches/upstream.py `set_upstream_consumer`): so a batch started right after the
last PUBACK of a burst must take every device of it, and reports a device sends back to back
(QoS 0 or 1, without waiting) must end as they would one by one.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

from support.harness import PK, Device, OtaServer, job_of, write_catalog
from support.link import Link
from otacore.protocol.credentials import DeviceId

STATIC_BATCH = """
- {name: static-up, package: fw-1.1.0, type: upgrade, protocol: http, mode: static, push: true}
"""
BURST = 500


async def test_a_static_batch_started_after_the_last_puback_targets_every_device(tmp_path: Path) -> None:
    write_catalog(tmp_path)  # no batch yet
    server = await OtaServer(tmp_path).start()
    state = server.engine.state
    names = [f"burst-{i:04d}" for i in range(BURST)]
    not_counted: list[str] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            gate = asyncio.Semaphore(100)

            async def connect(name: str) -> Device:
                async with gate:
                    return await stack.enter_async_context(Device(server, name))

            devices = await asyncio.gather(*(connect(name) for name in names))

            async def report(device: Device) -> None:
                await device.inform("1.0.0")  # QoS 1: returns once the PUBACK is in
                if state.version(DeviceId(PK, device.name), "default") != "1.0.0":  # no await in between
                    not_counted.append(device.name)

            await asyncio.gather(*(report(device) for device in devices))
            # The last PUBACK is in: start the batch now.
            write_catalog(tmp_path, STATIC_BATCH)
            await server.engine.reload()
            assert not not_counted, f"{len(not_counted)} acknowledged reports not counted: {not_counted[:5]}"
            missing = set(names) - state.targets["static-up"]
            assert not missing, f"{len(missing)} acknowledged devices not in the static batch: {sorted(missing)[:5]}"
            await server.engine.settled()
            assert await server.engine.store.targets("static-up") == set(names)
            pushes = await asyncio.gather(*(device.next_push(10) for device in devices))
            assert {push["data"]["version"] for push in pushes} == {"1.1.0"}
            jobs = {job.id: job for job in await server.engine.store.jobs("static-up")}
            assert {jobs[job_of(push)].device.device_name for push in pushes} == set(names)
            assert {job.state for job in jobs.values()} == {"notified"} and len(jobs) == BURST
    finally:
        await server.stop()


def reports(name: str, steps: list[tuple[str, str, int]]) -> list[tuple[str, dict[str, Any], int]]:
    """("inform", version, qos) / ("progress", step, qos) as (topic, payload, qos)."""
    out = []
    for number, (kind, value, qos) in enumerate(steps, 1):
        params = {"version": value} if kind == "inform" else {"step": value, "desc": f"report {number}"}
        out.append((f"/ota/device/{kind}/{PK}/{name}", {"id": str(number), "params": params}, qos))
    return out


# Each sequence ends differently (state, progress, history) if any two of its reports swap.
SEQUENCES = {
    # 50 before the job exists is ignored; 1.1.0 before 100 leaves 100 ignored: no `installed`.
    "success": ([("inform", "1.0.0", 1), ("progress", "50", 1), ("progress", "100", 1), ("inform", "1.1.0", 1)],
                ("succeeded", 100, ["queued", "notified", "in_progress", "installed", "succeeded"])),
    # The old version after 100 is a boot failure; before 100 it is a plain report, then `installed`.
    "boot failure": ([("inform", "1.0.0", 0), ("progress", "30", 1), ("progress", "100", 0), ("inform", "1.0.0", 1)],
                     ("failed", 100, ["queued", "notified", "in_progress", "installed", "failed"])),
    # 10 after 60 leaves progress 10; -3 before 60 ignores 60; 100 before -3 adds `installed`.
    "step failure": ([("inform", "1.0.0", 1), ("progress", "10", 0), ("progress", "60", 0), ("progress", "-3", 0),
                      ("progress", "100", 1)],
                     ("failed", 60, ["queued", "notified", "in_progress", "failed"])),
}


async def outcome(server: OtaServer, name: str) -> tuple[str, int, list[str]]:
    """The device's one job as the database has it: state, progress, the states of its history."""
    await server.engine.settled()
    jobs = [job for job in await server.engine.store.jobs() if job.device.device_name == name]
    assert len(jobs) == 1, jobs
    return jobs[0].state, jobs[0].progress, [to for _, _, to, _, _ in await server.engine.store.history(jobs[0].id)]


@pytest.mark.parametrize("sequence", list(SEQUENCES))
async def test_reports_sent_back_to_back_count_in_order(server: OtaServer, sequence: str) -> None:
    steps, expected = SEQUENCES[sequence]
    for round_number in range(20):
        # aiomqtt: each publish is handed to paho at once; none waits for the one before.
        name = f"order-{round_number}"
        async with Device(server, name) as device:
            sends = [device.publish(topic, payload, qos) for topic, payload, qos in reports(name, steps)]
            await asyncio.gather(*sends)
            await device.next_push()
        assert await outcome(server, name) == expected, f"round {round_number}"


@pytest.mark.parametrize("sequence", list(SEQUENCES))
async def test_reports_in_one_tcp_segment_count_in_order(server: OtaServer, sequence: str) -> None:
    steps, expected = SEQUENCES[sequence]
    names = [f"segment-{i}" for i in range(50)]
    links = await asyncio.gather(*(Link.open(server.mqtt_port, name) for name in names))
    try:
        # Every PUBLISH of a device in one write: the broker reads them in one go.
        await asyncio.gather(*(link.publish_many(reports(name, steps)) for name, link in zip(names, links)))
        for link in links:
            push = await link.next_message(5)
            assert push is not None and json.loads(push[1])["data"]["version"] == "1.1.0"
        results = {name: await outcome(server, name) for name in names}
        wrong = {name: result for name, result in results.items() if result != expected}
        assert not wrong, f"{len(wrong)} devices out of order: {list(wrong.items())[:3]}"
    finally:
        for link in links:
            await link.close()


async def test_a_burst_of_progress_ends_on_the_last_value_sent(server: OtaServer) -> None:
    # In-progress values are telemetry (no history event); the last one sent is the one kept.
    async with Device(server, "telemetry") as device:
        await device.inform("1.0.0")
        await device.next_push()
        steps = [str(step) for step in range(1, 100)]
        await asyncio.gather(*(device.progress(step, f"at {step}") for step in steps))
    await server.engine.settled()
    job = (await server.engine.store.jobs("up-1.1.0"))[0]
    assert (job.state, job.progress, job.message) == ("in_progress", 99, "at 99")
