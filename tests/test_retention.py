"""Retention: the finished history of batches that left the catalog leaves the database
(otactl prune, POST /admin/api/prune, `retention_days`), each device's latest job stays, and
nothing of a batch still in the catalog is touched."""
from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from support.faults import idle, refuse_writes
from support.harness import Device, OtaServer, write_catalog
from support.processes import LiveServer, otactl
from otacore.errors import ConfigError
from otacore.config.settings import settings_from_mapping


def rows(db: Path, sql: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute(sql).fetchall()


async def two_jobs_then_removed(server: OtaServer, root: Path) -> tuple[int, int]:
    """Device r-1 fails a job of `old`, is retried and fails again; `old` leaves the catalog
    for `new`. Returns (first job, latest job)."""
    async with Device(server, "r-1") as device:
        await device.inform("1.0.0")
        await device.next_push()
        await device.progress(-2)
        await server.wait_state("r-1", "failed")
        await server.engine.retry("old")
        await device.next_push()
        await device.progress(-3)
        await server.wait_state("r-1", "failed")
    write_catalog(root, """
    - {name: new, package: fw-1.1.0, type: upgrade, protocol: http, mode: dynamic, push: true}
    """)
    await server.engine.reload()
    async with Device(server, "r-2") as other:  # a job of a batch that stays
        await other.inform("1.0.0")
        await other.next_push()
    await server.engine.settled()
    first, latest = sorted(job.id for job in await server.engine.store.jobs("old"))
    return first, latest


async def test_prune_removes_only_old_history_of_removed_batches_and_keeps_latest_jobs(tmp_path: Path) -> None:
    write_catalog(tmp_path, """
    - {name: old, package: fw-1.1.0, type: upgrade, protocol: http, mode: dynamic, push: true}
    """)
    server = await OtaServer(tmp_path).start()
    db = tmp_path / "var" / "ota.sqlite3"
    try:
        first, latest = await two_jobs_then_removed(server, tmp_path)
        admin = {"Authorization": f"Bearer {server.admin_token}"}
        async with aiohttp.ClientSession(headers=admin) as http:
            for bad in ({"days": -1}, {"days": "1"}, {"dry_run": "yes", "days": 1}, {}):
                async with http.post(f"{server.http_url}/admin/api/prune", json=bad) as answer:
                    assert answer.status == 400, bad
            async with http.post(f"{server.http_url}/admin/api/prune", json={"days": 1}) as answer:
                assert (await answer.json())["jobs"] == 0  # ended just now: kept for a day
            events_before = rows(db, "SELECT COUNT(*) FROM job_events")
            async with http.post(f"{server.http_url}/admin/api/prune", json={"days": 0, "dry_run": True}) as answer:
                said = await answer.json()
            # Both of r-1's jobs in `old`: its latest job is now the queued one of `new`.
            assert said["batches"] == {"old": 2} and said["dry_run"] is True
            assert rows(db, "SELECT COUNT(*) FROM job_events") == events_before  # a dry run changes nothing
            async with http.post(f"{server.http_url}/admin/api/prune", json={"days": 0}) as answer:
                assert (await answer.json())["batches"] == {"old": 2}
        assert rows(db, "SELECT id FROM jobs WHERE batch = 'old'") == []
        assert rows(db, f"SELECT COUNT(*) FROM job_events WHERE job_id IN ({first}, {latest})") == [(0,)]
        # r-1's job of `new` is queued, or notified when its disconnect was not seen yet.
        assert [name for name, _ in rows(db, "SELECT device_name, state FROM jobs WHERE batch = 'new' ORDER BY id")] \
            == ["r-1", "r-2"]
        assert rows(db, "SELECT state FROM batches WHERE name = 'old'") == [("canceled",)]  # its name stays spent
        async with Device(server, "r-1") as device:  # decisions start from the latest job, as before
            await device.inform("1.0.0")
            assert (await device.next_push())["data"]["version"] == "1.1.0"  # the new batch's offer
    finally:
        await server.stop()


def test_retention_days_is_checked(tmp_path: Path) -> None:
    for bad in (0, -3, "30", True, 10**9):
        with pytest.raises(ConfigError) as refused:
            settings_from_mapping({"retention_days": bad}, tmp_path / "broker.yaml")
        assert "retention_days: " in str(refused.value) and "from 1 to 36500" in str(refused.value)
    assert settings_from_mapping({"retention_days": 30}, tmp_path / "broker.yaml").retention_days == 30


async def test_otactl_prune_asks_the_running_server(tmp_path: Path) -> None:
    write_catalog(tmp_path, """
    - {name: old, package: fw-1.1.0, type: upgrade, protocol: http, mode: dynamic, push: true}
    """)
    server = await LiveServer(tmp_path).start()
    config, view = server.config, server.view
    try:
        async with Device(view, "p-1") as device:
            await device.inform("1.0.0")
            await device.next_push()
            await device.progress(-2)
        await asyncio.sleep(0.3)
        write_catalog(tmp_path, "")
        assert otactl(config, "reload").returncode == 0
        dry = otactl(config, "prune", "--days", "0", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        # p-1's only job is its latest one: it stays; nothing to remove.
        assert "would remove 0 job(s)" in dry.stdout
        none = otactl(config, "prune")
        assert none.returncode == 1 and "the server has no retention_days" in none.stderr
    finally:
        await server.stop()


async def test_a_restart_on_a_large_history_serves_the_same_answers_and_keeps_only_live_jobs(tmp_path: Path) -> None:
    write_catalog(tmp_path, "")
    server = await OtaServer(tmp_path).start()  # makes the database
    await server.stop()
    db = tmp_path / "var" / "ota.sqlite3"
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:  # 40,000 finished jobs of a long-gone batch
        conn.execute("INSERT INTO batches (name, package_id, fingerprint, state, created_at, started_at, ended_at, "
                     "reason) VALUES ('ancient', 'fw-1.1.0', '{}', 'canceled', 1, 1, 2, 'batch removed')")
        conn.executemany(
            "INSERT INTO jobs (id, batch, product_key, device_name, module, package_id, from_version, target_version, "
            "state, created_at, updated_at) VALUES (?, 'ancient', 'a1Test', ?, 'default', 'fw-1.1.0', '1.0.0', "
            "'1.1.0', 'failed', 1, 2)", [(i, "r-1") for i in range(1, 40_001)])
    write_catalog(tmp_path, """
    - {name: old, package: fw-1.1.0, type: upgrade, protocol: http, mode: dynamic, push: true}
    """)
    server = await OtaServer(tmp_path, mqtt_port=server.mqtt_port, http_port=server.http_port).start()
    assert len(server.engine.state.jobs) <= 1, "the history of `ancient` left memory at the start"
    first, latest = await two_jobs_then_removed(server, tmp_path)
    admin = {"Authorization": f"Bearer {server.admin_token}"}

    async def answers() -> tuple[object, object]:
        async with aiohttp.ClientSession(headers=admin) as http:
            async with http.get(f"{server.http_url}/admin/api/status") as answer:
                status = (await answer.json())["batches"]
            async with http.get(f"{server.http_url}/admin/api/devices/a1Test/r-1") as answer:
                device = [(job["id"], job["state"]) for job in (await answer.json())["jobs"]][:4]
        return [(b["name"], b["counts"]) for b in status], device

    before = await answers()
    await server.stop()
    server = await OtaServer(tmp_path, mqtt_port=server.mqtt_port, http_port=server.http_port).start()
    try:
        assert await answers() == before
        assert before[0][0][0] == "new" and sum(before[0][0][1].values()) == 2
        assert sorted(server.engine.state.jobs) == [latest + 1, latest + 2]  # the live jobs, of `new`
    finally:
        await server.stop()


async def test_prune_on_a_disk_that_refuses_writes_is_a_503_with_the_reason(tmp_path: Path) -> None:
    write_catalog(tmp_path, """
    - {name: old, package: fw-1.1.0, type: upgrade, protocol: http, mode: dynamic, push: true}
    """)
    server = await OtaServer(tmp_path).start()
    try:
        await two_jobs_then_removed(server, tmp_path)
        refuse_writes(await idle(server.engine.journal), True)  # not noticed yet: nothing to write since
        admin = {"Authorization": f"Bearer {server.admin_token}"}
        async with aiohttp.ClientSession(headers=admin) as http, \
                http.post(f"{server.http_url}/admin/api/prune", json={"days": 0}) as answer:
            assert answer.status == 503
            assert (await answer.json())["message"].startswith("prune stopped: attempt to write a readonly database")
        refuse_writes(await idle(server.engine.journal), False)
        assert sum((await server.engine.prune(0)).values()) == 2  # nothing was lost; now it goes
    finally:
        await server.stop()
