"""Stress (slow, `./scripts/test -m slow`): a mixed fleet through the real server, and the
database agreeing with what every device saw."""
from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from devicekit import simulator
from support.harness import PK, PRODUCT_SECRET, OtaServer, write_catalog

pytestmark = pytest.mark.slow


def fleet(port: int, count: int) -> list[simulator.DeviceConfig]:
    configs = []
    for i in range(count):
        kind = i % 6
        configs.append(simulator.DeviceConfig(
            device_name=f"st-{i:04d}", product_key=PK, product_secret=PRODUCT_SECRET, mqtt_port=port,
            chunk=16384, timeout=120,
            drop_at=40 if kind == 1 else None, ask=kind == 2, fail_step=-2 if kind == 3 else None,
            boot_fail=kind == 4, sign_method=("hmacmd5", "hmacsha1", "hmacsha256")[i % 3],
            plain_password=kind == 5))
    return configs


@pytest.mark.parametrize("protocol", ["http", "mqtt"])
async def test_mixed_fleet_ends_as_each_device_saw_it(tmp_path: Path, protocol: str) -> None:
    write_catalog(tmp_path, f"""
    - {{name: stress, package: fw-1.1.0, type: upgrade, protocol: {protocol}, mode: dynamic, push: true}}
    """)
    server = await OtaServer(tmp_path).start()
    try:
        results = await simulator.run_fleet(fleet(server.mqtt_port, 300), concurrency=100)
        unexpected = [r.summary() for r in results if not r.expected]
        assert not unexpected, unexpected[:5]
        # A device is done when its last report is acknowledged; the server may still be on it.
        for _ in range(200):
            jobs = {job.device.device_name: job for job in await server.engine.store.jobs("stress")}
            if all(not job.is_open for job in jobs.values()):
                break
            await asyncio.sleep(0.05)
        expected_state = {"upgraded": "succeeded", "failed": "failed"}
        for result in results:
            assert jobs[result.device_name].state == expected_state[result.outcome], result.summary()
        states = Counter(job.state for job in jobs.values())
        assert states == {"succeeded": 200, "failed": 100}
    finally:
        await server.stop()
