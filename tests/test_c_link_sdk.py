"""Aliyun's C Link SDK 4.x (the `ota` and `mqtt_download` components), byte for byte: its
block requests carry a trailing comma and the hard-coded fileToken "default", and it reports
step "0" when a download begins. The server takes all three and the device upgrades.
`mqtt_server` (tests/conftest.py): a pushed, dynamic upgrade batch over MQTT blocks."""
from __future__ import annotations


from support import c_link_sdk
from support.c_link_sdk import STARTED
from support.harness import Device, OtaServer

from otacore.protocol.codec import decode_block_reply



async def test_the_c_link_sdk_upgrades_over_mqtt_blocks(mqtt_server: OtaServer) -> None:
    async with Device(mqtt_server, "c-sdk-1") as device:
        await device.inform("1.0.0")
        push = (await device.next_push())["data"]
        assert push["streamId"] == 1 and push["signMethod"] == "Md5"
        await device.publish("/ota/device/progress/a1Test/c-sdk-1", STARTED)
        await mqtt_server.wait_state("c-sdk-1", "in_progress")
        image = await c_link_sdk.download(device, push)
        await device.progress(100)
        await mqtt_server.wait_state("c-sdk-1", "installed")
        await device.inform("1.1.0")
        await mqtt_server.wait_state("c-sdk-1", "succeeded")
    job = (await mqtt_server.engine.store.jobs())[0]
    assert job.bytes_served == len(image)
    events = [event[-1] for event in await mqtt_server.engine.store.history(job.id)]
    assert "device started the upgrade (step 0)" in events


async def test_garbage_is_still_a_400_with_the_reason(mqtt_server: OtaServer) -> None:
    async with Device(mqtt_server, "c-sdk-2") as device:
        await device.inform("1.0.0")
        await device.next_push()
        await device.publish("/sys/a1Test/c-sdk-2/thing/file/download", b'{"id":"1","params":{,}}')
        header, block = decode_block_reply(await device.receive("download_reply"))
        assert header["code"] == 400 and block is None
        assert header["msg"].startswith("malformed JSON: Expecting property name enclosed in double quotes")
