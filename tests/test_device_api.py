"""The admin JSON API for devices, versions and packages: a real server, real MQTT devices,
real HTTP (filters, paging, a device's page with its job history, 401 and 404); and the
device list over 10,000 devices in memory, timed."""
from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from support.harness import Device, OtaServer, device_secret, make_firmware, write_catalog
from otacore.protocol.credentials import DeviceId
from otacore.views.devices import DeviceQuery, device_list, version_counts
from otacore.fleet.state import FleetState
from otacore.fleet.jobs import NewJob

CATALOG = """
packages_dir: packages
products:
  - key: a1Test
    name: Test product
    secret: test-product-secret
    modules:
      - name: MCU
    devices:
      - name: listed-1
        tags: [lab, beta]
  - key: b2Other
    secret: other-secret
packages:
  - {id: fw-1.0.0, product: a1Test, version: 1.0.0, file: fw-1.0.0.bin, sign_method: SHA256}
  - {id: fw-1.1.0, product: a1Test, version: 1.1.0, file: fw-1.1.0.bin, sign_method: MD5}
  - {id: fw-1.2.0, product: a1Test, version: 1.2.0, file: fw-1.2.0.bin, sign_method: SHA256, verify: true}
batches:
  - {name: up-1.1.0, package: fw-1.1.0, type: upgrade, protocol: http, mode: dynamic, push: true}
"""


class Admin:
    def __init__(self, server: OtaServer, http: aiohttp.ClientSession) -> None:
        self.server, self.http = server, http

    async def get(self, path: str, token: str | None = "", expect: int = 200) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token or self.server.admin_token}"} if token is not None else {}
        async with self.http.get(f"{self.server.http_url}{path}", headers=headers) as response:
            body = await response.json()
            assert response.status == expect, (path, response.status, body)
            return body

    async def names(self, query: str) -> list[str]:
        body = await self.get(f"/admin/api/devices?{query}")
        assert body["total"] == len(body["devices"]) or body["limit"] < body["total"]
        return [d["device"] for d in body["devices"]]


@pytest.fixture
async def fleet(tmp_path: Path):  # type: ignore[no-untyped-def]
    """dev-a: upgrading (40%), online. dev-b: on 1.1.0, gone offline. dev-c: failed, retried,
    online. dev-d: default 1.1.0 and MCU 2.0.0, online. ot-1 (product b2Other): 3.0.0, offline.
    listed-1: in the catalog, never connected."""
    make_firmware(tmp_path / "packages" / "fw-1.2.0.bin", 120_000, 3)
    write_catalog(tmp_path, base=CATALOG)
    server = await OtaServer(tmp_path).start()
    started = time.time()
    async with aiohttp.ClientSession() as http, \
            Device(server, "dev-a") as dev_a, Device(server, "dev-c") as dev_c, Device(server, "dev-d") as dev_d:
        admin = Admin(server, http)
        await dev_a.inform("1.0.0")
        await dev_a.next_push()
        await dev_a.progress(40, "downloading")
        async with Device(server, "dev-b") as dev_b:
            await dev_b.inform("1.1.0")
        async with Device(server, "ot-1", secret=device_secret("ot-1", "other-secret"),
                          product_key="b2Other") as other:
            await other.inform("3.0.0")
        await dev_c.inform("1.0.0")
        await dev_c.next_push()
        await dev_c.progress(-3, "bad signature")
        await server.wait_state("dev-c", "failed")
        async with http.post(f"{server.http_url}/admin/api/batches/up-1.1.0/retry", json={"devices": ["dev-c"]},
                             headers={"Authorization": f"Bearer {server.admin_token}"}) as response:
            assert response.status == 200 and (await response.json())["retried"] == 1
        await dev_c.next_push()
        await dev_d.inform("1.1.0")
        await dev_d.inform("2.0.0", module="MCU")
        await server.wait_state("dev-a", "in_progress")
        await server.wait_state("dev-c", "notified")
        deadline = time.monotonic() + 5
        while server.engine.state.version(DeviceId("a1Test", "dev-d"), "MCU") is None or \
                server.engine.is_online(DeviceId("a1Test", "dev-b")):
            assert time.monotonic() < deadline, "dev-d's MCU report or dev-b's disconnect never arrived"
            await asyncio.sleep(0.02)
        yield admin, started
    await server.stop()


