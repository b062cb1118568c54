"""A staged rollout under load (slow, `./scripts/test -m slow`): 300 simulated devices in 3
waves with a rate limit, 5% of them failing on purpose; the batch halts at its failure
threshold, is resumed, and the database ends as every device saw it."""
from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from devicekit import simulator
from support.harness import PK, PRODUCT_SECRET, OtaServer, write_catalog

pytestmark = pytest.mark.slow

DEVICES, FAILING = 300, 15  # every 20th device fails its download on purpose
RATE = 200  # jobs per minute: the third wave waits for the next minute


async def test_three_waves_with_a_rate_halt_at_the_threshold_and_resume(tmp_path: Path) -> None:
    write_catalog(tmp_path, f"""
    - name: staged
      package: fw-1.1.0
      mode: dynamic
      push: true
      waves:
        - {{percent: 10, success_percent: 85, soak_minutes: 0.02}}
        - {{percent: 40, success_percent: 85, soak_minutes: 0.02}}
        - {{percent: 100}}
      rate_per_minute: {RATE}
      abort: {{failure_percent: 4, min_finished: 20}}
    """)
    server = await OtaServer(tmp_path).start()
    configs = [simulator.DeviceConfig(
        device_name=f"wv-{i:04d}", product_key=PK, product_secret=PRODUCT_SECRET, mqtt_port=server.mqtt_port,
        chunk=65536, timeout=170, fail_step=-2 if i % 20 == 0 else None) for i in range(DEVICES)]
    halts: list[dict] = []
    done = asyncio.Event()

    async def admin(method: str, path: str) -> dict:
        async with aiohttp.ClientSession() as http:
            async with http.request(method, f"{server.http_url}{path}",
                                    headers={"Authorization": f"Bearer {server.admin_token}"}) as response:
                assert response.status == 200, await response.text()
                return await response.json()

    async def operator() -> None:
        """Resumes the batch each time `abort` halts it, as an operator would after a look."""
        while not done.is_set():
            status = await admin("GET", "/admin/api/status")
            rollout = status["batches"][0]["rollout"]
            if rollout["state"] == "halted":
                halts.append(rollout)
                await admin("POST", "/admin/api/batches/staged/resume")
            await asyncio.sleep(0.5)

    watcher = asyncio.ensure_future(operator())
    try:
        results = await simulator.run_fleet(configs, concurrency=100)
        done.set()
        await watcher
        unexpected = [r.summary() for r in results if not r.expected]
        assert not unexpected, unexpected[:5]
        outcomes = Counter(r.outcome for r in results)
        assert outcomes == {"upgraded": DEVICES - FAILING, "failed": FAILING}
        # The threshold was reached (5% fail > 4%) and the batch halted, with its figures.
        assert halts, "the batch never halted"
        assert all("finished jobs failed" in h["reason"] and h["figures"]["finished"] >= 20 for h in halts)
        for _ in range(200):
            jobs = {job.device.device_name: job for job in await server.engine.store.jobs("staged")}
            if len(jobs) == DEVICES and all(not job.is_open for job in jobs.values()):
                break
            await asyncio.sleep(0.05)
        expected_state = {"upgraded": "succeeded", "failed": "failed"}
        for result in results:
            job = jobs[result.device_name]
            assert job.state == expected_state[result.outcome], result.summary()
            assert job.code == (-2 if result.outcome == "failed" else None)
        view = (await admin("GET", "/admin/api/status"))["batches"][0]["rollout"]
        assert view["wave"] == 3 and all(wave["open"] for wave in view["waves"])
        assert sum(wave["jobs"] for wave in view["waves"]) == DEVICES  # each wave counts its own devices
        # The rate held: no 60-second window started more than RATE jobs.
        starts = []
        for job in jobs.values():
            starts += [at for at, old, new, _, _ in await server.engine.store.history(job.id)
                       if old == "queued" and new == "notified"]
        starts.sort()
        assert len(starts) == DEVICES
        assert all(b - a >= 60 for a, b in zip(starts, starts[RATE:])), "more than the rate in a minute"
    finally:
        done.set()
        watcher.cancel()
        await server.stop()
