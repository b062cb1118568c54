"""MQTT block downloads (docs/protocol.md 3e) and the SagooIoT HTTP device API (section 4).
`mqtt_server` (tests/conftest.py): a pushed, dynamic upgrade batch over MQTT blocks."""
from __future__ import annotations

import base64
import hashlib
import json

import aiohttp

from support.harness import Device, OtaServer, device_secret
from otacore.protocol.codec import decode_block_reply


async def ask_block(device: Device, stream: int, offset: int, size: int, token: str | None = None,
                    file_id: int = 1) -> tuple[dict, bytes | None]:
    params = {"fileInfo": {"streamId": stream, "fileId": file_id}, "fileBlock": {"size": size, "offset": offset}}
    if token:
        params["fileToken"] = token
    await device.publish(f"/sys/a1Test/{device.name}/thing/file/download", {"id": "7", "version": "1.0",
                                                                             "params": params})
    return decode_block_reply(await device.receive("download_reply"))


async def test_device_downloads_the_image_in_blocks(mqtt_server: OtaServer) -> None:
    async with Device(mqtt_server, "m-1") as device:
        await device.inform("1.0.0")
        data = (await device.next_push())["data"]
        assert data["dProtocol"] == "mqtt" and data["streamFileId"] == 1 and "url" not in data
        image, token, offset = b"", None, 0
        while offset < data["size"]:
            header, block = await ask_block(device, data["streamId"], offset, 65536, token)
            assert header["code"] == 200 and header["data"]["bOffset"] == offset and block is not None
            assert header["data"]["fileLength"] == data["size"] and header["data"]["bSize"] == len(block)
            token = header["data"]["fileToken"]
            image += block
            offset += len(block)
        assert hashlib.md5(image).hexdigest() == data["sign"]
    await mqtt_server.engine.settled()  # bytes served are telemetry: written with the next commit
    job = (await mqtt_server.engine.store.jobs())[0]
    assert job.bytes_served == data["size"]


async def test_block_errors(mqtt_server: OtaServer) -> None:
    async with Device(mqtt_server, "m-2") as device, Device(mqtt_server, "m-3") as other:
        await device.inform("1.0.0")
        stream = (await device.next_push())["data"]["streamId"]
        header, block = await ask_block(device, stream, 160_000, 1024)
        assert header["code"] == 400 and block is None  # offset at the end
        header, _ = await ask_block(device, stream, 0, 100)
        assert header["code"] == 400  # size below 256
        header, _ = await ask_block(device, 999_999, 0, 1024)
        assert header["code"] == 404
        header, _ = await ask_block(other, stream, 0, 1024)
        assert header["code"] == 403  # someone else's stream
        header, block = await ask_block(device, stream, 0, 1024, token="forged")
        assert header["code"] == 200 and block  # a token it was not given is ignored (PROTOCOL 3e)
        await device.publish("/sys/a1Test/m-2/thing/file/download", b"\xff\xfe")
        header, _ = decode_block_reply(await device.receive("download_reply"))
        assert header["code"] == 400
        header, block = await ask_block(device, stream, 159_000, 4096)
        assert header["code"] == 200 and len(block) == 1000  # the remaining bytes


def basic(name: str, secret: str | None = None) -> dict[str, str]:
    token = base64.b64encode(f"{name}&a1Test:{secret or device_secret(name)}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def test_http_device_api_upgrade(server: OtaServer) -> None:
    api = f"{server.http_url}/base-api/api/v1"
    async with aiohttp.ClientSession() as http:
        query = {"productKey": "a1Test", "deviceKey": "h-1", "version": "1.0.0"}
        async with http.get(f"{api}/get_ota_info", params=query, headers=basic("h-1")) as response:
            body = await response.json()
        assert response.status == 200 and body["code"] == 0 and body["data"]["version"] == "1.1.0"
        assert await server.job_state("h-1") == "notified"
        report = {"productKey": "a1Test", "deviceKey": "h-1", "step": "-3", "desc": "verify failed"}
        async with http.post(f"{api}/write_ota_info", json=report, headers=basic("h-1")) as response:
            assert response.status == 200 and (await response.json()) == {"code": 0, "message": ""}
        assert await server.job_state("h-1") == "failed"


async def test_http_device_api_refuses_bad_requests(server: OtaServer) -> None:
    api = f"{server.http_url}/base-api/api/v1"
    query = {"productKey": "a1Test", "deviceKey": "h-2"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{api}/get_ota_info", params=query) as response:
            assert response.status == 401 and (await response.json())["code"] == 401
        async with http.get(f"{api}/get_ota_info", params=query, headers=basic("h-2", "wrong")) as response:
            assert response.status == 401
        other = {"productKey": "a1Test", "deviceKey": "h-3"}
        async with http.get(f"{api}/get_ota_info", params=other, headers=basic("h-2")) as response:
            assert response.status == 403
        for body in (b"{broken", json.dumps({"productKey": "a1Test", "deviceKey": "h-2", "step": "x"}).encode(),
                     b"x" * 100_000):
            async with http.post(f"{api}/write_ota_info", data=body, headers=basic("h-2")) as response:
                assert response.status in (400, 413)
        async with http.get(f"{api}/get_ota_info", params=query, headers=basic("h-2")) as response:
            assert (await response.json())["data"] == {}  # nothing reported, nothing due
    assert await server.job_state("h-2") is None


async def test_401s_carry_a_challenge_and_browser_logins_cannot_post_admin_actions(server: OtaServer) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.http_url}/base-api/api/v1/get_ota_info") as response:
            assert response.status == 401 and response.headers["WWW-Authenticate"].startswith("Basic")
        async with http.post(f"{server.http_url}/admin/api/reload") as response:
            assert response.status == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
        browser = {"Authorization": "Basic " + base64.b64encode(f"admin:{server.admin_token}".encode()).decode()}
        async with http.get(f"{server.http_url}/admin/", headers=browser) as response:
            assert response.status == 200
        async with http.post(f"{server.http_url}/admin/api/batches/up-1.1.0/cancel", headers=browser,
                             data=b'{"devices": ["x"]}') as response:
            assert response.status == 401  # a page in the same browser cannot forge this
