"""Batch lifecycle: verification gating, priorities, reload rules, diff packages, modules."""
from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path

import aiohttp
import bsdiff4
import pytest

from support.harness import BASE_CATALOG, Device, OtaServer, write_catalog
from otacore.errors import ConfigError

VERIFIED_PACKAGE = """
  - {id: fw-2.0.0, product: a1Test, version: 2.0.0, file: fw-1.1.0.bin, sign_method: SHA256, verify: true}
"""


async def test_upgrade_waits_for_verification_then_starts(tmp_path: Path) -> None:
    write_catalog(tmp_path, """
    - {name: verify-2, package: fw-2.0.0, type: verify, devices: [tester], protocol: http, mode: static}
    - {name: fleet-2, package: fw-2.0.0, type: upgrade, protocol: http, mode: dynamic}
    """, base=BASE_CATALOG.rstrip() + VERIFIED_PACKAGE)
    server = await OtaServer(tmp_path).start()
    try:
        rows = await server.engine.store.batches()
        assert rows["fleet-2"].state == "waiting_verification"
        async with Device(server, "fleet-a") as fleet:
            await fleet.inform("1.0.0")
            await fleet.expect_nothing(0.3)  # unverified: the fleet waits
            async with Device(server, "tester") as tester:
                await tester.inform("1.0.0")
                assert (await tester.next_push())["data"]["version"] == "2.0.0"
                await tester.progress(100)
                await tester.inform("2.0.0")
                await server.wait_state("tester", "succeeded")
            assert (await fleet.next_push())["data"]["version"] == "2.0.0"  # started on its own
        assert (await server.engine.store.package_statuses())["fw-2.0.0"][0] == "verified"
        # The completed verify batch removed, then written again: its name is spent, as a
        # canceled one's is (its jobs left memory with its removal).
        assert (await server.engine.store.batches())["verify-2"].state == "completed"
        write_catalog(tmp_path, """
        - {name: fleet-2, package: fw-2.0.0, type: upgrade, protocol: http, mode: dynamic}
        """, base=BASE_CATALOG.rstrip() + VERIFIED_PACKAGE)
        await server.engine.reload()
        write_catalog(tmp_path, """
        - {name: verify-2, package: fw-2.0.0, type: verify, devices: [tester], protocol: http, mode: static}
        - {name: fleet-2, package: fw-2.0.0, type: upgrade, protocol: http, mode: dynamic}
        """, base=BASE_CATALOG.rstrip() + VERIFIED_PACKAGE)
        with pytest.raises(ConfigError) as refused:
            await server.engine.reload()
        assert "this batch was removed (completed) earlier; give it a new name" in str(refused.value)
    finally:
        await server.stop()


async def test_verify_failure_marks_the_package(tmp_path: Path) -> None:
    write_catalog(tmp_path, """
    - {name: verify-2, package: fw-2.0.0, type: verify, devices: [tester], protocol: http, mode: static}
    """, base=BASE_CATALOG.rstrip() + VERIFIED_PACKAGE)
    server = await OtaServer(tmp_path).start()
    try:
        async with Device(server, "tester") as tester:
            await tester.inform("1.0.0")
            await tester.next_push()
            await tester.progress(-4, "flash failed")
            await server.wait_state("tester", "failed")
        assert (await server.engine.store.package_statuses())["fw-2.0.0"][0] == "verify_failed"
    finally:
        await server.stop()


async def test_verify_batch_wins_over_a_later_upgrade_batch(tmp_path: Path) -> None:
    write_catalog(tmp_path, """
    - {name: verify-1.1, package: fw-1.1.0, type: verify, devices: [pick-me], protocol: http, mode: static}
    - {name: fleet-1.1, package: fw-1.1.0, type: upgrade, protocol: http, mode: dynamic}
    """)
    server = await OtaServer(tmp_path).start()
    try:
        async with Device(server, "pick-me") as device:
            await device.inform("1.0.0")
            await device.next_push()
        jobs = await server.engine.store.jobs()
        assert [(j.batch, j.device.device_name) for j in jobs] == [("verify-1.1", "pick-me")]
    finally:
        await server.stop()


