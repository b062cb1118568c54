"""The HTTP edge against clients that misbehave on purpose: sockets held open without a
request, headers sent a line at a time, undecodable credentials, odd Range and condition
headers, numbers no device writes. Real server on loopback, raw sockets where a client
library would refuse to send the bytes."""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from support.harness import (BASE_CATALOG, UPGRADE_BATCH, Device, OtaServer, device_secret, free_port, make_firmware,
                             write_catalog)
from otacore.protocol.codec import PayloadError, parse_block_request, parse_step

ROOT = Path(__file__).resolve().parents[1]
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
    for _ in range(4):  # 2.4 s on one connection, idle 0.6 s between requests: under the 1 s deadline
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
        await asyncio.sleep(1.6)  # not reading: the server waits on a full socket, past the deadline
        body = await asyncio.wait_for(reader.readexactly(12 * 1024 * 1024), 5)
        assert body == (tmp_path / "packages" / "big.bin").read_bytes()
        writer.close()
    finally:
        await server.stop()


async def test_tls_handshake_and_tls_idle_have_the_same_deadline(tmp_path: Path) -> None:
    # asyncio's own handshake timeout is 60 s; TCPSite cannot change it, HttpSite does.
    subprocess.run([str(ROOT / "scripts" / "dev-cert"), str(tmp_path / "tls")], check=True, capture_output=True)
    cert, key = tmp_path / "tls" / "dev-cert.pem", tmp_path / "tls" / "dev-key.pem"
    write_catalog(tmp_path, UPGRADE_BATCH.replace("protocol: http", "protocol: https"))
    port = free_port()
    options = {"limits": {"header_timeout_seconds": 1},
               "http": {"bind": f"127.0.0.1:{port}", "public_url": f"https://127.0.0.1:{port}",
                        "tls": {"certfile": str(cert), "keyfile": str(key)}}}
    server = await OtaServer(tmp_path, http_port=port, options=options).start()
    try:
        silent_reader, silent = await asyncio.open_connection("127.0.0.1", port)  # never says hello
        tls = ssl.create_default_context(cafile=str(cert))
        idle_reader, idle = await asyncio.open_connection("127.0.0.1", port, ssl=tls, server_hostname="127.0.0.1")
        assert await closed_within(silent_reader, 4) is not None
        assert await closed_within(idle_reader, 4) is not None  # shook hands, then sent nothing
        silent.close()
        idle.close()
    finally:
        await server.stop()


async def test_a_body_sent_too_slowly_gets_408(quick: OtaServer) -> None:
    credentials = base64.b64encode(f"b-1&a1Test:{device_secret('b-1')}".encode()).decode()
    head = (f"POST /base-api/api/v1/write_ota_info HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            f"Authorization: Basic {credentials}\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", quick.http_port)
    start = time.monotonic()
    writer.write(head + b'{"step": ')  # and the rest never comes
    response = await asyncio.wait_for(reader.readuntil(b"}"), 4)  # the JSON answer's end
    writer.close()
    assert response.startswith(b"HTTP/1.1 408") and b"header_timeout_seconds" in response
    assert b"connection: close" in response.lower() and time.monotonic() - start < 2.5


async def test_past_max_unauthenticated_the_oldest_waiting_sockets_are_closed(tmp_path: Path) -> None:
    write_catalog(tmp_path, UPGRADE_BATCH)
    server = await OtaServer(tmp_path, options={"limits": {"max_unauthenticated": 10,
                                                           "header_timeout_seconds": 6}}).start()
    sockets = []
    try:
        for _ in range(20):
            sockets.append(await asyncio.open_connection("127.0.0.1", server.http_port))
            await asyncio.sleep(0.01)  # in this order
        status, _, body = await raw_request(server.http_port, b"GET /healthz HTTP/1.1\r\nHost: x")
        assert status == 200 and json.loads(body)["ok"] is True
        await asyncio.sleep(4.6)  # their grace (half the header deadline: 3 s here), and a sweep after it
        closed = [await closed_within(reader, 0.05) is not None for reader, _ in sockets]
        assert closed[:10] == [True] * 10, closed  # the oldest went first
        assert closed[12:] == [False] * 8, closed  # the newest are still held: at most 10 waiting
    finally:
        for _, writer in sockets:
            writer.close()
        await server.stop()


async def test_connections_between_two_requests_are_not_capped(tmp_path: Path) -> None:
    # A fleet downloading in Range requests has thousands of connections between two
    # requests at any moment; counting them against the cap closed working downloads.
    write_catalog(tmp_path, UPGRADE_BATCH)
    server = await OtaServer(tmp_path, options={"limits": {"max_unauthenticated": 10,
                                                           "header_timeout_seconds": 6}}).start()
    sockets = []
    try:
        for _ in range(25):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
            sockets.append((reader, writer))
        for _ in range(15):  # and fresh sockets past the cap: only those are evicted
            sockets.append(await asyncio.open_connection("127.0.0.1", server.http_port))
        await asyncio.sleep(4.6)  # the fresh ones grace (3 s here), and a sweep after it
        for reader, writer in sockets[:25]:
            await reader.read(4096)  # the rest of the first answer
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 2)).startswith(b"HTTP/1.1 200")
        closed = [await closed_within(reader, 0.05) is not None for reader, _ in sockets[25:]]
        assert closed[:5] == [True] * 5 and closed[5:] == [False] * 10, closed
    finally:
        for _, writer in sockets:
            writer.close()
        await server.stop()