async def test_device_list_filters_and_pages(fleet: tuple[Admin, float]) -> None:
    admin, started = fleet
    everyone = await admin.get("/admin/api/devices")
    assert everyone["total"] == 6 and everyone["offset"] == 0 and everyone["limit"] == 50
    assert [(d["product"], d["device"]) for d in everyone["devices"]] == [
        ("a1Test", "dev-a"), ("a1Test", "dev-b"), ("a1Test", "dev-c"), ("a1Test", "dev-d"), ("a1Test", "listed-1"),
        ("b2Other", "ot-1")]
    by_name = {d["device"]: d for d in everyone["devices"]}
    dev_a = by_name["dev-a"]
    assert dev_a["versions"] == {"default": "1.0.0"} and dev_a["online"] is True
    assert started - 1 <= dev_a["last_seen"] <= time.time()
    assert dev_a["job"] == {"id": dev_a["job"]["id"], "batch": "up-1.1.0", "module": "default",
                            "state": "in_progress", "progress": 40, "served_percent": 0, "code": None, "failure": None,
                            "message": "downloading"}
    assert by_name["dev-b"]["online"] is False and by_name["dev-b"]["last_seen"] >= started - 1
    assert by_name["dev-b"]["job"] is None
    assert by_name["dev-d"]["versions"] == {"MCU": "2.0.0", "default": "1.1.0"}
    assert by_name["listed-1"] == {"product": "a1Test", "device": "listed-1", "versions": {}, "online": False,
                                   "last_seen": None, "job": None}

    assert await admin.names("product=b2Other") == ["ot-1"]
    assert await admin.names("module=MCU") == ["dev-d"]
    assert await admin.names("module=MCU&version=2.0.0") == ["dev-d"]
    assert await admin.names("module=MCU&version=1.1.0") == []
    assert await admin.names("version=1.1.0") == ["dev-b", "dev-d"]
    assert await admin.names("version=1.0.0&product=a1Test") == ["dev-a", "dev-c"]
    assert await admin.names("online=true") == ["dev-a", "dev-c", "dev-d"]
    assert await admin.names("online=false") == ["dev-b", "listed-1", "ot-1"]
    assert await admin.names("state=in_progress") == ["dev-a"]
    assert await admin.names("state=notified") == ["dev-c"]  # its latest job: the retry
    assert await admin.names("state=failed") == []
    assert await admin.names("q=DEV-") == ["dev-a", "dev-b", "dev-c", "dev-d"]
    assert await admin.names("q=ot&online=false") == ["ot-1"]

    pages = []
    for offset in (0, 2, 4, 6):
        page = await admin.get(f"/admin/api/devices?offset={offset}&limit=2")
        assert page["total"] == 6 and page["offset"] == offset and page["limit"] == 2
        pages.append([d["device"] for d in page["devices"]])
    assert pages == [["dev-a", "dev-b"], ["dev-c", "dev-d"], ["listed-1", "ot-1"], []]
    assert (await admin.get("/admin/api/devices?limit=100000"))["limit"] == 500  # at most 500 a page

    for bad, word in (("online=yes", "online"), ("state=done", "state"), ("limit=-1", "limit"),
                      ("offset=1.5", "offset"), ("limit=%C2%B2", "limit")):
        error = await admin.get(f"/admin/api/devices?{bad}", expect=400)
        assert error["code"] == 400 and word in error["message"] and "\n" not in error["message"]


async def test_device_page_has_every_job_with_its_history(fleet: tuple[Admin, float]) -> None:
    admin, started = fleet
    page = await admin.get("/admin/api/devices/a1Test/dev-c")
    assert page["product"] == "a1Test" and page["device"] == "dev-c" and page["online"] is True
    assert page["tags"] == [] and started - 1 <= page["last_seen"] <= time.time()
    assert page["versions"]["default"]["version"] == "1.0.0"
    assert started - 1 <= page["versions"]["default"]["reported_at"] <= time.time()
    retried, failed = page["jobs"]  # newest first
    assert retried["id"] > failed["id"] and retried["batch"] == failed["batch"] == "up-1.1.0"
    assert (retried["state"], retried["from"], retried["to"]) == ("notified", "1.0.0", "1.1.0")
    assert (failed["state"], failed["code"], failed["failure"], failed["message"]) == \
        ("failed", -3, "verify", "bad signature")
    assert retried["failure"] is None
    assert [event["to"] for event in failed["history"]][:3] == ["queued", "notified", "failed"]
    assert failed["history"][0]["from"] is None and "bad signature" in failed["history"][2]["reason"]
    assert [event["to"] for event in retried["history"]][-1] == "notified"
    for job in (retried, failed):
        assert set(job) == {"id", "batch", "module", "state", "from", "to", "progress", "served_percent", "code",
                            "failure", "message", "created_at", "updated_at", "history"}
        assert all(set(event) == {"at", "from", "to", "progress", "reason"} for event in job["history"])
        assert job["created_at"] <= job["updated_at"]

    listed = await admin.get("/admin/api/devices/a1Test/listed-1")
    assert listed == {"product": "a1Test", "device": "listed-1", "online": False, "last_seen": None,
                      "tags": ["lab", "beta"], "versions": {}, "jobs_total": 0, "offset": 0, "limit": 50, "jobs": []}
    # A page of the jobs: the newest first, how many there are, bad values refused.
    older = await admin.get("/admin/api/devices/a1Test/dev-c?offset=1&limit=1")
    assert older["jobs_total"] == 2 and [job["id"] for job in older["jobs"]] == [failed["id"]]
    assert (await admin.get("/admin/api/devices/a1Test/dev-c?limit=-1", expect=400))["message"]
    assert (await admin.get("/admin/api/devices/a1Test/dev-d"))["versions"].keys() == {"MCU", "default"}
    for unknown in ("a1Test/nobody", "zzz/dev-a", "b2Other/dev-a"):
        error = await admin.get(f"/admin/api/devices/{unknown}", expect=404)
        assert error["code"] == 404 and "never reported a version" in error["message"]


