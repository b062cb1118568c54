"""End to end over loopback: devices upgrade through the real broker and file server."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import aiohttp

from support.harness import Device, OtaServer, write_catalog


async def download(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers or {}) as response:
        return response.status, await response.read()


async def test_device_upgrades_from_push_to_success(server: OtaServer) -> None:
    async with Device(server, "dev-1") as device:
        await device.inform("1.0.0")
        push = await device.next_push()
        data = push["data"]
        assert push["code"] == "1000" and push["message"] == "success"
        assert data["version"] == "1.1.0" and data["signMethod"] == "Md5" and data["md5"] == data["sign"]
        assert "module" not in data and "isDiff" not in data
        status, first = await download(data["url"], {"Range": "bytes=0-9999"})
        assert status == 206 and len(first) == 10000
        status, rest = await download(data["url"], {"Range": "bytes=10000-"})
        assert status == 206
        image = first + rest
        assert len(image) == data["size"] and hashlib.md5(image).hexdigest() == data["sign"]
        await server.wait_state("dev-1", "notified")
        await device.progress("50", "downloading")
        await server.wait_state("dev-1", "in_progress")
        await device.progress(100, "installed, rebooting")
        await server.wait_state("dev-1", "installed")
    async with Device(server, "dev-1") as device:
        await device.inform("1.1.0")
        await server.wait_state("dev-1", "succeeded")
    job = (await server.engine.store.jobs("up-1.1.0"))[0]
    assert job.bytes_served == data["size"] and job.served_percent == 100
    states = [to for _, _, to, _, _ in await server.engine.store.history(job.id)]
    assert states == ["queued", "notified", "in_progress", "installed", "succeeded"]


async def test_negative_step_fails_the_job_with_its_code(server: OtaServer) -> None:
    async with Device(server, "dev-2") as device:
        await device.inform("1.0.0")
        await device.next_push()
        await device.progress("-2", "download failed: timeout")
        await server.wait_state("dev-2", "failed")
    job = (await server.engine.store.jobs("up-1.1.0"))[0]
    assert job.code == -2 and job.message == "download failed: timeout"


async def test_old_version_after_install_means_failed(server: OtaServer) -> None:
    async with Device(server, "dev-3") as device:
        await device.inform("1.0.0")
        await device.next_push()
        await device.progress("100", "rebooting")
        await server.wait_state("dev-3", "installed")
        await device.inform("1.0.0")
        await server.wait_state("dev-3", "failed")
    job = (await server.engine.store.jobs("up-1.1.0"))[0]
    assert "did not boot" in (await server.engine.store.history(job.id))[-1][4]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {server.admin_token}"}) as http:
        async with http.get(f"{server.http_url}/admin/api/jobs/{job.id}") as answer:
            shown = (await answer.json())["job"]
        async with http.get(f"{server.http_url}/admin/api/devices/a1Test/dev-3") as answer:
            listed = (await answer.json())["jobs"][0]
    assert (shown["code"], shown["failure"], shown["message"]) == (None, "boot", "reported 1.0.0 after install")
    assert (listed["code"], listed["failure"]) == (None, "boot")


async def test_push_ids_fit_31_bits_and_are_never_reused_after_a_restart(tmp_path: Path) -> None:
    write_catalog(tmp_path, """
    - {name: up, package: fw-1.1.0, type: upgrade, protocol: http, mode: dynamic, push: true}
    """)
    server = await OtaServer(tmp_path).start()
    async with Device(server, "dev-p1") as one, Device(server, "dev-p2") as two:
        await one.inform("1.0.0")
        await two.inform("1.0.0")
        first = [(await one.next_push())["id"], (await two.next_push())["id"]]
        await one.inform("1.0.0")  # pushed again: a new id
        again = (await one.next_push())["id"]
    await server.stop()
    server = await OtaServer(tmp_path, mqtt_port=server.mqtt_port, http_port=server.http_port).start()
    try:
        async with Device(server, "dev-p1") as one:
            await one.inform("1.0.0")
            after_restart = (await one.next_push())["id"]
    finally:
        await server.stop()
    assert sorted(first) == [1, 2] and again == 3
    assert after_restart == 10_001  # the rest of the reserved block is skipped: ids 4..10000 may have left
    assert all(isinstance(i, int) and 0 < i < 2**31 for i in (*first, again, after_restart))


async def test_up_to_date_or_newer_devices_get_nothing(server: OtaServer) -> None:
    async with Device(server, "dev-new") as device:
        await device.inform("1.1.0")
        await device.inform("2.0.0")
        await device.inform("not-a-version")
        await device.expect_nothing(0.5)
    assert await server.job_state("dev-new") is None


async def test_push_off_device_asks_with_firmware_get(tmp_path: Path) -> None:
    write_catalog(tmp_path, """
    - {name: ask-only, package: fw-1.1.0, type: upgrade, protocol: http, mode: dynamic, push: false}
    """)
    server = await OtaServer(tmp_path).start()
    try:
        async with Device(server, "dev-ask") as device:
            await device.inform("1.0.0")
            await device.expect_nothing(0.5)
            assert await server.job_state("dev-ask") == "queued"
            reply = await device.firmware_get()
            assert reply["code"] == 200 and reply["message"] == "success" and reply["version"] == "1.0"
            assert reply["data"]["version"] == "1.1.0" and reply["data"]["url"].startswith(server.http_url)
            assert await server.job_state("dev-ask") == "notified"
    finally:
        await server.stop()


async def test_firmware_get_with_nothing_due_returns_empty_data(server: OtaServer) -> None:
    async with Device(server, "dev-idle") as device:
        reply = await device.firmware_get()
        assert reply["code"] == 200 and reply["data"] == {}
        await device.publish("/sys/a1Test/dev-idle/thing/ota/firmware/get", b"{not json")
        bad = json.loads(await device.receive("get_reply"))
        assert bad["code"] == 400 and "JSON" in bad["message"]


async def test_dynamic_batch_takes_a_device_that_comes_online_later(server: OtaServer) -> None:
    # The batch started with the server, before this device ever connected.
    async with Device(server, "late-1") as device:
        await device.inform("1.0.0")
        assert (await device.next_push())["data"]["version"] == "1.1.0"


async def test_static_batch_fixes_its_targets_when_it_starts(tmp_path: Path) -> None:
    write_catalog(tmp_path)
    server = await OtaServer(tmp_path).start()
    try:
        async with Device(server, "known-1") as device:  # reports before the batch exists
            await device.inform("1.0.0")
        write_catalog(tmp_path, """
        - {name: static-up, package: fw-1.1.0, type: upgrade, protocol: http, mode: static, push: true}
        """)
        await server.engine.reload()
        async with Device(server, "known-1") as device:  # offline at start, in the set: upgraded
            await device.inform("1.0.0")
            assert (await device.next_push())["data"]["version"] == "1.1.0"
        async with Device(server, "late-2") as device:  # first seen after start: not in the set
            await device.inform("1.0.0")
            await device.expect_nothing(0.5)
        assert await server.job_state("late-2") is None
    finally:
        await server.stop()


async def test_restart_mid_upgrade_loses_nothing(tmp_path: Path) -> None:
    write_catalog(tmp_path, """
    - {name: up, package: fw-1.1.0, type: upgrade, protocol: http, mode: dynamic, push: true}
    """)
    server = await OtaServer(tmp_path).start()
    async with Device(server, "dev-r") as device:
        await device.inform("1.0.0")
        push = await device.next_push()
        await device.progress(40, "downloading")
        await server.wait_state("dev-r", "in_progress")
    await server.stop()
    server = await OtaServer(tmp_path, mqtt_port=server.mqtt_port, http_port=server.http_port).start()
    try:
        assert await server.job_state("dev-r") == "in_progress"
        status, body = await download(push["data"]["url"], {"Range": "bytes=100-199"})
        assert status == 206 and len(body) == 100  # URLs from before the restart still work
        async with Device(server, "dev-r") as device:
            await device.progress(100, "installed")
            await server.wait_state("dev-r", "installed")
            await device.inform("1.1.0")
            await server.wait_state("dev-r", "succeeded")
    finally:
        await server.stop()