# -- credentials a client controls ----------------------------------------------------------

def _basic(raw: bytes) -> bytes:
    return b"Basic " + base64.b64encode(raw)


HOSTILE_AUTHORIZATION = [
    b"Bearer \xff\xfe",                 # not UTF-8 (latin-1 bytes)
    "Bearer jeton-\u00e9t\u00e9".encode(),  # UTF-8, not ASCII
    b"Basic \xe9\xe9:\xfc",              # latin-1 where base64 belongs
    "Basic \u00e9t\u00e9".encode(),      # UTF-8 where base64 belongs
    b"Basic !!!not-base64!!!",
    _basic(b"b-1&a1Test:\xe9t\xe9"),    # base64 of latin-1 bytes: not UTF-8 text
    _basic("b-1&a1Test:\u00e9t\u00e9".encode()),  # UTF-8 password: a wrong secret
    b"\xff",
]

ENDPOINTS = [
    (b"GET", b"/admin/api/status", 401), (b"POST", b"/admin/api/reload", 401),
    (b"GET", b"/admin/api/jobs/1", 401), (b"GET", b"/admin/", 401),
    (b"GET", b"/base-api/api/v1/get_ota_info?productKey=a1Test&deviceKey=b-1", 401),
    (b"POST", b"/base-api/api/v1/write_ota_info", 401),
    (b"GET", FILE.encode(), 403),  # no signature, and not the admin token
]