async def test_src_versions_filter(tmp_path: Path) -> None:
    write_catalog(tmp_path, """
    - {name: only-0.9, package: fw-1.1.0, type: upgrade, src_versions: [0.9.0], protocol: http, mode: dynamic}
    """)
    server = await OtaServer(tmp_path).start()
    try:
        async with Device(server, "s-1") as on_1_0, Device(server, "s-2") as on_0_9:
            await on_1_0.inform("1.0.0")
            await on_0_9.inform("0.9.0")
            assert (await on_0_9.next_push())["data"]["version"] == "1.1.0"
            await on_1_0.expect_nothing(0.3)
    finally:
        await server.stop()


async def test_bad_reload_changes_nothing_and_removal_cancels(tmp_path: Path) -> None:
    write_catalog(tmp_path, """
    - {name: up, package: fw-1.1.0, type: upgrade, protocol: http, mode: dynamic}
    """)
    server = await OtaServer(tmp_path).start()
    try:
        async with Device(server, "r-1") as device:
            await device.inform("1.0.0")
            await device.next_push()
        (tmp_path / "ota.yaml").write_text("products: [", encoding="utf-8")
        with pytest.raises(ConfigError):
            await server.engine.reload()
        write_catalog(tmp_path, """
        - {name: up, package: fw-1.1.0, type: upgrade, protocol: mqtt, mode: dynamic}
        """)
        with pytest.raises(ConfigError, match="cannot change protocol"):
            await server.engine.reload()
        assert server.engine.catalog.batches["up"].protocol == "http"  # nothing changed
        assert await server.job_state("r-1") == "notified"
        write_catalog(tmp_path, "")
        await server.engine.reload()
        assert await server.job_state("r-1") == "canceled"
        assert (await server.engine.store.batches())["up"].state == "canceled"
    finally:
        await server.stop()


async def test_admin_reload_api(server: OtaServer) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.http_url}/admin/api/reload") as response:
            assert response.status == 401
        (server.root / "ota.yaml").write_text("packages_dir: packages\nproducts: []\nbogus: 1\n", encoding="utf-8")
        headers = {"Authorization": f"Bearer {server.admin_token}"}
        async with http.post(f"{server.http_url}/admin/api/reload", headers=headers) as response:
            body = await response.json()
            assert response.status == 400 and any("bogus" in e and ":3:" in e for e in body["errors"])
        async with http.get(f"{server.http_url}/admin/api/status", headers=headers) as response:
            assert (await response.json())["batches"][0]["name"] == "up-1.1.0"


async def test_diff_from_sends_a_patch_that_rebuilds_the_image(tmp_path: Path) -> None:
    base = BASE_CATALOG.replace("sign_method: MD5}", "sign_method: MD5, diff_from: [1.0.0]}")
    write_catalog(tmp_path, """
    - {name: up, package: fw-1.1.0, type: upgrade, protocol: http, mode: dynamic}
    """, base=base)
    server = await OtaServer(tmp_path).start()
    try:
        async with Device(server, "d-1") as device:
            await device.inform("1.0.0")
            data = (await device.next_push())["data"]
        async with aiohttp.ClientSession() as http, http.get(data["url"]) as response:
            patch = await response.read()
        assert data["isDiff"] == 1 and hashlib.md5(patch).hexdigest() == data["sign"] == data["md5"]
        old = (tmp_path / "packages" / "fw-1.0.0.bin").read_bytes()
        image = bsdiff4.patch(old, patch)
        assert image == (tmp_path / "packages" / "fw-1.1.0.bin").read_bytes()
        assert data["extData"]["_target_size"] == len(image)
        assert data["extData"]["_target_sign"] == hashlib.md5(image).hexdigest()
    finally:
        await server.stop()


