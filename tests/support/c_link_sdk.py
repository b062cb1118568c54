"""What Aliyun's C Link SDK 4.x (`ota` and `mqtt_download` components) sends, byte for byte:
block requests with a trailing comma and the hard-coded fileToken "default", and step "0" when
a download begins. tests/test_c_link_sdk.py replays it against the embedded server,
tests/test_cluster.py through a RabbitMQ cluster."""
from __future__ import annotations

import hashlib
from typing import Any

from otacore.protocol.codec import decode_block_reply

# The first block request names stream 1: the first job of a fresh server.
FIRST_REQUEST = (b'{"id":"1","version":"1.0","params":{"fileToken":"default","fileInfo":{"streamId":1,"fileId":1,},'
                 b'"fileBlock":{"size":10240,"offset":0}}}')
NEXT_REQUEST = ('{{"id":"{id}","version":"1.0","params":{{"fileToken":"default","fileInfo":{{"streamId":{stream},'
                '"fileId":1,}},"fileBlock":{{"size":10240,"offset":{offset}}}}}}}')
STARTED = b'{"id":2,"params":{"step":"0","desc":""}}'


def first_request(stream: int) -> bytes:
    """FIRST_REQUEST for another stream, every other byte kept."""
    return FIRST_REQUEST.replace(b'"streamId":1,', f'"streamId":{stream},'.encode())


async def download(device: Any, push: dict[str, Any], timeout: float = 5.0) -> bytes:
    """Fetch the pushed file block by block as the SDK does: its first request (stream 1 unless
    the push names another), then NEXT_REQUEST from each block's end, until fileLength. Checks
    each reply's code and offset, and the whole file against the push's MD5 as the SDK does.
    `device` is a tests/support harness Device (publish, receive)."""
    image, number = b"", 1
    request = FIRST_REQUEST if push["streamId"] == 1 else first_request(push["streamId"])
    while True:
        await device.publish(f"/sys/{device.pk}/{device.name}/thing/file/download", request)
        header, block = decode_block_reply(await device.receive("download_reply", timeout=timeout))
        assert header["code"] == 200, header
        assert block is not None and header["data"]["bOffset"] == len(image)
        image += block
        if len(image) >= header["data"]["fileLength"]:
            break
        number += 1
        request = NEXT_REQUEST.format(id=number, stream=push["streamId"], offset=len(image)).encode()
    assert hashlib.md5(image).hexdigest() == push["sign"]  # the SDK's own whole-file check
    return image
