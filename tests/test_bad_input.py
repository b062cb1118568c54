"""Bad device input on every OTA topic gets an answer or a log line, and changes nothing."""
from __future__ import annotations

import asyncio
import json
import random

from support.harness import Device, OtaServer

GARBAGE = [
    b"", b"\x00\xff\xfe", b"{", b"[]", b"null", b'"text"', b"1e999",
    json.dumps({"id": "1"}).encode(),
    json.dumps({"id": "1", "params": "not-an-object"}).encode(),
    json.dumps({"id": {"x": 1}, "params": {"version": ["1.0.0"]}}).encode(),
    json.dumps({"id": "1", "params": {"version": "", "module": 7}}).encode(),
    json.dumps({"id": "1", "params": {"step": "101"}}).encode(),
    json.dumps({"id": "1", "params": {"step": "-9", "desc": "x"}}).encode(),
    json.dumps({"id": "1", "params": {"step": True}}).encode(),
    json.dumps({"id": "1", "params": {"version": "1.0.0" * 100}}).encode(),
    json.dumps({"id": "1", "params": {"fileInfo": {"streamId": "x"}, "fileBlock": {"size": 1e9, "offset": -1}}}).encode(),
    b"{" * 100_000,
    random.Random(3).randbytes(200 * 1024),  # over the 64 KiB JSON limit; past max_packet_kb see test_mqtt_edges
]


async def test_garbage_on_every_topic_changes_nothing(server: OtaServer) -> None:
    async with Device(server, "junk") as device:
        for suffix in ("/ota/device/inform/a1Test/junk", "/ota/device/progress/a1Test/junk",
                       "/sys/a1Test/junk/thing/ota/firmware/get", "/sys/a1Test/junk/thing/file/download"):
            for payload in GARBAGE:
                await device.publish(suffix, payload)
        replies: list[bytes] = []
        while not any(b'"code":400' in reply for reply in replies):  # bad requests are answered
            replies.append(await device.receive("_reply", timeout=5))
        assert not any(b'"url"' in reply for reply in replies)
        await asyncio.sleep(0.3)  # "nothing changed" needs the hooks to have run
        assert await server.engine.store.reported_version(device_id("junk"), "default") is None
        assert await server.engine.store.jobs() == []
        await device.inform("1.0.0")  # and the session still works
        assert (await device.next_push())["data"]["version"] == "1.1.0"


def device_id(name: str):  # type: ignore[no-untyped-def]
    from otacore.protocol.credentials import DeviceId
    return DeviceId("a1Test", name)


async def test_reports_for_modules_the_product_lacks_are_not_recorded(server: OtaServer) -> None:
    async with Device(server, "mods") as device:
        for i in range(20):
            await device.inform("1.0.0", module=f"junk-{i}")
        await device.inform("1.0.0", module="MCU")  # sent last: once it is recorded, the rest were handled
        for _ in range(200):
            if await server.engine.store.reported_version(device_id("mods"), "MCU") == "1.0.0":
                break
            await asyncio.sleep(0.025)
    assert await server.engine.store.reported_version(device_id("mods"), "MCU") == "1.0.0"
    assert await server.engine.store.reported_version(device_id("mods"), "junk-0") is None