async def test_module_upgrade_reports_module(tmp_path: Path) -> None:
    extra = """
  - {id: mcu-2.0.0, product: a1Test, module: MCU, version: 2.0.0, file: fw-1.0.0.bin, sign_method: SHA256}
"""
    write_catalog(tmp_path, """
    - {name: mcu, package: mcu-2.0.0, type: upgrade, protocol: http, mode: dynamic}
    """, base=BASE_CATALOG.rstrip() + extra)
    server = await OtaServer(tmp_path).start()
    try:
        async with Device(server, "mod-1") as device:
            await device.inform("1.0.0")  # default module: not this batch
            await device.expect_nothing(0.3)
            await device.inform("1.5.0", module="MCU")
            data = (await device.next_push())["data"]
            assert data["module"] == "MCU" and data["signMethod"] == "SHA256" and "md5" not in data
            await device.progress(100, module="MCU")
            await device.inform("2.0.0", module="MCU")
            await server.wait_state("mod-1", "succeeded")
    finally:
        await server.stop()


async def test_silent_device_times_out_but_queued_jobs_wait(tmp_path: Path) -> None:
    write_catalog(tmp_path, """
    - {name: up, package: fw-1.1.0, type: upgrade, protocol: http, mode: dynamic, timeout_minutes: 10}
    """)
    server = await OtaServer(tmp_path).start()
    try:
        async with Device(server, "quiet") as device:
            await device.inform("1.0.0")
            await device.next_push()
            await device.progress(30, "downloading")
            await server.wait_state("quiet", "in_progress")
        now = time.time()
        assert await server.engine.fail_stale_jobs(now=now + 9 * 60) == 0
        assert await server.engine.fail_stale_jobs(now=now + 11 * 60) == 1
        job = (await server.engine.store.jobs())[0]
        assert job.state == "failed" and "timed out in state in_progress" in job.message
    finally:
        await server.stop()


async def test_listed_device_already_on_the_version_counts_for_verification(tmp_path: Path) -> None:
    write_catalog(tmp_path, """
    - {name: verify-2, package: fw-2.0.0, type: verify, devices: [t-1, t-2], protocol: http, mode: static}
    """, base=BASE_CATALOG.rstrip() + VERIFIED_PACKAGE)
    server = await OtaServer(tmp_path).start()
    try:
        async with Device(server, "t-1") as done_already, Device(server, "t-2") as tester:
            await done_already.inform("2.0.0")
            await tester.inform("1.0.0")
            await tester.next_push()
            await tester.progress(100)
            await tester.inform("2.0.0")
            await server.wait_state("t-2", "succeeded")
        assert await server.job_state("t-1") == "succeeded"
        assert (await server.engine.store.package_statuses())["fw-2.0.0"][0] == "verified"
    finally:
        await server.stop()


async def test_console_for_browsers(server: OtaServer) -> None:
    async with Device(server, "page-1") as device:
        await device.inform("1.0.0")
        await device.next_push()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.http_url}/admin/") as response:
            assert response.status == 401 and "Basic" in response.headers["WWW-Authenticate"]
        auth = {"Authorization": "Basic " + base64.b64encode(f"admin:{server.admin_token}".encode()).decode()}
        async with http.get(f"{server.http_url}/admin/", headers=auth) as response:
            assert response.status == 200 and "/admin/static/console.js" in await response.text()
        for name, kind in (("console.js", "application/javascript"), ("console.css", "text/css")):
            async with http.get(f"{server.http_url}/admin/static/{name}", headers=auth) as response:
                assert response.status == 200 and response.content_type == kind
        async with http.get(f"{server.http_url}/admin/static/..%2fapp.py", headers=auth) as response:
            assert response.status == 404
        # The console reads the API with the browser login...
        async with http.get(f"{server.http_url}/admin/api/batches/up-1.1.0?state=notified&limit=10",
                            headers=auth) as response:
            report = await response.json()
            assert response.status == 200 and report["total"] == 1 and report["devices"][0]["device"] == "page-1"
        # ...but an action needs the token itself: a browser login alone cannot POST (no CSRF).
        async with http.post(f"{server.http_url}/admin/api/batches/up-1.1.0/pause", headers=auth) as response:
            assert response.status == 401
        async with http.get(f"{server.http_url}/admin/batches/up-1.1.0", headers=auth, allow_redirects=False) as response:
            assert response.status == 302 and response.headers["Location"] == "/admin/#/batch/up-1.1.0"