async def test_versions_and_packages(fleet: tuple[Admin, float], tmp_path: Path) -> None:
    admin, _ = fleet
    assert (await admin.get("/admin/api/versions")) == {"modules": [
        {"product": "a1Test", "module": "MCU", "versions": {"2.0.0": 1}},
        {"product": "a1Test", "module": "default", "versions": {"1.0.0": 2, "1.1.0": 2}},
        {"product": "b2Other", "module": "default", "versions": {"3.0.0": 1}},
    ]}
    packages = (await admin.get("/admin/api/packages"))["packages"]
    assert [p["id"] for p in packages] == ["fw-1.0.0", "fw-1.1.0", "fw-1.2.0"]
    for package in packages:
        data = (tmp_path / "packages" / package["file"]).read_bytes()
        assert package["size"] == len(data) and package["type"] == "full" and package["product"] == "a1Test"
        assert package["md5"] == hashlib.md5(data).hexdigest()
        assert package["sha256"] == hashlib.sha256(data).hexdigest()
        assert package["module"] == "default" and package["file"] == f"{package['id']}.bin"
    assert [(p["version"], p["sign_method"], p["status"]) for p in packages] == [
        ("1.0.0", "SHA256", "no verification required"), ("1.1.0", "MD5", "no verification required"),
        ("1.2.0", "SHA256", "unverified")]


async def test_the_api_needs_the_admin_token(fleet: tuple[Admin, float]) -> None:
    admin, _ = fleet
    for path in ("/admin/api/devices", "/admin/api/devices/a1Test/dev-a", "/admin/api/versions",
                 "/admin/api/packages"):
        missing = await admin.get(path, token=None, expect=401)
        assert missing["code"] == 401 and "admin token required" in missing["message"]
        wrong = await admin.get(path, token="not-the-token", expect=401)
        assert "wrong admin token" in wrong["message"]


def test_the_list_stays_fast_at_10000_devices() -> None:
    """No database read, no per-device work beyond a few dict lookups: well under 0.1 s
    per request on this machine (the bound here is loose for slow CI)."""
    state = FleetState()
    for i in range(10_000):
        device = DeviceId("a1Test", f"dev-{i:05d}")
        state.load_version(device, "default", "1.0.0" if i % 3 else "1.1.0", 1.0)
        state.load_version(device, "MCU", "2.0.0", 1.0)
        if i % 2:
            state.create_job("up", NewJob(device, "default", "fw", "1.0.0", "1.1.0", "fw", 100), "test", 1.0)
    online_calls: list[DeviceId] = []

    def online(device: DeviceId) -> bool:
        online_calls.append(device)
        return device.device_name.endswith("7")

    for query, total in ((DeviceQuery(), 10_000), (DeviceQuery(online=True), 1_000),
                         (DeviceQuery(state="queued", limit=500), 5_000),
                         (DeviceQuery(q="99", module="MCU", version="2.0.0"), 280),
                         (DeviceQuery(offset=9_990), 10_000)):
        online_calls.clear()
        began = time.perf_counter()
        result = device_list(state, None, query, online, lambda device: None)
        took = time.perf_counter() - began
        assert result["total"] == total and took < 0.5, (query, took)
        if query.online is None:
            assert len(online_calls) == len(result["devices"])  # asked for the page only
    assert version_counts(state)["modules"][1]["versions"] == {"1.0.0": 6_666, "1.1.0": 3_334}
