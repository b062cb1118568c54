"""Rollout policies end to end: the real broker and HTTP API (in process), and `ota-server` +
`otactl` as processes for pause/resume/plan. Durations are fractions of a minute; the
engine's rollout tick runs once a second."""
from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path
from typing import Any

import aiohttp
from support.harness import Device, OtaServer, write_catalog
from support.processes import LiveServer, otactl

from otacore.catalog.rollout_policy import device_share

BATCH = "up"


def batch(**keys: str) -> str:
    lines = [f"- name: {BATCH}", "  package: fw-1.1.0", "  mode: dynamic", "  push: true"]
    lines += [f"  {key}: {value}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


async def admin(server: OtaServer, method: str, path: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, f"{server.http_url}{path}",
                                headers={"Authorization": f"Bearer {server.admin_token}"}) as response:
            return response.status, await response.json()


async def rollout(server: OtaServer) -> dict[str, Any]:
    status, body = await admin(server, "GET", "/admin/api/status")
    assert status == 200
    return next(b for b in body["batches"] if b["name"] == BATCH).get("rollout", {})


async def test_pause_and_resume_over_the_admin_api_survive_a_restart(tmp_path: Path) -> None:
    write_catalog(tmp_path, batch())
    server = await OtaServer(tmp_path).start()
    try:
        async with Device(server, "p-1") as first:
            await first.inform("1.0.0")
            await first.next_push()
        status, body = await admin(server, "POST", f"/admin/api/batches/{BATCH}/pause")
        assert status == 200 and body["paused"] is True and body["rollout"]["state"] == "paused"
    finally:
        await server.stop()
    server = await OtaServer(tmp_path, mqtt_port=server.mqtt_port, http_port=server.http_port).start()
    try:
        view = await rollout(server)
        assert view["state"] == "paused" and view["paused_by"] == "admin"
        async with Device(server, "p-2") as second:
            await second.inform("1.0.0")
            await second.expect_nothing(1.5)  # paused: no job, no push, also after the restart
            assert (await second.firmware_get())["data"] == {}
            status, _ = await admin(server, "POST", f"/admin/api/batches/{BATCH}/resume")
            assert status == 200
            assert (await second.next_push())["data"]["version"] == "1.1.0"  # online: pushed on resume
        assert (await admin(server, "POST", "/admin/api/batches/nope/pause"))[0] == 404
    finally:
        await server.stop()


async def test_percent_membership_is_the_same_after_a_restart(tmp_path: Path) -> None:
    write_catalog(tmp_path, batch(percent="40"))
    fleet = [f"s-{i:02d}" for i in range(16)]
    expected = {name for name in fleet if device_share(BATCH, name) < 40}
    assert expected and expected != set(fleet)
    for _ in range(2):  # before and after a restart
        server = await OtaServer(tmp_path).start()
        try:
            got = set()
            for name in fleet:
                async with Device(server, name) as device:
                    await device.inform("1.0.0")
                    reply = await device.firmware_get()
                    if reply["data"]:
                        got.add(name)
            assert got == expected
        finally:
            await server.stop()


async def test_rate_per_minute_pushes_that_many_and_queues_the_rest(tmp_path: Path) -> None:
    write_catalog(tmp_path, batch(rate_per_minute="3"))
    server = await OtaServer(tmp_path).start()
    devices = [Device(server, f"r-{i}") for i in range(5)]
    try:
        for device in devices:
            await device.__aenter__()
            await device.inform("1.0.0")
        pushed = 0
        for device in devices:
            try:
                await device.next_push(timeout=0.6)
                pushed += 1
            except TimeoutError:
                pass
        assert pushed == 3  # the other two are queued for the next minute
        view = await rollout(server)
        assert view["state"] == "rate_limited" and view["queued"] == 2
        assert "rate-limited (3/min) with 2 queued" in view["reason"]
    finally:
        for device in devices:
            await device.__aexit__(None, None, None)
        await server.stop()


async def test_retry_makes_a_new_job_after_the_interval(tmp_path: Path) -> None:
    write_catalog(tmp_path, batch(retry="{count: 1, interval_minutes: 0.02, on: [download]}"))
    server = await OtaServer(tmp_path).start()
    try:
        async with Device(server, "rt-1") as device:
            await device.inform("1.0.0")
            first = (await device.next_push())["data"]["url"]
            await device.progress(-2, "download failed")
            second = (await device.next_push(timeout=5))["data"]["url"]  # about 1.2 s later
            assert first != second
            await device.progress(-2, "download failed again")
            await device.expect_nothing(2.5)  # count 1: no third job
        jobs = await server.engine.store.jobs()
        assert [job.state for job in jobs] == ["failed", "failed"]
    finally:
        await server.stop()


async def test_abort_halts_and_the_halt_survives_a_restart_until_resumed(tmp_path: Path) -> None:
    write_catalog(tmp_path, batch(abort="{failure_percent: 50, min_finished: 2}"))
    server = await OtaServer(tmp_path).start()
    try:
        for name in ("a-1", "a-2"):
            async with Device(server, name) as device:
                await device.inform("1.0.0")
                await device.next_push()
                await device.progress(-3, "verify failed")
                await server.wait_state(name, "failed")
        view = await rollout(server)
        assert view["state"] == "halted" and "2 of 2 finished jobs failed" in view["reason"]
    finally:
        await server.stop()
    server = await OtaServer(tmp_path, mqtt_port=server.mqtt_port, http_port=server.http_port).start()
    try:
        assert (await rollout(server))["state"] == "halted"
        async with Device(server, "a-3") as device:
            await device.inform("1.0.0")
            await device.expect_nothing(1.2)
            assert (await admin(server, "POST", f"/admin/api/batches/{BATCH}/resume"))[0] == 200
            await device.next_push()
        assert (await rollout(server))["state"] == "active"
    finally:
        await server.stop()


async def test_waves_open_after_success_and_a_short_soak(tmp_path: Path) -> None:
    fleet = [f"w-{i:02d}" for i in range(24)]
    first_wave = {name for name in fleet if device_share(BATCH, name) < 30}
    assert first_wave and first_wave != set(fleet)
    write_catalog(tmp_path, batch(waves="[{percent: 30, success_percent: 100, soak_minutes: 0.02}, {percent: 100}]"))
    server = await OtaServer(tmp_path).start()
    devices = [Device(server, name) for name in fleet]
    try:
        for device in devices:
            await device.__aenter__()
            await device.inform("1.0.0")
        for device in devices:
            if device.name in first_wave:
                await device.next_push()
                await device.inform("1.1.0")
        view = await rollout(server)
        assert view["waves"][0]["open"] and not view["waves"][1]["open"]
        for device in devices:  # wave 2 opens within a tick or two of the 1.2 s soak
            if device.name not in first_wave:
                assert (await device.next_push(timeout=6))["data"]["version"] == "1.1.0"
        assert (await rollout(server))["wave"] == 2
    finally:
        for device in devices:
            await device.__aexit__(None, None, None)
        await server.stop()


async def test_start_at_holds_jobs_until_then(tmp_path: Path) -> None:
    start = dt.datetime.fromtimestamp(time.time() + 2.5, dt.timezone.utc).isoformat()
    write_catalog(tmp_path, batch(start_at=f'"{start}"'))
    server = await OtaServer(tmp_path).start()
    try:
        async with Device(server, "t-1") as device:
            await device.inform("1.0.0")
            assert (await device.firmware_get())["data"] == {}
            assert (await rollout(server))["state"] == "scheduled"
            assert (await device.next_push(timeout=6))["data"]["version"] == "1.1.0"
    finally:
        await server.stop()


async def test_outside_its_window_a_batch_says_until_when(tmp_path: Path) -> None:
    hour = (dt.datetime.now(dt.timezone.utc).hour + 3) % 24
    write_catalog(tmp_path, batch(windows=f'[{{cron: "0 {hour} * * *", minutes: 60}}]'))
    server = await OtaServer(tmp_path).start()
    try:
        async with Device(server, "win-1") as device:
            await device.inform("1.0.0")
            await device.expect_nothing(1.2)
        view = await rollout(server)
        assert view["state"] == "outside_window" and view["until"].endswith(f"T{hour:02d}:00:00Z")
    finally:
        await server.stop()


async def test_otactl_pause_resume_status_and_plan(tmp_path: Path) -> None:
    write_catalog(tmp_path, batch())
    server = await LiveServer(tmp_path).start()
    config, view = server.config, server.view
    try:
        async with Device(view, "c-1") as device:
            await device.inform("1.0.0")
            await device.next_push()
        paused = await asyncio.to_thread(otactl, config, "pause", BATCH)
        assert paused.returncode == 0 and f"{BATCH}: paused; now paused: paused by an admin" in paused.stdout
        status = await asyncio.to_thread(otactl, config, "status")
        assert f"{BATCH}: paused: paused by an admin" in status.stdout
        resumed = await asyncio.to_thread(otactl, config, "resume", BATCH)
        assert resumed.returncode == 0 and "resumed" in resumed.stdout
        missing = await asyncio.to_thread(otactl, config, "pause", "nope")
        assert missing.returncode == 1 and "no batch named 'nope'" in missing.stderr

        unchanged = await asyncio.to_thread(otactl, config, "plan", "--exit-code")
        assert unchanged.returncode == 0, unchanged.stdout + unchanged.stderr
        assert f"{BATCH}: none: running, unchanged; would target 1 device(s) now" in unchanged.stdout
        write_catalog(tmp_path, batch(percent="50", rate_per_minute="10") + """\
- {name: second, package: fw-1.0.0, mode: dynamic, src_versions: [1.1.0]}
""")
        changed = await asyncio.to_thread(otactl, config, "plan", "--exit-code")
        assert changed.returncode == 2, changed.stdout + changed.stderr
        assert f"{BATCH}: change: policy percent (none) -> 50, rate_per_minute (none) -> 10" in changed.stdout
        assert "second: start: new upgrade batch of fw-1.0.0" in changed.stdout
        assert (await asyncio.to_thread(otactl, config, "plan")).returncode == 0  # without --exit-code
        write_catalog(tmp_path, batch(percent="150"))
        broken = await asyncio.to_thread(otactl, config, "plan")
        assert broken.returncode == 1 and "percent: 150 is out of range" in broken.stdout
        write_catalog(tmp_path, "")
        removed = await asyncio.to_thread(otactl, config, "plan", "--json")
        assert removed.returncode == 0 and '"action": "stop"' in removed.stdout
        # plan changed nothing: the running server still has the first catalog.
        status = await asyncio.to_thread(otactl, config, "status", BATCH)
        assert "state running" in status.stdout
    finally:
        output = await server.stop()
    assert "Traceback" not in output