async def test_admin_retry_and_cancel(server: OtaServer) -> None:
    headers = {"Authorization": f"Bearer {server.admin_token}"}
    api = f"{server.http_url}/admin/api/batches/up-1.1.0"
    async with Device(server, "retry-1") as failing, Device(server, "cancel-1") as other:
        await failing.inform("1.0.0")
        await failing.next_push()
        await failing.progress(-2, "download failed")
        await server.wait_state("retry-1", "failed")
        await other.inform("1.0.0")
        await other.next_push()
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.post(f"{api}/retry", json={"devices": ["retry-1"]}) as response:
                assert (await response.json())["retried"] == 1
            assert (await failing.next_push())["data"]["version"] == "1.1.0"  # a new job, pushed now
            async with http.post(f"{api}/cancel", json={"devices": ["cancel-1"]}) as response:
                assert (await response.json())["canceled"] == 1
            async with http.post(f"{api}/cancel", data=b"{}") as response:
                assert response.status == 400
            async with http.post(f"{server.http_url}/admin/api/batches/nope/retry") as response:
                assert response.status == 404
            async with http.post(f"{server.http_url}/admin/api/batches/nope/cancel",
                                 json={"devices": ["x"]}) as response:
                assert response.status == 404
            async with http.post(f"{api}/cancel", json={"devices": ["never-seen"]}) as response:
                assert (await response.json())["canceled"] == 1  # a placeholder: never taken later
        await other.inform("1.0.0")  # canceled by an admin: the batch does not take it again
        await other.expect_nothing(0.3)
    states = sorted((j.device.device_name, j.state) for j in await server.engine.store.jobs("up-1.1.0"))
    assert states == [("cancel-1", "canceled"), ("never-seen", "canceled"), ("retry-1", "failed"),
                      ("retry-1", "notified")]


async def test_status_counts_each_device_once_after_a_retry(server: OtaServer) -> None:
    from otacore.views.status import batch_report, batch_summaries
    async with Device(server, "again") as device:
        await device.inform("1.0.0")
        await device.next_push()
        await device.progress(-1, "upgrade failed")
        await server.wait_state("again", "failed")
        await server.engine.retry("up-1.1.0", ["again"])
        await device.next_push()
    summary = (await batch_summaries(server.engine.store, server.engine.catalog))[0]
    assert summary["counts"] == {"notified": 1} and summary["total"] == 1
    report = await batch_report(server.engine.store, server.engine.catalog, "up-1.1.0")
    assert report is not None
    assert [(d["device"], d["state"]) for d in report["devices"]] == [("again", "notified")]


async def test_downloading_is_activity_and_a_late_success_counts(tmp_path: Path) -> None:
    write_catalog(tmp_path, """
    - {name: up, package: fw-1.1.0, type: upgrade, protocol: http, mode: dynamic, timeout_minutes: 1}
    """)
    server = await OtaServer(tmp_path).start()
    engine = server.engine
    try:
        async with Device(server, "slow") as device:
            await device.inform("1.0.0")
            await device.next_push()
            job = (await engine.store.jobs())[0]
            engine.downloads.started(job.id)  # a transfer under way, as the file server reports it
            assert await engine.fail_stale_jobs(now=time.time() + 120) == 0
            engine.downloads.finished(job.id, 1000)
            assert await engine.fail_stale_jobs(now=time.time() + 120) == 1
            await device.progress(100, "installed")  # it was still working: the report arrives late
            await device.inform("1.1.0")
            await server.wait_state("slow", "succeeded")
    finally:
        await server.stop()


