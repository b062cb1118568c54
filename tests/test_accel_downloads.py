"""`http.accel` without nginx (quick; tests/test_nginx_downloads.py runs the real nginx): the
setting, which downloads the server hands off with X-Accel-Redirect, the log lines that
credit their bytes per job, and the ones that must change nothing."""
from __future__ import annotations

import asyncio
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest

from devicekit.loopback import free_port
from fileserver.accel import ACCEL_HEADER, TRANSFER_HEADER
from otacore.config.settings import settings_from_mapping
from otacore.downloads.handoff import HandOffs, LogLine, parse_log_line
from otacore.errors import ConfigError
from support.harness import UPGRADE_BATCH, Device, OtaServer, until, url_job, write_catalog

PREFIX = "/_ota_files/"


def line(token: str, status: int = 200, sent: int = 160_000, host: str = "") -> bytes:
    return f"<190>Dec  7 00:15:33 {host}ota_accel: ota1 {token} {status} {sent}".encode()


# -- the setting -----------------------------------------------------------------------------
def settings(accel: object) -> object:
    return settings_from_mapping({"http": {"bind": "127.0.0.1:8080", "accel": accel}}, Path("/x/broker.yaml"))


def test_setting_read() -> None:
    accel = settings({"prefix": "/_ota_files/", "log_bind": "127.0.0.1:8514"}).accel
    assert (accel.prefix, accel.log_host, accel.log_port) == ("/_ota_files/", "127.0.0.1", 8514)
    assert accel.redirect_path("/srv/p/fw.bin") == "/_ota_files/srv/p/fw.bin"
    assert settings({"prefix": "/internal/ota/"}).accel.log_port is None
    unix = settings({"prefix": "/_ota_files/", "log_bind": "unix:/run/ota/log.sock"}).accel
    assert (unix.log_path, unix.log_address, unix.counts_bytes) == ("/run/ota/log.sock", "unix:/run/ota/log.sock", True)
    assert settings_from_mapping({}, Path("/x/broker.yaml")).accel is None


