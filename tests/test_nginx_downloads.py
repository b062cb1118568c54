"""Downloads through nginx (docs/cluster-downloads.md): a real `ota-server` with `http.accel`,
nginx in front as scripts/cluster/nginx runs it, and a real device over MQTT whose pushed URL
points at nginx. nginx sends the bytes (sendfile, Range, resume); the server keeps every
decision (signature, revocation when the job closes, 409 when the file changed) and counts
the bytes per job from nginx's access log lines. Marked `cluster`: left out of the default
run (`./scripts/test -m cluster` runs them); skipped only where nginx cannot be installed.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import socket
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, urlencode, urlsplit, urlunsplit

import aiohttp
import bsdiff4
import pytest
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from devicekit.loopback import ROOT, free_port
from support.harness import BASE_CATALOG, UPGRADE_BATCH, Device, device_secret, until, url_job, write_catalog
from support.processes import LiveServer

pytestmark = pytest.mark.cluster

SCRIPT = ROOT / "scripts" / "cluster" / "nginx"
PREFIX = "/_ota_files/"
SIZE = 160_000  # fw-1.1.0.bin of the test catalog


def free_udp_port() -> int:
    return free_port(socket.SOCK_DGRAM)


@dataclass
class Stack:
    server: LiveServer
    nginx: str  # http://127.0.0.1:PORT
    nginx_dir: Path
    log_port: int
    firmware: bytes

    @property
    def token(self) -> str:
        return (self.server.var / "admin-token").read_text().strip()

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def bytes_served(self, job_id: int) -> int:
        """The job's byte count as the server wrote it down."""
        with contextlib.closing(sqlite3.connect(f"file:{self.server.db}?mode=ro", uri=True)) as db:
            return db.execute("SELECT bytes_served FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]

    async def metrics(self) -> dict[tuple[str, str], float]:
        _, _, body = await fetch("GET", f"{self.nginx}/metrics", **self.admin)
        return {(sample.name, ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(body.decode()) for sample in family.samples}


@contextlib.asynccontextmanager
async def nginx_in_front(tmp_path: Path, base: str = BASE_CATALOG) -> AsyncIterator[Stack]:
    """The test catalog's server with http.accel, behind nginx as scripts/cluster/nginx runs it."""
    write_catalog(tmp_path, UPGRADE_BATCH, base=base)
    server = LiveServer(tmp_path)
    nginx_port, log_port = free_port(), free_udp_port()
    nginx = f"http://127.0.0.1:{nginx_port}"
    direct = f"http: {{bind: 127.0.0.1:{server.http_port}, public_url: {server.http_url}}}"
    text = server.config.read_text()
    assert direct in text
    server.config.write_text(text.replace(direct, (
        f"http: {{bind: 127.0.0.1:{server.http_port}, public_url: {nginx}, "
        f"accel: {{prefix: {PREFIX}, log_bind: 127.0.0.1:{log_port}}}}}")))
    nginx_dir = tmp_path / "nginx"
    up = await asyncio.to_thread(subprocess.run, [str(SCRIPT), "up", "--prefix", PREFIX, "--log",
                                                  f"127.0.0.1:{log_port}", str(nginx_dir), str(nginx_port),
                                                  server.http_url, str(tmp_path / "packages"),
                                                  str(server.var / "diffs")],
                                 capture_output=True, text=True, timeout=600)
    if up.returncode == 3:
        pytest.skip(up.stderr.strip())
    assert up.returncode == 0, up.stderr
    assert up.stdout.strip() == f"OTA_NGINX_HTTP={nginx}"
    try:
        await server.start()
        try:
            yield Stack(server, nginx, nginx_dir, log_port, (tmp_path / "packages" / "fw-1.1.0.bin").read_bytes())
        finally:
            await server.stop()
    finally:
        down = await asyncio.to_thread(subprocess.run, [str(SCRIPT), "down", str(nginx_dir)], capture_output=True,
                                       text=True, timeout=60)
        assert down.returncode == 0, down.stderr
    with pytest.raises(OSError):  # down stopped it
        socket.create_connection(("127.0.0.1", nginx_port), timeout=1).close()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with nginx_in_front(tmp_path) as running:
        yield running


async def fetch(method: str, url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, \
            session.request(method, url, headers=headers, allow_redirects=False) as response:
        return response.status, {k.lower(): v for k, v in response.headers.items()}, await response.read()


async def pushed_url(stack: Stack, name: str) -> str:
    async with Device(stack.server.view, name) as device:
        await device.inform("1.0.0")
        url = (await device.next_push())["data"]["url"]
    assert url.startswith(stack.nginx + "/files/")
    return url


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


async def test_download_range_resume_and_bytes_per_job(stack: Stack) -> None:
    url = await pushed_url(stack, "ngx-1")
    job_id, firmware = url_job(url), stack.firmware
    etag = f'"{hashlib.sha256(firmware).hexdigest()}"'
    sent = 0

    status, headers, body = await fetch("GET", url)
    assert status == 200 and body == firmware and headers["etag"] == etag
    assert headers["server"] == "nginx" and headers["accept-ranges"] == "bytes"
    assert headers["cache-control"] == "private, no-transform" and "x-ota-transfer" not in headers
    sent += SIZE

    status, headers, body = await fetch("GET", url, Range="bytes=0-1023")
    assert status == 206 and headers["content-range"] == f"bytes 0-1023/{SIZE}" and body == firmware[:1024]
    sent += 1024

    # A download that stopped at 64,000 bytes, resumed where it stopped if the file is the same.
    _, _, first = await fetch("GET", url, Range="bytes=0-63999")
    status, headers, rest = await fetch("GET", url, Range="bytes=64000-", **{"If-Range": etag})
    assert status == 206 and headers["content-range"] == f"bytes 64000-{SIZE - 1}/{SIZE}"
    assert first + rest == firmware
    sent += SIZE
    # The same with another file's tag: the whole file again; several ranges: the whole file.
    status, _, body = await fetch("GET", url, Range="bytes=64000-", **{"If-Range": '"stale"'})
    assert status == 200 and body == firmware
    status, _, body = await fetch("GET", url, Range="bytes=0-9,20-29")
    assert status == 200 and body == firmware
    sent += 2 * SIZE
    status, headers, _ = await fetch("GET", url, Range=f"bytes={SIZE}-")
    assert status == 416 and headers["content-range"] == f"bytes */{SIZE}"

    # The server counts what nginx sent for this job, from nginx's log lines alone.
    assert await until(lambda: stack.bytes_served(job_id) == sent, timeout=10), stack.bytes_served(job_id)
    metrics = await stack.metrics()
    assert metrics[("ota_bytes_served_total", "protocol=http")] == sent
    assert metrics[("ota_download_requests_total", "status=206")] == 3
    assert metrics[("ota_download_requests_total", "status=200")] == 3
    # nginx sent them all (the server sent none itself): each hand-off's log line came.
    assert metrics[("ota_nginx_handoffs_total", "result=settled")] == 7
    assert metrics[("ota_nginx_handoffs_total", "result=abandoned")] == 0
    assert metrics[("ota_nginx_handoffs_waiting", "")] == 0
    _, _, body = await fetch("GET", f"{stack.nginx}/admin/api/devices/a1Test/ngx-1", **stack.admin)
    assert b'"served_percent": 100' in body

    # Log lines that are not nginx's for a download it was handed change nothing.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in (b"garbage", b"<190>Dec  7 00:15:33 ota_accel: ota1 " + b"0" * 32 + b" 200 160000",
                         f"<190>Dec  7 00:15:33 ota_accel: ota1 {job_id} 200 160000".encode(),
                         b"<190>Dec  7 00:15:33 ota_accel: ota1 " + b"a" * 32 + b" 200 " + b"9" * 15,
                         b"\xff" * 2000):
            sock.sendto(datagram, ("127.0.0.1", stack.log_port))
    status, _, _ = await fetch("GET", url, Range="bytes=0-99")  # a real one after them
    assert status == 206
    assert await until(lambda: stack.bytes_served(job_id) == sent + 100, timeout=10), stack.bytes_served(job_id)
    metrics = await stack.metrics()
    assert metrics[("ota_nginx_log_lines_ignored_total", "")] == 5
    assert metrics[("ota_nginx_handoffs_total", "result=settled")] == 8


async def test_a_transfer_cut_short_counts_what_nginx_sent(stack: Stack) -> None:
    url = await pushed_url(stack, "ngx-2")
    job_id = url_job(url)
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            assert response.status == 200
            await response.content.readexactly(1000)
            response.close()  # the device lost its link
    assert await until(lambda: stack.bytes_served(job_id) > 0, timeout=10)
    assert 1000 <= stack.bytes_served(job_id) <= SIZE


async def test_refusals_stay_the_servers(stack: Stack) -> None:
    url = await pushed_url(stack, "ngx-3")
    packages = stack.server.root / "packages"
    # A tampered signature, another device, another file: refused by the server, not served.
    sig = parse_qs(urlsplit(url).query)["sig"][0]
    for bad in (with_query(url, sig=("0" if sig[0] != "0" else "1") + sig[1:]), with_query(url, dn="ngx-4"),
                url.replace("fw-1.1.0.bin?", "fw-1.0.0.bin?"), url.split("?")[0]):
        status, headers, body = await fetch("GET", bad)
        assert status in (403, 404) and b'"code"' in body and "x-accel-redirect" not in headers, bad
    # Path tricks: the package folders are nginx-internal, and no path reaches past them.
    query = urlsplit(url).query
    internal = PREFIX[:-1] + quote(str(packages.resolve())) + "/fw-1.1.0.bin"
    for trick in (internal, f"{internal}?{query}", f"/files/fw-1.1.0/..{internal}?{query}",
                  f"/files/fw-1.1.0/..%2F..%2Fota.yaml?{query}", f"/files/..%2F..%2Fbroker.yaml/x?{query}",
                  f"/files/fw-1.1.0/fw-1.1.0.bin/../../../ota.yaml?{query}", "/files/fw-1.1.0/%2e%2e/ota.yaml"):
        async with aiohttp.ClientSession() as session:
            async with session.get(URL(stack.nginx + trick, encoded=True), allow_redirects=False,  # sent as is
                                   headers={"X-Ota-Accel": PREFIX, "X-Accel-Redirect": internal}) as response:
                body = await response.read()
                assert response.status in (400, 403, 404), (trick, response.status)
                assert stack.firmware[:64] not in body and b"product" not in body, trick

    # The job closes (an admin cancels it, through nginx): its URL is refused from then on.
    status, _, _ = await fetch("GET", url, Range="bytes=0-9")
    assert status == 206
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{stack.nginx}/admin/api/batches/up-1.1.0/cancel", json={"devices": ["ngx-3"]},
                                headers=stack.admin) as response:
            assert response.status == 200, await response.text()
    status, _, body = await fetch("GET", url, Range="bytes=0-9")
    assert status == 403 and b"canceled" in body

    # The package file changed under a live URL: 409, as without nginx.
    url = await pushed_url(stack, "ngx-5")
    firmware = packages / "fw-1.1.0.bin"
    stat = firmware.stat()
    os.utime(firmware, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    status, headers, body = await fetch("GET", url)
    assert status == 409 and "x-accel-redirect" not in headers and b"changed" in body


async def test_admin_console_and_device_api_through_nginx(stack: Stack) -> None:
    nginx = stack.nginx
    status, headers, body = await fetch("GET", f"{nginx}/admin/api/status", **stack.admin)
    assert status == 200 and b"up-1.1.0" in body and headers["cache-control"] == "no-store"
    status, _, _ = await fetch("GET", f"{nginx}/admin/api/status")
    assert status == 401
    basic = "Basic " + base64.b64encode(f"admin:{stack.token}".encode()).decode()
    status, headers, body = await fetch("GET", f"{nginx}/admin/", Authorization=basic)
    assert status == 200 and b"<html" in body.lower() and "content-security-policy" in headers
    status, _, _ = await fetch("GET", f"{nginx}/admin/static/console.js", Authorization=basic)
    assert status == 200
    status, _, body = await fetch("GET", f"{nginx}/healthz")
    assert status == 200 and b'"ok": true' in body
    status, _, body = await fetch("GET", f"{nginx}/metrics", **stack.admin)
    assert status == 200 and b"ota_bytes_served_total" in body
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{nginx}/admin/api/reload", headers=stack.admin) as response:
            assert response.status == 200
    # The device HTTP API (SagooIoT): its URL points at nginx too, and downloads through it.
    device = "Basic " + base64.b64encode(f"ngx-6&a1Test:{device_secret('ngx-6')}".encode()).decode()
    status, _, body = await fetch("GET", f"{nginx}/base-api/api/v1/get_ota_info?productKey=a1Test&deviceKey=ngx-6"
                                  "&version=1.0.0", Authorization=device)
    assert status == 200, body
    url = json.loads(body)["data"]["url"]
    assert url.startswith(nginx + "/files/")
    status, _, firmware = await fetch("GET", url)
    assert status == 200 and firmware == stack.firmware
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{nginx}/base-api/api/v1/write_ota_info", headers={"Authorization": device},
                                json={"productKey": "a1Test", "deviceKey": "ngx-6", "step": "100", "desc": ""}) as r:
            assert r.status == 200, await r.text()


# Requests whose answers through nginx and straight from the server are compared: the same
# status, body, Content-Range and ETag, whoever sends the bytes.
COMPARED = [
    {}, {"Range": "bytes=0-0"}, {"Range": "bytes=100-"}, {"Range": "bytes=-100"}, {"Range": "bytes=0-"},
    {"Range": f"bytes=159999-{SIZE + 50}"}, {"Range": "bytes=0-9,20-29"}, {"Range": "items=0-9"},
    {"Range": "bytes=-0"}, {"Range": f"bytes={SIZE}-"}, {"Range": "bytes=9-0"}, {"Range": "bytes=abc"},
    {"Range": "bytes=0-9", "If-Range": "ETAG"}, {"Range": "bytes=0-9", "If-Range": '"other"'},
    {"Range": "bytes=0-9", "If-Range": "W/ETAG"}, {"Range": "bytes=0-9", "If-Range": "LASTMOD"},
    {"Range": "bytes=0-9", "If-Range": "Mon, 07 Dec 2020 00:00:00 GMT"}, {"If-None-Match": "ETAG"},
    {"If-None-Match": '"other"'},
    {"If-Match": '"other"'}, {"If-Match": "ETAG"}, {"If-Modified-Since": "Mon, 07 Dec 2099 00:00:00 GMT"},
    {"?": "offset=10&length=20"}, {"?": "offset=159990"},
]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_answers_match_the_server_serving_itself(stack: Stack, method: str) -> None:
    url = await pushed_url(stack, f"ngx-{method}")
    etag = f'"{hashlib.sha256(stack.firmware).hexdigest()}"'
    direct = url.replace(stack.nginx, stack.server.http_url)
    _, headers, _ = await fetch("HEAD", direct)
    last_modified = headers["last-modified"]
    for sent in COMPARED:
        headers = {name: value.replace("ETAG", etag).replace("LASTMOD", last_modified)
                   for name, value in sent.items() if name != "?"}
        suffix = "&" + sent["?"] if "?" in sent else ""
        through = await fetch(method, url + suffix, **headers)
        straight = await fetch(method, direct + suffix, **headers)
        assert through[0] == straight[0], (sent, through[0], straight[0])
        if through[0] in (200, 206):
            assert through[2] == straight[2], sent
            for name in ("content-range", "etag", "content-length", "content-type", "cache-control",
                         "last-modified"):
                assert through[1].get(name) == straight[1].get(name), (sent, name)
        elif through[0] == 416:
            assert through[1]["content-range"] == straight[1]["content-range"], sent


async def test_a_patch_from_data_dir_through_nginx(tmp_path: Path) -> None:
    base = BASE_CATALOG.replace("sign_method: MD5}", "sign_method: MD5, diff_from: [1.0.0]}")
    async with nginx_in_front(tmp_path, base) as stack:
        async with Device(stack.server.view, "ngx-diff") as device:
            await device.inform("1.0.0")
            data = (await device.next_push())["data"]
        status, headers, patch = await fetch("GET", data["url"])
        assert status == 200 and headers["server"] == "nginx" and data["isDiff"] == 1
        assert hashlib.md5(patch).hexdigest() == data["sign"]
        old = (tmp_path / "packages" / "fw-1.0.0.bin").read_bytes()
        assert bsdiff4.patch(old, patch) == stack.firmware
        job_id = url_job(data["url"])
        assert await until(lambda: stack.bytes_served(job_id) == len(patch), timeout=10)
