"""The HTTP edge against clients that misbehave on purpose: sockets held open without a
request, headers sent a line at a time, numbers no device writes. Real server on loopback,
raw sockets where a client library would refuse to send the bytes."""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conftest import UPGRADE_BATCH
from harness import BASE_CATALOG, Device, OtaServer, device_secret, make_firmware, write_catalog
from otacore.codec import PayloadError, parse_block_request, parse_step

SIZE = 160_000  # fw-1.1.0.bin
FILE = "/files/fw-1.1.0/fw-1.1.0.bin"


async def raw_request(port: int, head: bytes, body: bytes = b"", timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
    """Send `head` (request line and headers, without the blank line) with Connection:
    close; return status, headers (lower-case names) and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + b"\r\nConnection: close\r\n\r\n" + body)
        response = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    status_line, _, rest = response.partition(b"\r\n")
    header_block, _, payload = rest.partition(b"\r\n\r\n")
    headers = {}
    for line in header_block.split(b"\r\n"):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, payload


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> float | None:
    """Seconds until the server closed the connection (reading all it sent), or None."""
    start = time.monotonic()
    try:
        while await asyncio.wait_for(reader.read(65536), seconds - (time.monotonic() - start)):
            pass
    except (TimeoutError, asyncio.TimeoutError):
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage() for r in errors]


@pytest.fixture
async def quick(tmp_path: Path) -> AsyncIterator[OtaServer]:
    """A server whose clients have one second to send their request headers."""
    write_catalog(tmp_path, UPGRADE_BATCH)
    running = await OtaServer(tmp_path, options={"limits": {"header_timeout_seconds": 1}}).start()
    yield running
    await running.stop()


# -- header deadline and the cap on waiting connections -----------------------------------

async def test_an_idle_socket_is_closed_after_the_header_deadline(quick: OtaServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", quick.http_port)
    took = await closed_within(reader, 4)
    writer.close()
    assert took is not None and 0.9 <= took <= 2.5, took


async def test_headers_sent_a_line_at_a_time_are_cut_off_at_the_deadline(quick: OtaServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", quick.http_port)
    start = time.monotonic()
    answer = asyncio.ensure_future(reader.read())  # b"" once the server closes
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    line = 0
    while not answer.done() and time.monotonic() - start < 4:
        await asyncio.sleep(0.2)  # a header line every 0.2 s: never a complete request
        line += 1
        writer.write(b"X-Slow-%d: y\r\n" % line)
    took = time.monotonic() - start
    writer.close()
    assert answer.done() and await answer == b"", "never closed"  # closed without an answer
    assert 0.9 <= took <= 2.5, took


async def test_a_keep_alive_client_is_not_affected(quick: OtaServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", quick.http_port)
    for _ in range(5):  # 3 s on one connection, idle 0.6 s between requests: under the 1 s deadline
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        await asyncio.sleep(0.6)
    writer.close()


async def test_a_transfer_longer_than_the_deadline_is_not_cut(tmp_path: Path) -> None:
    # The deadline is for the request headers, not for the response: a device on a slow link
    # downloading for longer than it must still get every byte.
    make_firmware(tmp_path / "packages" / "big.bin", 12 * 1024 * 1024, 9)
    write_catalog(tmp_path, base=BASE_CATALOG + "  - {id: big, product: a1Test, version: 2.0.0, file: big.bin}\n")
    server = await OtaServer(tmp_path, options={"limits": {"header_timeout_seconds": 1}}).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port, limit=1 << 16)
        writer.write(f"GET /files/big/big.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.admin_token}"
                     f"\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert head.startswith(b"HTTP/1.1 200")
        await asyncio.sleep(2)  # not reading: the server waits on a full socket, past the deadline
        body = await asyncio.wait_for(reader.readexactly(12 * 1024 * 1024), 5)
        assert body == (tmp_path / "packages" / "big.bin").read_bytes()
        writer.close()
    finally:
        await server.stop()


async def test_past_max_unauthenticated_the_oldest_waiting_sockets_are_closed(tmp_path: Path) -> None:
    write_catalog(tmp_path, UPGRADE_BATCH)
    server = await OtaServer(tmp_path, options={"limits": {"max_unauthenticated": 10,
                                                           "header_timeout_seconds": 30}}).start()
    sockets = []
    try:
        for _ in range(20):
            sockets.append(await asyncio.open_connection("127.0.0.1", server.http_port))
            await asyncio.sleep(0.01)  # in this order
        status, _, body = await raw_request(server.http_port, b"GET /healthz HTTP/1.1\r\nHost: x")
        assert status == 200 and json.loads(body)["ok"] is True
        await asyncio.sleep(1.2)  # a sweep, too
        closed = [await closed_within(reader, 0.05) is not None for reader, _ in sockets]
        assert closed[:10] == [True] * 10, closed  # the oldest went first
        assert closed[12:] == [False] * 8, closed  # the newest are still held: at most 10 waiting
    finally:
        for _, writer in sockets:
            writer.close()
        await server.stop()


# -- numbers from devices -------------------------------------------------------------------------

@pytest.mark.parametrize("step", ["1.5e999", "\u0663", "1_000", " 7", "45.5", "\uff15", "1e2", "0x10",
                                  45.5, float("inf"), float("nan"), 1e300, "9" * 40])
def test_a_step_is_an_ascii_or_json_integer(step: object) -> None:
    with pytest.raises(PayloadError, match="step"):
        parse_step(step)


@pytest.mark.parametrize("field, value", [("size", "\u0663" * 3), ("size", "1_024"), ("offset", 1.5),
                                          ("offset", float("inf")), ("size", "9" * 5000)])
def test_block_fields_are_ascii_or_json_integers(field: str, value: object) -> None:
    block = {"size": 1024, "offset": 0} | {field: value}
    with pytest.raises(PayloadError, match=f"fileBlock.{field}"):
        parse_block_request({"params": {"fileInfo": {"streamId": 1}, "fileBlock": block}})


async def test_write_ota_info_refuses_steps_that_are_not_integers(server: OtaServer,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    auth = base64.b64encode(f"w-1&a1Test:{device_secret('w-1')}".encode())
    api = b"POST /base-api/api/v1/write_ota_info HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" \
          b"Authorization: Basic " + auth
    for step in ["1.5e999", "\u0663", "1_000", "1e999", 1e300]:
        body = json.dumps({"productKey": "a1Test", "deviceKey": "w-1", "step": step}, ensure_ascii=False).encode()
        status, _, answer = await raw_request(server.http_port, api + b"\r\nContent-Length: %d" % len(body), body)
        assert status == 400 and "step" in json.loads(answer)["message"], (step, answer)
    no_tracebacks(caplog)
    assert await server.job_state("w-1") is None


async def test_an_mqtt_progress_in_other_digits_is_not_counted(server: OtaServer) -> None:
    async with Device(server, "p-1") as device:
        await device.inform("1.0.0")
        await device.next_push()
        await device.progress("\u0663\u0660")  # '30' in Arabic-Indic digits: int() would take it
        await device.progress("1.5e999")
        await device.progress(40)  # then a real one, so the ones before have been handled
        for _ in range(100):
            if await server.job_state("p-1") == "in_progress":
                break
            await asyncio.sleep(0.02)
    await server.engine.settled()
    history = [row for job in await server.engine.store.jobs() for row in await server.engine.store.history(job.id)]
    # The first progress it took is the real one: 30 (or 3) never counted.
    assert [progress for _, _, new, progress, _ in history if new == "in_progress"] == [40]