@pytest.mark.parametrize("accel, key", [
    ({"prefix": "_ota/"}, "http.accel.prefix"),
    ({"prefix": "/_ota"}, "http.accel.prefix"),
    ({"prefix": "/$ota/"}, "http.accel.prefix"),
    ({"prefix": "/files/internal/"}, "http.accel.prefix"),
    ({"prefix": "/admin/"}, "http.accel.prefix"),
    ({}, "http.accel.prefix"),
    ({"prefix": "/_ota/", "log_bind": "127.0.0.1"}, "http.accel.log_bind"),
    ({"prefix": "/_ota/", "log_bind": "127.0.0.1:0"}, "http.accel.log_bind"),
    ({"prefix": "/_ota/", "log_bind": "unix:relative.sock"}, "http.accel.log_bind"),
    ({"prefix": "/_ota/", "log_bind": "unix:/a,b.sock"}, "http.accel.log_bind"),
    ({"prefix": "/_ota/", "log": "127.0.0.1:9"}, "http.accel.log"),
    ("/_ota/", "http.accel"),
])
def test_setting_refused_in_one_line(accel: object, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(accel)
    message = caught.value.one_line()
    assert f"broker_plugin.ota.OtaPlugin.{key}:" in message and "\n" not in message


# -- log lines and hand-offs ---------------------------------------------------------------------
TOKEN = "0123456789abcdef0123456789abcdef"


def test_log_line_parsed_strictly() -> None:
    assert parse_log_line(line(TOKEN, 206, 1024)) == LogLine(TOKEN, 206, 1024)
    assert parse_log_line(line(TOKEN, host="ota-edge-1 ")) == LogLine(TOKEN, 200, 160_000)
    for bad in (line(TOKEN.upper()), line(TOKEN[:-1]), line(TOKEN + "0"), line(TOKEN, 99), line(TOKEN, 600),
                line(TOKEN, 200, 10**16), line(TOKEN).replace(b"ota_accel", b"nginx"),
                line(TOKEN).replace(b"<190>", b""), line(TOKEN) + b" extra", line(TOKEN) + b"\n\n",
                line(TOKEN).replace(b" 200 ", b" 200  "), line(TOKEN).replace(b"160000", b"-1"),
                line(TOKEN).replace(b"160000", "١٦".encode()), b"", b"\xff" * 40, line(TOKEN) + b" " * 600):
        assert parse_log_line(bad) is None, bad


class FakeTransfer:
    def __init__(self, job_id: int) -> None:
        self.job_id, self.started_count, self.sent = job_id, 0, []

    def started(self) -> None:
        self.started_count += 1

    def finished(self, sent: int) -> None:
        self.sent.append(sent)


def test_handoffs_credit_once_and_at_most_the_file() -> None:
    now = [0.0]
    handoffs = HandOffs(100, clock=lambda: now[0], per_job=2, limit=3)
    a, b = FakeTransfer(1), FakeTransfer(1)
    token_a, token_b = handoffs.add(a, 1000), handoffs.add(b, 1000)
    assert a.started_count == 1 and len(handoffs) == 2 and token_a != token_b
    assert handoffs.settle(LogLine(token_a, 206, 10**12)) and a.sent == [1000]  # at most the file
    assert not handoffs.settle(LogLine(token_a, 206, 5)) and a.sent == [1000]  # once
    assert not handoffs.settle(LogLine(TOKEN, 200, 5))  # never handed out
    assert handoffs.settle(LogLine(token_b, 416, 197)) and b.sent == [0]  # not the file's bytes
    assert handoffs.ignored == 2 and handoffs.settled == 2 and len(handoffs) == 0
    # A job with too many waiting gives up its oldest; so does the server past its limit.
    first, second, third = FakeTransfer(2), FakeTransfer(2), FakeTransfer(2)
    for transfer in (first, second, third):
        handoffs.add(transfer, 10)
    assert first.sent == [0] and len(handoffs) == 2
    others = [FakeTransfer(job) for job in (3, 4)]
    for transfer in others:
        handoffs.add(transfer, 10)
    assert second.sent == [0] and len(handoffs) == 3
    now[0] = 150.0
    assert handoffs.expire() == 3 and third.sent == [0] and all(t.sent == [0] for t in others)
    assert len(handoffs) == 0 and handoffs.abandoned == 5


# -- the server's answers --------------------------------------------------------------------------
@pytest.fixture
async def accel_server(tmp_path: Path) -> AsyncIterator[OtaServer]:
    write_catalog(tmp_path, UPGRADE_BATCH)
    server = OtaServer(tmp_path)
    log_port = free_port()
    server.options = {"http": {"bind": f"127.0.0.1:{server.http_port}", "public_url": server.http_url,
                               "accel": {"prefix": PREFIX, "log_bind": f"127.0.0.1:{log_port}"}}}
    server.log_port = log_port  # type: ignore[attr-defined]
    async with server:
        yield server


async def fetch(method: str, url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.request(method, url, headers=headers) as response:
        return response.status, {k.lower(): v for k, v in response.headers.items()}, await response.read()


def send_udp(port: int, *datagrams: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in datagrams:
            sock.sendto(datagram, ("127.0.0.1", port))


async def test_handed_off_downloads_and_their_log_lines(accel_server: OtaServer) -> None:
    server = accel_server
    async with Device(server, "acc-1") as device:
        await device.inform("1.0.0")
        url = (await device.next_push())["data"]["url"]
    job_id = url_job(url)
    path = server.root / "packages" / "fw-1.1.0.bin"
    via = {ACCEL_HEADER: PREFIX}

    def served() -> int:
        return server.engine.state.jobs[job_id].bytes_served

    status, headers, body = await fetch("GET", url, **via, Range="bytes=0-1023")
    assert status == 200 and body == b""
    assert headers["x-accel-redirect"] == "/_ota_files" + quote(str(path.resolve()))
    assert headers["etag"].startswith('"') and headers["cache-control"] == "private, no-transform"
    token = headers[TRANSFER_HEADER.lower()]
    assert server.engine.downloads.in_flight(job_id)

    # Lines that name nothing waiting change nothing; the one that does, once. Datagrams are
    # read in order: once the last hand-off's line has counted, every line before it was read.
    send_udp(server.log_port, b"garbage", line("f" * 32, 200, 5), line(token.upper(), 200, 5))
    send_udp(server.log_port, line(token, 206, 1024), line(token, 206, 1024))
    _, headers, _ = await fetch("GET", url, **via)
    send_udp(server.log_port, line(headers[TRANSFER_HEADER.lower()], 206, 100))
    assert await until(lambda: served() == 1124)
    assert not server.engine.downloads.in_flight(job_id)

    # What nginx would not answer as the server does, and requests not through nginx: served here.
    for headers_sent, query in (({}, ""), ({ACCEL_HEADER: "/elsewhere/"}, ""), (via, "&offset=10&length=5"),
                                ({**via, "If-None-Match": '"x"'}, ""), ({**via, "If-Match": "*"}, ""),
                                ({**via, "If-Range": "Mon, 07 Dec 2026 00:00:00 GMT", "Range": "bytes=0-9"}, ""),
                                ({**via, "If-Modified-Since": "Mon, 07 Dec 2020 00:00:00 GMT"}, "")):
        status, headers, body = await fetch("GET", url + query, **headers_sent)
        assert "x-accel-redirect" not in headers and status in (200, 206) and body, headers_sent
    status, headers, body = await fetch("HEAD", url, **via)
    assert status == 200 and "x-accel-redirect" not in headers
    # The server's own refusals stay its own.
    status, headers, _ = await fetch("GET", url.replace("sig=", "sig=0"), **via)
    assert status == 403 and "x-accel-redirect" not in headers
    status, headers, _ = await fetch("GET", url, **via, Range="bytes=-0")
    assert status == 416 and "x-accel-redirect" not in headers
    assert not server.engine.downloads.in_flight(job_id)

    # A job that closes: its URL is refused; a line for a hand-off made before still counts.
    before = served()  # with what the server sent itself
    _, headers, _ = await fetch("GET", url, **via)
    late = headers[TRANSFER_HEADER.lower()]
    await server.engine.cancel_devices("up-1.1.0", ["acc-1"])
    status, _, _ = await fetch("GET", url, **via)
    assert status == 403
    send_udp(server.log_port, line(late, 200, 160_000))
    assert await until(lambda: not server.engine.downloads.in_flight(job_id))
    assert served() == before + 160_000


async def test_without_log_bind_a_handoff_counts_as_activity_only(tmp_path: Path) -> None:
    write_catalog(tmp_path, UPGRADE_BATCH)
    server = OtaServer(tmp_path)
    server.options = {"http": {"bind": f"127.0.0.1:{server.http_port}", "public_url": server.http_url,
                               "accel": {"prefix": PREFIX}}}
    async with server, Device(server, "acc-2") as device:
        await device.inform("1.0.0")
        url = (await device.next_push())["data"]["url"]
        status, headers, _ = await fetch("GET", url, **{ACCEL_HEADER: PREFIX})
        assert status == 200 and "x-accel-redirect" in headers and TRANSFER_HEADER.lower() not in headers
        assert not server.engine.downloads.in_flight(url_job(url))


async def test_log_bind_in_use_is_one_line(tmp_path: Path) -> None:
    write_catalog(tmp_path, UPGRADE_BATCH)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        server = OtaServer(tmp_path)
        server.options = {"http": {"bind": f"127.0.0.1:{server.http_port}", "public_url": server.http_url,
                                   "accel": {"prefix": PREFIX, "log_bind": f"127.0.0.1:{port}"}}}
        with pytest.raises(OSError, match=r"http.accel.log_bind 127.0.0.1:\d+: cannot listen"):
            await server.start()
        await asyncio.sleep(0)


async def test_log_lines_over_a_unix_socket(tmp_path: Path) -> None:
    """log_bind unix:/PATH: the socket is made mode 0660, a line there credits its hand-off,
    and the socket goes when the server stops."""
    write_catalog(tmp_path, UPGRADE_BATCH)
    server = OtaServer(tmp_path)
    path = tmp_path / "log.sock"
    server.options = {"http": {"bind": f"127.0.0.1:{server.http_port}", "public_url": server.http_url,
                               "accel": {"prefix": PREFIX, "log_bind": f"unix:{path}"}}}
    async with server:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        async with Device(server, "acc-unix") as device:
            await device.inform("1.0.0")
            url = (await device.next_push())["data"]["url"]
        _, headers, _ = await fetch("GET", url, **{ACCEL_HEADER: PREFIX})
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(line(headers[TRANSFER_HEADER.lower()], 206, 4096), str(path))
        assert await until(lambda: server.engine.state.jobs[url_job(url)].bytes_served == 4096)
    assert not path.exists()