@pytest.mark.parametrize("authorization", HOSTILE_AUTHORIZATION, ids=repr)
async def test_undecodable_authorization_is_a_clear_401(server: OtaServer, authorization: bytes,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    for method, path, expected in ENDPOINTS:
        status, headers, body = await raw_request(
            server.http_port, method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
            b"Authorization: " + authorization)
        assert status == expected, (path, status, body)
        if path != b"/admin/":  # the browser page answers with a login prompt in text
            message = json.loads(body)["message"]
            assert message and "Traceback" not in message
        if status == 401:
            assert "www-authenticate" in headers
    no_tracebacks(caplog)


async def test_the_401_says_what_is_wrong(server: OtaServer) -> None:
    api = b"GET /base-api/api/v1/get_ota_info?productKey=a1Test&deviceKey=b-1 HTTP/1.1\r\nHost: x\r\n"
    for authorization, says in [(b"Basic \xe9", "must be ASCII"), (b"Basic %%%", "not valid base64"),
                                (_basic(b"b-1&a1Test:\xe9"), "not UTF-8")]:
        _, _, body = await raw_request(server.http_port, api + b"Authorization: " + authorization)
        assert says in json.loads(body)["message"]
    _, _, body = await raw_request(server.http_port, b"GET /admin/api/status HTTP/1.1\r\nHost: x\r\n"
                                   b"Authorization: Bearer \xff")
    assert "must be ASCII" in json.loads(body)["message"]


# -- Range and the conditions ------------------------------------------------------------------

RANGES = [  # (Range, status, Content-Range): RFC 9110 section 14, checked against nginx 1.22
    (b"bytes=-0", 416, f"bytes */{SIZE}"),       # aiohttp sent the whole file as a 206
    (b"bytes=-00", 416, f"bytes */{SIZE}"),
    (b"bytes=5-2", 416, f"bytes */{SIZE}"),
    (f"bytes={SIZE}-".encode(), 416, f"bytes */{SIZE}"),
    (f"bytes={SIZE - 1}-".encode(), 206, f"bytes {SIZE - 1}-{SIZE - 1}/{SIZE}"),
    (b"bytes=0-999999999999", 206, f"bytes 0-{SIZE - 1}/{SIZE}"),
    (b"bytes=-999999999999", 206, f"bytes 0-{SIZE - 1}/{SIZE}"),
    (b"bytes=99999999999999999999999999-", 416, f"bytes */{SIZE}"),
    (b"bytes=abc", 416, f"bytes */{SIZE}"),
    (b"bytes=\xd9\xa3-", 416, f"bytes */{SIZE}"),  # an Arabic-Indic 3 is not a digit here
    (b"bytes=\xff-", 416, f"bytes */{SIZE}"),
    (b"bytes=0-0,5-6", 200, None),                # several ranges: the whole file (RFC 9110 14.2)
    (b"items=0-5", 200, None),                    # a unit we do not know MUST be ignored
    (b"garbage", 200, None),
]


@pytest.mark.parametrize("rng, status, content_range", RANGES, ids=lambda v: repr(v)[:30])
async def test_edge_ranges(server: OtaServer, rng: bytes, status: int, content_range: str | None,
                           caplog: pytest.LogCaptureFixture) -> None:
    got, headers, body = await raw_request(server.http_port, f"GET {FILE} HTTP/1.1\r\nHost: x\r\nAuthorization: "
                                           f"Bearer {server.admin_token}\r\n".encode() + b"Range: " + rng)
    assert got == status
    assert headers.get("content-range") == content_range
    if status == 200:
        assert len(body) == SIZE
    no_tracebacks(caplog)


@pytest.mark.parametrize("name, value, status", [
    (b"If-Range", b"\xff\xfe", 200),          # cannot match: the whole file
    (b"If-Range", b"W/\"\xff\"", 200),
    (b"If-Range", b"not a date", 200),
    (b"If-None-Match", b"\xff, \"x\"", 206),
    (b"If-None-Match", "\"\u00e9\"".encode(), 206),
    (b"If-Match", b"\xff", 412),
    (b"If-Modified-Since", b"\xff\xfe", 206),
    (b"If-Unmodified-Since", b"Mon, 99 Foo 99999 99:99:99 GMT", 206),
    (b"Accept-Encoding", b"\xff", 206),
    (b"X-Anything", b"\xff\xfe\xfd", 206),
], ids=lambda v: repr(v)[:30])
async def test_odd_condition_headers(server: OtaServer, name: bytes, value: bytes, status: int,
                                     caplog: pytest.LogCaptureFixture) -> None:
    got, _, body = await raw_request(server.http_port, f"GET {FILE} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                     f"{server.admin_token}\r\nRange: bytes=0-9\r\n".encode() + name + b": " + value)
    assert got == status
    assert len(body) == {200: SIZE, 206: 10, 412: 0}[status]
    no_tracebacks(caplog)


async def test_a_compressed_sibling_file_is_never_served_instead(server: OtaServer) -> None:
    # FileResponse serves NAME.gz with Content-Encoding when the client accepts gzip: other
    # bytes than the pushed hash names.
    packages = server.root / "packages"
    (packages / "fw-1.1.0.bin.gz").write_bytes(b"\x1f\x8b not the firmware")
    got, headers, body = await raw_request(
        server.http_port, f"GET {FILE} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.admin_token}\r\n"
        "Accept-Encoding: gzip, br\r\nIf-Modified-Since: Mon, 01 Jan 2001 00:00:00 GMT".encode())
    assert got == 200 and "content-encoding" not in headers
    assert body == (packages / "fw-1.1.0.bin").read_bytes()


@pytest.mark.parametrize("query", ["offset=%D9%A3", "offset=%C2%B2", "offset=1_000", "offset=+5", "offset=%205",
                                   "length=0", "offset=1" + "0" * 30, "length=%EF%BC%95"])
async def test_offset_and_length_take_ascii_digits_only(server: OtaServer, query: str) -> None:
    got, _, body = await raw_request(server.http_port, f"GET {FILE}?{query} HTTP/1.1\r\nHost: x\r\n"
                                     f"Authorization: Bearer {server.admin_token}".encode())
    assert got == 400 and json.loads(body)["message"]


@pytest.mark.parametrize("job", ["%C2%B2", "%D9%A3", "1" * 40, "%FF", "-1"])
async def test_job_ids_that_only_look_like_numbers_are_404(server: OtaServer, job: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    got, _, _ = await raw_request(server.http_port, f"GET /admin/api/jobs/{job} HTTP/1.1\r\nHost: x\r\n"
                                  f"Authorization: Bearer {server.admin_token}".encode())
    assert got == 404
    no_tracebacks(caplog)


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

