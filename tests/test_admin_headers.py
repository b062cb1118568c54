"""The protective headers of the web console, the admin API and /metrics (docs/operations.md,
"Headers of the console and the admin API"), on answers and errors alike, and not on
downloads or the device API; and the batch report's `state`, `offset` and `limit`, checked as
the devices API checks them."""
from __future__ import annotations

import asyncio
import base64
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.faults import idle, refuse_writes
from support.harness import BASE_CATALOG, Device, OtaServer, write_catalog

from otacore.storage import journal as journal_module

CSP = "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
PROTECTIVE = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
              "Referrer-Policy": "no-referrer"}


def bearer(server: OtaServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.admin_token}"}


def browser_login(server: OtaServer) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"admin:{server.admin_token}".encode()).decode()}


async def answer(server: OtaServer, path: str, headers: dict[str, str] | None = None,
                 method: str = "GET") -> tuple[int, Any, bytes]:
    async with aiohttp.ClientSession() as http, \
            http.request(method, server.http_url + path, headers=headers or {}, allow_redirects=False) as response:
        return response.status, response.headers, await response.read()


def assert_protected(path: str, headers: Any, cache: str = "no-store") -> None:
    for name, value in PROTECTIVE.items():
        assert headers.get(name) == value, (path, name, headers.get(name))
    assert headers.get("Cache-Control") == cache, (path, headers.get("Cache-Control"))


async def test_console_api_and_metrics_answers_carry_the_headers_errors_too(server: OtaServer) -> None:
    async with Device(server, "hdr-1") as device:
        await device.inform("1.0.0")
        await device.next_push()
    cases = [  # (path, headers, method, status, Cache-Control)
        ("/admin/", browser_login(server), "GET", 200, "no-store"),
        ("/admin/", None, "GET", 401, "no-store"),
        ("/admin/static/console.js", browser_login(server), "GET", 200, "no-cache"),
        ("/admin/static/console.css", browser_login(server), "GET", 200, "no-cache"),
        ("/admin/static/nope.js", browser_login(server), "GET", 404, "no-cache"),
        ("/admin/batches/up-1.1.0", browser_login(server), "GET", 302, "no-store"),
        ("/admin/api/status", bearer(server), "GET", 200, "no-store"),
        ("/admin/api/batches/up-1.1.0", bearer(server), "GET", 200, "no-store"),
        ("/admin/api/devices", bearer(server), "GET", 200, "no-store"),
        ("/admin/api/status", None, "GET", 401, "no-store"),
        ("/admin/api/batches/nope", bearer(server), "GET", 404, "no-store"),
        ("/admin/api/batches/up-1.1.0?limit=-1", bearer(server), "GET", 400, "no-store"),
        ("/admin/api/no-such-thing", bearer(server), "GET", 404, "no-store"),  # the router's own 404
        ("/admin/api/status", bearer(server), "POST", 405, "no-store"),  # and its 405
        ("/admin/api/reload", None, "POST", 401, "no-store"),
        ("/metrics", bearer(server), "GET", 200, "no-store"),
        ("/metrics", None, "GET", 401, "no-store"),
        ("/metrics/", bearer(server), "GET", 404, "no-store"),  # near misses of the paths too
        ("/ADMIN/", None, "GET", 404, "no-store"),
        ("/healthz", None, "GET", 200, "no-store"),
    ]
    for path, headers, method, status, cache in cases:
        got, answered, body = await answer(server, path, headers, method)
        assert got == status, (method, path, got, body[:200])
        assert_protected(path, answered, cache)
    # The page loads its code from this server only: nothing inline for the policy to refuse.
    _, _, page = await answer(server, "/admin/", browser_login(server))
    assert b"<script src=\"/admin/static/console.js\"></script>" in page
    assert b"<script>" not in page and b"style=" not in page


