"""HTTP package downloads (docs/protocol.md 5): signed URLs, Range, HEAD, 416, ETag, offset/length."""
from __future__ import annotations

import hashlib
import time
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import aiohttp
import pytest

from fileserver.app import OPEN_FILES
from support.harness import Device, OtaServer
from otacore.protocol.credentials import DeviceId
from otacore.downloads.signed_urls import sign_url


@pytest.fixture
async def url(server: OtaServer) -> str:
    async with Device(server, "dl-1") as device:
        await device.inform("1.0.0")
        return (await device.next_push())["data"]["url"]


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


async def fetch(method: str, url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.request(method, url, headers=headers) as response:
        return response.status, {k.lower(): v for k, v in response.headers.items()}, await response.read()


async def test_get_whole_file_with_strong_etag(server: OtaServer, url: str) -> None:
    status, headers, body = await fetch("GET", url)
    assert status == 200 and headers["accept-ranges"] == "bytes" and "last-modified" in headers
    assert headers["etag"] == f'"{hashlib.sha256(body).hexdigest()}"'


async def test_head_gives_size_without_body(server: OtaServer, url: str) -> None:
    status, headers, body = await fetch("HEAD", url)
    assert status == 200 and int(headers["content-length"]) == 160_000 and body == b""


async def test_range_resume_and_unsatisfiable(server: OtaServer, url: str) -> None:
    status, headers, body = await fetch("GET", url, Range="bytes=159990-")
    assert status == 206 and headers["content-range"] == "bytes 159990-159999/160000" and len(body) == 10
    status, headers, _ = await fetch("GET", url, Range="bytes=160000-")
    assert status == 416 and headers["content-range"] == "bytes */160000"


async def test_offset_and_length_query_slice(server: OtaServer, url: str) -> None:
    _, _, whole = await fetch("GET", url)
    status, headers, body = await fetch("GET", with_query(url, offset="1000", length="24"))
    assert status == 206 and body == whole[1000:1024]
    status, _, _ = await fetch("GET", with_query(url, offset="-5"))
    assert status == 400


async def test_if_range_and_if_none_match(server: OtaServer, url: str) -> None:
    _, headers, whole = await fetch("GET", url)
    etag = headers["etag"]
    status, _, body = await fetch("GET", url, Range="bytes=0-9", **{"If-Range": etag})
    assert status == 206 and body == whole[:10]
    status, _, body = await fetch("GET", url, Range="bytes=0-9", **{"If-Range": '"stale"'})
    assert status == 200 and body == whole
    status, _, _ = await fetch("GET", url, **{"If-None-Match": etag})
    assert status == 304


async def test_altered_foreign_and_expired_urls_are_403(server: OtaServer, url: str) -> None:
    query = parse_qs(urlsplit(url).query)
    sig = query["sig"][0]
    altered = with_query(url, sig=("0" if sig[0] != "0" else "1") + sig[1:])
    for bad in (altered, with_query(url, dn="dl-2"), with_query(url, exp=str(int(time.time()) + 999_999)),
                url.replace("fw-1.1.0.bin?", "fw-1.0.0.bin?"), url.split("?")[0]):
        status, _, _ = await fetch("GET", bad)
        assert status in (403, 404), bad
    # A URL signed an hour ago with a one-minute lifetime: valid signature, but expired.
    engine = server.engine
    job = (await engine.store.jobs())[0]
    old = sign_url(engine.downloads._url_key, server.http_url, job.file_key, "fw-1.1.0.bin",
                   DeviceId("a1Test", "dl-1"), job.id, 60, now=time.time() - 3600)
    status, _, body = await fetch("GET", old)
    assert status == 403 and b"expired" in body


async def test_admin_token_downloads_without_signature(server: OtaServer) -> None:
    plain = f"{server.http_url}/files/fw-1.0.0/fw-1.0.0.bin"
    status, _, _ = await fetch("GET", plain)
    assert status == 403
    status, _, body = await fetch("GET", plain, Authorization=f"Bearer {server.admin_token}")
    assert status == 200 and len(body) == 150_000


async def test_bytes_served_are_counted_per_job(server: OtaServer, url: str) -> None:
    await fetch("GET", url, Range="bytes=0-999")
    await fetch("HEAD", url)
    await server.engine.settled()  # bytes served are telemetry: written with the next commit
    job = (await server.engine.store.jobs())[0]
    assert job.bytes_served == 1000


async def test_file_names_that_need_percent_encoding(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from support.harness import BASE_CATALOG, make_firmware, write_catalog
    make_firmware(tmp_path / "packages" / "固件 v2.bin", 1000, 5)
    base = BASE_CATALOG.rstrip() + "\n  - {id: fw-2, product: a1Test, version: 2.0.0, file: '固件 v2.bin'}\n"
    write_catalog(tmp_path, "- {name: up2, package: fw-2, type: upgrade, mode: dynamic}\n", base=base)
    server = await OtaServer(tmp_path).start()
    try:
        async with Device(server, "enc-1") as device:
            await device.inform("1.0.0")
            url = (await device.next_push())["data"]["url"]
        status, _, body = await fetch("GET", url)
        assert status == 200 and len(body) == 1000
    finally:
        await server.stop()


async def test_a_file_replaced_in_place_is_not_served_under_the_old_hash(server: OtaServer, url: str) -> None:
    path = server.root / "packages" / "fw-1.1.0.bin"
    path.write_bytes(path.read_bytes()[::-1])  # same size, new bytes, new mtime
    status, _, _ = await fetch("GET", url, Range="bytes=0-99")
    assert status == 409


async def test_several_ranges_get_the_whole_file(server: OtaServer, url: str) -> None:
    status, _, body = await fetch("GET", url, Range="bytes=0-9,20-29")
    assert status == 200 and len(body) == 160_000


def test_package_files_skip_the_thread_pool() -> None:
    # fileserver/aiohttp_internals.py sends package files through aiohttp's FileResponse internals
    # without its per-request thread hops; if aiohttp moved them it silently falls back: say so here.
    from fileserver.aiohttp_internals import DIRECT_FILE_SEND
    assert DIRECT_FILE_SEND, "aiohttp's FileResponse internals moved; update PackageResponse._send"


async def test_concurrent_ranges_share_one_handle_and_get_their_own_bytes(server: OtaServer, url: str) -> None:
    # Transfers over plain TCP share one open handle per package file (sendfile reads at
    # explicit offsets); interleaved transfers must still each get exactly their slice.
    import asyncio
    _, _, whole = await fetch("GET", url)
    pieces = [(start, min(start + 9_999, len(whole) - 1)) for start in range(0, len(whole), 10_000)]
    results = await asyncio.gather(*(fetch("GET", url, Range=f"bytes={a}-{b}") for a, b in pieces * 4))
    for (a, b), (status, _, body) in zip(pieces * 4, results):
        assert status == 206 and body == whole[a:b + 1]
    open_files = server.plugin.runtime._runner.app[OPEN_FILES]  # type: ignore[union-attr]
    assert len(open_files._open) == 1


async def test_short_of_connections_each_transfer_closes_its_own(server: OtaServer, url: str) -> None:
    # Near the open-files limit the listeners wait; transfers then close their connection so
    # devices waiting to connect take turns instead of waiting for whole downloads.
    from aiohttp.test_utils import TestServer
    from fileserver.app import create_app
    crowded = TestServer(create_app(server.engine, server.admin_token, crowded=lambda: True), host="127.0.0.1")
    await crowded.start_server()
    try:
        parts = urlsplit(url)
        status, headers, body = await fetch("GET", f"http://127.0.0.1:{crowded.port}{parts.path}?{parts.query}",
                                            Range="bytes=0-99")
        assert status == 206 and len(body) == 100 and headers["connection"].lower() == "close"
        status, headers, _ = await fetch("GET", url, Range="bytes=0-99")  # the real server is not crowded
        assert status == 206 and headers.get("connection", "").lower() != "close"
    finally:
        await crowded.close()


def _deleted_files_held(path: str) -> list[str]:
    """This process's descriptors that point at `path`, deleted."""
    import os
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target == f"{path} (deleted)":
            held.append(target)
    return held


async def test_a_package_removed_and_deleted_gives_its_handle_back_at_the_reload(server: OtaServer, url: str) -> None:
    # Each removed package used to keep a descriptor for good: its disk space never freed.
    from support.harness import BASE_CATALOG, write_catalog
    assert (await fetch("GET", url, Range="bytes=0-99"))[0] == 206  # the handle is open now
    open_files = server.plugin.runtime._runner.app[OPEN_FILES]  # type: ignore[union-attr]
    assert open_files.count == 1
    image = server.root / "packages" / "fw-1.1.0.bin"
    write_catalog(server.root, base=BASE_CATALOG.replace(
        "  - {id: fw-1.1.0, product: a1Test, version: 1.1.0, file: fw-1.1.0.bin, sign_method: MD5}\n", ""))
    image.unlink()
    await server.engine.reload()
    assert open_files.count == 0 and not _deleted_files_held(str(image))
    import json
    hashed = json.loads((server.root / "var" / "file-hashes.json").read_text())
    assert str(image) not in hashed and any(key.endswith("fw-1.0.0.bin") for key in hashed)  # the cache forgets it
    async with aiohttp.ClientSession() as http, http.get(f"{server.http_url}/metrics",
                                                         headers={"Authorization": f"Bearer {server.admin_token}"}) as r:
        assert "ota_package_handles_open 0.0" in await r.text()


async def test_a_retired_handle_stays_open_while_a_transfer_uses_it(server: OtaServer, url: str) -> None:
    # It was closed 600 s after its package left the catalog, users or not: a slow transfer
    # then sent the bytes of whatever file took its descriptor number next.
    from fileserver.app import OpenPackageFiles
    files = OpenPackageFiles()
    [download] = [d for d in server.engine.package_files() if d.key == "fw-1.1.0"]
    lease = files.get(download)
    files.retain([])  # the package left the catalog
    assert not lease.file.closed and files.count == 1
    lease.release()  # the transfer ended
    assert lease.file.closed and files.count == 0
    files.close()
