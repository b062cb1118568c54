"""The journal (otacore/storage/journal.py) against a real SQLite file: group commit, what commit()
promises, telemetry coalescing, rebuilding the state after a restart, and failed writes."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import otacore.storage.journal as journal_module
from support.harness import BASE_CATALOG, PK, write_catalog
from otacore.protocol.credentials import DeviceId
from otacore.decisions import admin, batches, reports
from otacore.decisions.live import LiveFleet
from otacore.downloads.serving import Downloads
from otacore.catalog.loading import prepare_catalog
from otacore.fleet.state import FleetState
from otacore.fleet.jobs import JobState, NewJob
from otacore.storage.journal import Journal
from otacore.config.settings import settings_from_mapping
from otacore.storage.store import Store

Q, N, P, I, S, F, C = (JobState.QUEUED, JobState.NOTIFIED, JobState.IN_PROGRESS, JobState.INSTALLED,
                       JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED)
T0 = 1_700_000_000.0
MODULE = "default"


def dev(name: str) -> DeviceId:
    return DeviceId(PK, name)


def new_job(name: str, version: str = "1.0.0") -> NewJob:
    return NewJob(dev(name), MODULE, "fw-1.1.0", version, "1.1.0", "fw-1.1.0", 160_000)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


async def open_journal(path: Path, clock: Callable[[], float]) -> Journal:
    store = await Store.open(path)  # makes the schema
    await store.close()
    return Journal.open(path, clock)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "ota.sqlite3"


@pytest.fixture
async def journal(db_path: Path) -> AsyncIterator[Journal]:
    opened = await open_journal(db_path, Clock())
    opened.start()
    yield opened
    await opened.close()


def read(path: Path, sql: str, *args: Any) -> list[tuple]:
    """A query on a connection of its own, as otactl or another process would read."""
    db = sqlite3.connect(path)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def trace(journal: Journal) -> list[str]:
    statements: list[str] = []
    journal.backend.db.set_trace_callback(statements.append)
    return statements


def counted(statements: list[str], prefix: str) -> int:
    return sum(1 for s in statements if s.lstrip().upper().startswith(prefix.upper()))


# -- group commit ------------------------------------------------------------------------

async def test_a_flush_is_one_transaction_and_waiters_share_it(journal: Journal, db_path: Path) -> None:
    state = journal.state
    statements = trace(journal)
    commits = journal.commits
    for i in range(20):
        state.record_version(dev(f"d{i}"), MODULE, "1.0.0", T0)
        job = state.create_job("up", new_job(f"d{i}"), "test", T0)
        assert job is not None
        if i % 2:
            state.move(job, N, "pushed", T0 + 1)
    state.save_batch("up", "fw-1.1.0", {"package": "fw-1.1.0"}, "running", "started", T0)
    state.add_targets("up", PK, [f"d{i}" for i in range(20)])
    await asyncio.gather(*(journal.commit() for _ in range(10)))
    assert journal.commits == commits + 1
    assert counted(statements, "BEGIN") == 1 and counted(statements, "COMMIT") == 1
    assert counted(statements, "INSERT INTO jobs") == 20
    assert counted(statements, "INSERT INTO job_events") == 30
    assert read(db_path, "SELECT COUNT(*) FROM jobs") == [(20,)]
    assert read(db_path, "SELECT COUNT(*) FROM job_events") == [(30,)]
    assert read(db_path, "SELECT COUNT(*) FROM device_versions") == [(20,)]
    assert read(db_path, "SELECT COUNT(*) FROM batch_targets") == [(20,)]
    assert read(db_path, "SELECT state, COUNT(*) FROM jobs GROUP BY state ORDER BY state") == \
        [("notified", 10), ("queued", 10)]
    assert not state.changes
    # Nothing changed: commit() returns at once, without a transaction.
    statements.clear()
    await asyncio.wait_for(journal.commit(), 0.5)
    assert journal.commits == commits + 1 and statements == []


async def test_commit_returns_once_a_second_connection_reads_the_rows(journal: Journal, db_path: Path) -> None:
    state = journal.state
    state.record_version(dev("d1"), MODULE, "1.0.0", T0)
    job = state.create_job("up", new_job("d1"), "reported 1.0.0", T0)
    assert job is not None
    state.move(job, N, "upgrade pushed", T0 + 1)
    state.save_batch("up", "fw-1.1.0", {"package": "fw-1.1.0", "mode": "dynamic"}, "running", "started", T0)
    state.set_package_status("fw-1.1.0", "verified", "ab" * 32)
    assert read(db_path, "SELECT COUNT(*) FROM jobs") == [(0,)]  # nothing before the commit
    await journal.commit()
    assert read(db_path, "SELECT id, batch, device_name, state, from_version, target_version, file_key, file_size "
                         "FROM jobs") == [(job.id, "up", "d1", "notified", "1.0.0", "1.1.0", "fw-1.1.0", 160_000)]
    assert read(db_path, "SELECT job_id, at, from_state, to_state, reason FROM job_events ORDER BY id") == [
        (job.id, T0, None, "queued", "reported 1.0.0"), (job.id, T0 + 1, "queued", "notified", "upgrade pushed")]
    assert read(db_path, "SELECT product_key, device_name, module, version, reported_at FROM device_versions") == \
        [(PK, "d1", MODULE, "1.0.0", T0)]
    assert read(db_path, "SELECT name, state, started_at, fingerprint FROM batches") == \
        [("up", "running", T0, '{"mode": "dynamic", "package": "fw-1.1.0"}')]
    assert read(db_path, "SELECT package_id, status, sha256 FROM package_status") == [("fw-1.1.0", "verified", "ab" * 32)]


async def test_telemetry_is_one_row_write_with_the_latest_value_and_no_event(journal: Journal,
                                                                            db_path: Path) -> None:
    state = journal.state
    job = state.create_job("up", new_job("d1"), "test", T0)
    assert job is not None
    state.move(job, P, "device reported 1%", T0 + 1, progress=1)
    await journal.commit()
    statements = trace(journal)
    for step in range(2, 100):
        state.update(job, T0 + step, progress=step, message=f"{step}%")
    for _ in range(50):
        state.update(job, T0 + 120, bytes_served=job.bytes_served + 1000)
    assert state.changes.jobs == {job.id} and state.changes.events == []
    await journal.commit()
    assert counted(statements, "INSERT INTO jobs") == 1
    assert counted(statements, "INSERT INTO job_events") == 0
    assert read(db_path, "SELECT state, progress, message, bytes_served, updated_at FROM jobs") == \
        [("in_progress", 99, "99%", 50_000, T0 + 120)]
    assert read(db_path, "SELECT to_state FROM job_events ORDER BY id") == [("queued",), ("in_progress",)]


# -- restart -----------------------------------------------------------------------------

BASE = BASE_CATALOG.rstrip() + """
  - {id: fw-1.2.0, product: a1Test, version: 1.2.0, file: fw-1.1.0.bin, sign_method: SHA256}
  - {id: fw-2.0.0, product: a1Test, version: 2.0.0, file: fw-1.1.0.bin, sign_method: SHA256, verify: true}
