"""Concurrency: device reports racing a batch start, a reload, an admin cancel (found in review)."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
from pathlib import Path

from support.harness import BASE_CATALOG, UPGRADE_BATCH, Device, OtaServer, write_catalog
from otacore.protocol.codec import decode_block_reply
from otacore.protocol.credentials import DeviceId


async def test_answers_to_a_batch_start_push_are_not_lost(tmp_path: Path) -> None:
    # The start marks the fleet `notified` after pushing; a device that fails at once must
    # still end `failed`, not be overwritten back to `notified`.
    write_catalog(tmp_path)
    server = await OtaServer(tmp_path).start()
    engine, count = server.engine, 100
    try:
        async with contextlib.AsyncExitStack() as stack:
            devices = [await stack.enter_async_context(Device(server, f"f{i}")) for i in range(count)]
            for device in devices:
                await device.inform("1.0.0")
            while len(await engine.store.reported_versions("a1Test", "default")) < count:
                await asyncio.sleep(0.05)

            async def fail_fast(device: Device) -> None:
                await device.next_push(10)
                await device.progress(-2, "download failed")

            answers = [asyncio.create_task(fail_fast(device)) for device in devices]
            write_catalog(tmp_path, UPGRADE_BATCH)
            await engine.reload()
            await asyncio.gather(*answers)
            for _ in range(100):
                states = {job.state for job in await engine.store.jobs("up-1.1.0")}
                if states == {"failed"}:
                    break
                await asyncio.sleep(0.05)
            assert states == {"failed"}
    finally:
        await server.stop()


async def test_reports_during_a_batch_start_are_taken(tmp_path: Path) -> None:
    write_catalog(tmp_path)
    server = await OtaServer(tmp_path).start()
    engine, counter, running = server.engine, itertools.count(), True
    try:
        async def report_forever() -> None:
            while running:
                await engine.on_version(DeviceId("a1Test", f"s-{next(counter)}"), "default", "1.0.0")

        reporters = [asyncio.create_task(report_forever()) for _ in range(10)]
        await asyncio.sleep(0.1)
        write_catalog(tmp_path, UPGRADE_BATCH)
        await engine.reload()
        await asyncio.sleep(0.05)
        running = False
        await asyncio.gather(*reporters)
        versions = await engine.store.reported_versions("a1Test", "default")
        jobbed = {job.device.device_name for job in await engine.store.jobs("up-1.1.0")}
        assert set(versions) == jobbed
    finally:
        await server.stop()


async def test_reload_removing_the_batch_leaves_no_open_job(tmp_path: Path) -> None:
    write_catalog(tmp_path, UPGRADE_BATCH)
    server = await OtaServer(tmp_path).start()
    engine, counter, running = server.engine, itertools.count(), True
    try:
        async def report_forever() -> None:
            while running:
                await engine.on_version(DeviceId("a1Test", f"o-{next(counter)}"), "default", "1.0.0")

        reporters = [asyncio.create_task(report_forever()) for _ in range(10)]
        await asyncio.sleep(0.1)
        write_catalog(tmp_path)  # the batch is gone
        await engine.reload()
        running = False
        await asyncio.gather(*reporters)
        assert await engine.store.jobs("up-1.1.0", open_only=True) == []
    finally:
        await server.stop()


async def test_a_stream_keeps_its_file_when_a_reload_adds_a_patch(tmp_path: Path) -> None:
    batch = "- {name: over-mqtt, package: fw-1.1.0, type: upgrade, protocol: mqtt, mode: dynamic}\n"
    write_catalog(tmp_path, batch)
    server = await OtaServer(tmp_path).start()
    try:
        async with Device(server, "m-1") as device:
            await device.inform("1.0.0")
            data = (await device.next_push())["data"]

            async def block(offset: int) -> bytes:
                params = {"fileInfo": {"streamId": data["streamId"], "fileId": 1},
                          "fileBlock": {"size": 65536, "offset": offset}}
                await device.publish("/sys/a1Test/m-1/thing/file/download", {"id": "1", "params": params})
                header, body = decode_block_reply(await device.receive("download_reply"))
                assert header["code"] == 200 and body is not None
                return body

            image = await block(0)
            write_catalog(tmp_path, batch, base=BASE_CATALOG.replace("sign_method: MD5}",
                                                                     "sign_method: MD5, diff_from: [1.0.0]}"))
            await server.engine.reload()
            while len(image) < data["size"]:
                image += await block(len(image))
            assert hashlib.md5(image).hexdigest() == data["sign"]
    finally:
        await server.stop()


async def test_admin_cancel_racing_a_first_report_wins(tmp_path: Path) -> None:
    write_catalog(tmp_path, "- {name: st, package: fw-1.1.0, type: upgrade, mode: static, devices: [x]}\n")
    server = await OtaServer(tmp_path).start()
    try:
        report = asyncio.create_task(server.engine.on_version(DeviceId("a1Test", "x"), "default", "1.0.0"))
        canceled = await server.engine.cancel_devices("st", ["x"])
        await report
        assert canceled == 1 and await server.job_state("x") == "canceled"
    finally:
        await server.stop()