async def test_a_removed_batch_leaves_status_and_metrics_and_is_shown_when_asked(tmp_path: Path) -> None:
    write_catalog(tmp_path, """
    - {name: old, package: fw-1.1.0, type: upgrade, protocol: http, mode: dynamic, push: true}
    """)
    server = await OtaServer(tmp_path).start()
    try:
        async with Device(server, "rm-1") as device:
            await device.inform("1.0.0")
            await device.next_push()
            await device.progress(100)
            await device.inform("1.1.0")
            await server.wait_state("rm-1", "succeeded")
        write_catalog(tmp_path, """
        - {name: new, package: fw-1.1.0, type: upgrade, protocol: http, mode: dynamic}
        """)
        await server.engine.reload()
        await server.engine.settled()
        admin = {"Authorization": f"Bearer {server.admin_token}"}
        async with aiohttp.ClientSession(headers=admin) as http:
            async with http.get(f"{server.http_url}/admin/api/status") as answer:
                assert [b["name"] for b in (await answer.json())["batches"]] == ["new"]
            async with http.get(f"{server.http_url}/admin/api/status?removed=true") as answer:
                shown = {b["name"]: b for b in (await answer.json())["batches"]}
                assert shown["old"]["counts"] == {"succeeded": 1} and "new" in shown
            async with http.get(f"{server.http_url}/admin/api/status?removed=maybe") as answer:
                assert answer.status == 400
            async with http.get(f"{server.http_url}/admin/api/batches/old") as answer:  # from the database
                assert [d["state"] for d in (await answer.json())["devices"]] == ["succeeded"]
            async with http.get(f"{server.http_url}/metrics") as answer:
                text = await answer.text()
        assert 'batch="new"' in text and 'batch="old"' not in text
    finally:
        await server.stop()


async def test_finished_jobs_of_a_removed_batch_leave_memory_and_stay_on_disk(tmp_path: Path) -> None:
    write_catalog(tmp_path, """
    - {name: gone, package: fw-1.1.0, type: upgrade, protocol: http, mode: dynamic, push: true}
    """)
    server = await OtaServer(tmp_path).start()
    try:
        async with Device(server, "mem-1") as device:
            await device.inform("1.0.0")
            await device.next_push()
            await device.progress(-2, "download failed")
            await server.wait_state("mem-1", "failed")
            await server.engine.retry("gone")  # a second job; the first is history now
            await device.next_push()
            await device.progress(-3, "bad image")
            await server.wait_state("mem-1", "failed")
        first, latest = sorted(server.engine.state.jobs)
        write_catalog(tmp_path, "")
        await server.engine.reload()
        state = server.engine.state
        assert list(state.jobs) == [latest], "the device's latest job stays: decisions read it"
        assert "gone" not in state.counts and "gone" not in state.latest_in_batch
        admin = {"Authorization": f"Bearer {server.admin_token}"}
        async with aiohttp.ClientSession(headers=admin) as http:
            async with http.get(f"{server.http_url}/admin/api/devices/a1Test/mem-1") as answer:
                jobs = (await answer.json())["jobs"]
            async with http.get(f"{server.http_url}/admin/api/jobs/{first}") as answer:
                assert (await answer.json())["job"]["failure"] == "download"
        assert [(job["id"], job["failure"]) for job in jobs] == [(latest, "verify"), (first, "download")]
        async with Device(server, "mem-1") as device:  # the device is offered nothing new
            await device.inform("1.0.0")
            await device.expect_nothing(0.3)
    finally:
        await server.stop()