async def test_a_503_of_the_admin_api_carries_the_headers(server: OtaServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_module, "RETRY_SECONDS", 0.1)
    async with Device(server, "hdr-503") as device:
        await device.inform("1.0.0")
        await device.next_push()
        await server.engine.settled()
        refuse_writes(await idle(server.engine.journal), True)  # the disk is full from here
        report = asyncio.ensure_future(device.progress(50, "downloading"))
        try:
            for _ in range(100):
                status, headers, body = await answer(server, "/admin/api/status?removed=true", bearer(server))
                if status == 503:
                    break
                await asyncio.sleep(0.05)
            assert status == 503 and b"the database is behind" in body, (status, body)
            assert_protected("/admin/api/status (503)", headers)
        finally:
            refuse_writes(await idle(server.engine.journal), False)
            await asyncio.wait_for(report, 5)


async def test_downloads_and_the_device_api_keep_their_own_headers(server: OtaServer) -> None:
    status, headers, _ = await answer(server, "/files/fw-1.1.0/fw-1.1.0.bin", {**bearer(server), "Range": "bytes=0-9"})
    assert status == 206 and headers["Cache-Control"] == "private, no-transform" and headers["ETag"]
    status, headers, _ = await answer(server, "/files/fw-1.1.0/fw-1.1.0.bin", bearer(server))
    assert status == 200 and headers["Cache-Control"] == "private, no-transform"
    status, headers, _ = await answer(server, "/files/nope/nope.bin", bearer(server))
    assert status == 404
    status, device_api, _ = await answer(server, "/base-api/api/v1/get_ota_info")
    assert status == 401
    for answered in (headers, device_api):
        assert "no-store" not in answered.get("Cache-Control", "")
        assert not any(name in answered for name in PROTECTIVE), dict(answered)


# -- the batch report's query ------------------------------------------------------------------

LISTED = [f"n-{i:03d}" for i in range(60)]
FLEET = BASE_CATALOG.replace("      - name: MCU\n", "      - name: MCU\n    devices:\n" + "".join(
    f"      - {{name: {name}}}\n" for name in LISTED))


async def get_json(server: OtaServer, path: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(server.http_url + path, headers=bearer(server)) as response:
        return response.status, await response.json()


async def test_the_batch_report_checks_state_offset_and_limit_as_the_devices_api_does(tmp_path: Path) -> None:
    # A static batch of 60 listed devices, none of which reported yet: 60 waiting_report rows.
    write_catalog(tmp_path, textwrap.dedent(f"""
    - {{name: listed, package: fw-1.1.0, type: upgrade, protocol: http, mode: static,
       devices: [{', '.join(LISTED)}]}}
    """), base=FLEET)
    server = await OtaServer(tmp_path).start()
    report = "/admin/api/batches/listed"
    try:
        for bad in ("offset=99999999999", "offset=-1", "offset=1e3", "limit=-1", "limit=%C2%B2", "limit=1_0"):
            status, body = await get_json(server, f"{report}?{bad}")
            devices_status, devices_body = await get_json(server, f"/admin/api/devices?{bad}")
            assert status == devices_status == 400, (bad, body)
            assert body == devices_body, bad  # the same one-line message
            assert body["code"] == 400 and "\n" not in body["message"] and "whole number" in body["message"]
        status, body = await get_json(server, f"{report}?state=bogus")
        assert status == 400 and body["message"].startswith("state='bogus' is not a state")
        assert "waiting_report" in body["message"] and "\n" not in body["message"]

        status, body = await get_json(server, report)  # the devices API's default page
        assert status == 200 and (body["total"], body["offset"], body["limit"], len(body["devices"])) == (60, 0, 50, 50)
        assert body["batch"]["name"] == "listed"
        status, body = await get_json(server, f"{report}?offset=50&limit=50")
        assert [d["device"] for d in body["devices"]] == LISTED[50:]
        status, body = await get_json(server, f"{report}?offset=999999999")  # past the end: an empty page
        assert status == 200 and body["total"] == 60 and body["devices"] == []
        status, body = await get_json(server, f"{report}?limit=100000")  # lowered to the devices API's cap
        assert status == 200 and body["limit"] == 500 and len(body["devices"]) == 60
        status, body = await get_json(server, f"{report}?state=waiting_report&limit=5")
        assert status == 200 and body["total"] == 60 and len(body["devices"]) == 5
        status, body = await get_json(server, f"{report}?state=failed&offset=&limit=")  # empty means the default
        assert status == 200 and body["total"] == 0 and body["limit"] == 50
    finally:
        await server.stop()