"""
STATIC = ("- {name: v, package: fw-2.0.0, type: verify, devices: [d1, d2], push: true}\n"
          "- {name: up2, package: fw-2.0.0, mode: dynamic, push: true}\n"
          "- {name: up, package: fw-1.1.0, push: true, devices: [d3, d4, d5, d6, d7]}\n")
GONE = "- {name: gone, package: fw-1.2.0, mode: dynamic, push: false, devices: [d8]}\n"


def make_core(root: Path, state: FleetState, clock: Clock, online: set[str]) -> LiveFleet:
    settings = settings_from_mapping({"data_dir": str(root / "var")}, root / "broker.yaml")
    downloads = Downloads(state, b"journal-test-key-0123456789abcdef", clock)
    core = LiveFleet(settings, state, downloads, lambda device: device.device_name in online, clock)
    return core


def apply(core: LiveFleet, root: Path, batch_lines: str) -> None:
    write_catalog(root, batch_lines, base=BASE)
    loaded = prepare_catalog(core.settings)
    batches.apply_catalog(core, loaded.catalog, loaded.files)


def snapshot(state: FleetState) -> dict[str, Any]:
    """Everything the state holds, as plain comparable values."""
    def ids(index: dict) -> dict:
        return {key: {k: j.id for k, j in value.items()} if isinstance(value, dict) else value.id
                for key, value in index.items() if not isinstance(value, dict) or value}

    return {
        "jobs": {job_id: dataclasses.astuple(job) for job_id, job in state.jobs.items()},
        "versions": dict(state.versions),
        "versions_by_module": {k: dict(v) for k, v in state.versions_by_module.items()},
        "open_jobs": ids(state.open_jobs),
        "latest_jobs": ids(state.latest_jobs),
        "current": ids(state.current),
        "latest_in_batch": ids(state.latest_in_batch),
        "open_in_batch": ids(state.open_in_batch),
        "counts": {batch: dict(+counts) for batch, counts in state.counts.items() if +counts},
        "batches": {name: dataclasses.astuple(row) for name, row in state.batches.items()},
        "targets": {batch: set(names) for batch, names in state.targets.items()},
        "package_status": dict(state.package_status),
        "next_job_id": state.next_job_id,
    }


async def test_restart_rebuilds_the_same_state(tmp_path: Path, db_path: Path) -> None:
    clock = Clock()
    journal = await open_journal(db_path, clock)
    journal.start()
    online = {"d1", "d3", "d4", "d5", "d6"}
    core = make_core(tmp_path, journal.state, clock, online)
    apply(core, tmp_path, "")
    for name in ("d1", "d2", "d3", "d4", "d5", "d6", "d7", "d8"):
        reports.report_version(core, dev(name), MODULE, "1.0.0")
    reports.report_version(core, dev("d9"), "MCU", "0.1.0")
    clock.now += 10
    apply(core, tmp_path, STATIC + GONE)
    clock.now += 10
    reports.report_progress(core, dev("d3"), MODULE, 50, "downloading")
    reports.report_progress(core, dev("d3"), MODULE, 70, "downloading")  # telemetry
    reports.report_progress(core, dev("d4"), MODULE, -2, "flash")
    await journal.commit()  # the failed job's row is written before a retry supersedes it
    admin.retry(core, "up", ["d4"])
    admin.cancel_devices(core, "up", ["d5"])
    reports.report_version(core, dev("d6"), MODULE, "1.1.0")
    await journal.commit()  # a commit in the middle: the rest lands in a later one
    clock.now += 10
    reports.report_version(core, dev("d1"), MODULE, "2.0.0")
    reports.report_version(core, dev("d2"), MODULE, "2.0.0")  # verified: up2 starts
    core.downloads.started(journal.state.latest_job(dev("d3"), MODULE).id)
    core.downloads.finished(journal.state.latest_job(dev("d3"), MODULE).id, 12_345)
    clock.now += 10
    apply(core, tmp_path, STATIC)  # gone is removed: canceled
    state = journal.state
    assert state.package_status["fw-2.0.0"][0] == "verified"
    assert {row.name: row.state for row in state.batches.values()} == \
        {"v": "completed", "up2": "running", "up": "running", "gone": "canceled"}
    assert {job.state for job in state.jobs.values()} == {Q, N, P, S, F, C}
    assert any(job.superseded for job in state.jobs.values())
    before = snapshot(state)
    running = set(core.running)
    await journal.close()

    reopened = Journal.open(db_path, clock)
    try:
        after = snapshot(reopened.state)
        for key in before:
            assert after[key] == before[key], key
        assert not reopened.state.changes
        # The catalog applied again on the rebuilt state: the same batches run, nothing new.
        core2 = make_core(tmp_path, reopened.state, clock, online)
        apply(core2, tmp_path, STATIC)
        assert core2.running == running == {"up", "up2"}
        assert reopened.state.next_job_id == before["next_job_id"]
        assert {job_id: dataclasses.astuple(job) for job_id, job in reopened.state.jobs.items()} == before["jobs"]
    finally:
        reopened.backend.db.close()


async def test_job_ids_are_never_reused_after_a_restart(tmp_path: Path, db_path: Path) -> None:
    journal = await open_journal(db_path, Clock())
    for name in ("d1", "d2", "d3"):
        journal.state.create_job("up", new_job(name), "test", T0)
    await journal.commit()  # not started: written in place
    await journal.close()
    assert read(db_path, "SELECT MAX(id) FROM jobs") == [(3,)]
    db = sqlite3.connect(db_path)
    with db:
        db.execute("DELETE FROM job_events WHERE job_id = 3")
        db.execute("DELETE FROM jobs WHERE id = 3")
    db.close()
    reopened = Journal.open(db_path, Clock())
    try:
        assert sorted(reopened.state.jobs) == [1, 2]
        assert reopened.state.next_job_id == 4
        job = reopened.state.create_job("up", new_job("d4"), "test", T0)
        assert job is not None and job.id == 4
        await reopened.commit()
        assert read(db_path, "SELECT id FROM jobs ORDER BY id") == [(1,), (2,), (4,)]
    finally:
        await reopened.close()
    again = Journal.open(db_path, Clock())
    try:
        assert again.state.next_job_id == 5
    finally:
        again.backend.db.close()


# -- failed writes -----------------------------------------------------------------------

async def wait_idle(journal: Journal) -> None:
    """Until no write is under way (the test then touches the connection from the loop)."""
    for _ in range(200):
        if not journal._writing:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the journal kept writing")


async def test_a_failed_write_keeps_its_changes_and_commit_waits(journal: Journal, db_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(journal_module, "RETRY_SECONDS", 0.05)
    caplog.set_level(logging.INFO, logger="ota.journal")
    state = journal.state
    first = state.create_job("up", new_job("d1"), "reported 1.0.0", T0)
    assert first is not None
    await journal.commit()
    commits = journal.commits

    await wait_idle(journal)
    journal.backend.db.execute("PRAGMA query_only=ON")  # every write now fails
    state.move(first, N, "upgrade pushed", T0 + 1)
    state.record_version(dev("d2"), MODULE, "1.0.0", T0 + 1)
    second = state.create_job("up", new_job("d2"), "reported 1.0.0", T0 + 1)
    assert second is not None
    waiting = asyncio.ensure_future(journal.commit())
    await asyncio.sleep(0.3)  # several attempts
    assert not waiting.done(), "commit() returned while nothing could be written"
    assert read(db_path, "SELECT id, state FROM jobs") == [(first.id, "queued")]
    assert journal.commits == commits
    # More changes while it fails: they queue behind the first ones.
    state.move(second, P, "device reported 10%", T0 + 2, progress=10)
    state.update(second, T0 + 3, progress=20)
    later = asyncio.ensure_future(journal.commit())
    await asyncio.sleep(0.1)
    assert not later.done()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "cannot write the database" in errors[0].getMessage()

    await wait_idle(journal)
    journal.backend.db.execute("PRAGMA query_only=OFF")
    await asyncio.wait_for(asyncio.gather(waiting, later), 2)
    assert read(db_path, "SELECT id, state, progress FROM jobs ORDER BY id") == \
        [(first.id, "notified", 0), (second.id, "in_progress", 20)]
    # Each event written once, in order.
    assert read(db_path, "SELECT job_id, from_state, to_state, progress FROM job_events ORDER BY id") == [
        (first.id, None, "queued", 0), (first.id, "queued", "notified", 0),
        (second.id, None, "queued", 0), (second.id, "queued", "in_progress", 10)]
    assert read(db_path, "SELECT device_name, version FROM device_versions") == [("d2", "1.0.0")]
    assert not state.changes
    assert any("database writes work again" in r.getMessage() for r in caplog.records)
    # And it keeps working.
    state.move(second, I, "device reported 100", T0 + 4, progress=100)
    await asyncio.wait_for(journal.commit(), 1)
    assert read(db_path, "SELECT state FROM jobs WHERE id = ?", second.id) == [("installed",)]


async def test_close_writes_what_is_left(tmp_path: Path, db_path: Path) -> None:
    journal = await open_journal(db_path, Clock())
    journal.start()
    job = journal.state.create_job("up", new_job("d1"), "test", T0)
    assert job is not None
    journal.state.update(job, T0 + 5, bytes_served=777)
    await journal.close()
    assert read(db_path, "SELECT id, bytes_served, updated_at FROM jobs") == [(job.id, 777, T0 + 5)]
    assert read(db_path, "SELECT COUNT(*) FROM job_events") == [(1,)]
    reopened = Journal.open(db_path, Clock())
    try:
        loaded = reopened.state.jobs[job.id]
        assert dataclasses.astuple(loaded) == dataclasses.astuple(job)
        assert reopened.state.counts == {"up": Counter({"queued": 1})}
    finally:
        reopened.backend.db.close()


async def test_commit_before_start_does_not_return_while_the_write_fails(db_path: Path) -> None:
    """commit() "returns once every change made before this call is committed": also when
    the journal is not running (before start(), after close()), where it writes in place."""
    journal = await open_journal(db_path, Clock())
    try:
        journal.backend.db.execute("PRAGMA query_only=ON")
        journal.state.create_job("up", new_job("d1"), "test", T0)
        outcome = asyncio.ensure_future(journal.commit())
        await asyncio.sleep(0.2)
        returned = outcome.done() and not outcome.cancelled() and outcome.exception() is None
        outcome.cancel()
        await asyncio.gather(outcome, return_exceptions=True)
        assert read(db_path, "SELECT COUNT(*) FROM jobs") == [(0,)]
        assert journal.state.changes.jobs == {1}  # kept for the next attempt
        assert not returned, "commit() returned normally although nothing was written"
    finally:
        journal.backend.db.close()
