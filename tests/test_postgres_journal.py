"""PostgreSQL as the journal, beside SQLite: the same schema, the same records, the same reads.

The tests marked `cluster` run against a throw-away PostgreSQL (scripts/cluster/postgres, on a
free loopback port, data in tmp) and are skipped, saying why, where it cannot be installed.
Each test works in a schema of its own (the DSN's search_path). The schema parity test and
the SQLite migration test need no PostgreSQL and run by default.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from devicekit.loopback import free_port

from otacore.fleet.batches import BatchState
from otacore.fleet.jobs import JobState, NewJob
from otacore.fleet.state import FleetState
from otacore.protocol.credentials import DeviceId
from otacore.protocol.routing_keys import partition_of
from otacore.storage import journal as journal_module
from otacore.storage import postgres_schema, retention
from otacore.storage.journal import Journal
from otacore.storage.sqlite_backend import SqliteBackend
from otacore.storage.store import SCHEMA, SCHEMA_VERSION, Store

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "cluster" / "postgres"
NOW = 1_700_000_000.0


# -- schema parity (no PostgreSQL needed) ---------------------------------------------------
def _tables(schema: str) -> dict[str, list[str]]:
    """table -> its column names in order, parsed from CREATE TABLE statements."""
    text = re.sub(r"--[^\n]*", "", schema)
    tables = {}
    for name, body in re.findall(r"CREATE TABLE IF NOT EXISTS (\w+) \((.*?)\);", text, re.S):
        depth, part, parts = 0, "", []
        for char in body:
            depth += char == "("
            depth -= char == ")"
            if char == "," and depth == 0:
                parts.append(part)
                part = ""
            else:
                part += char
        parts.append(part)
        tables[name] = [p.split()[0] for p in (p.strip() for p in parts)
                        if p and p.split()[0].upper() not in ("PRIMARY", "UNIQUE", "FOREIGN", "CHECK")]
    return tables


def _indexes(schema: str) -> dict[str, str]:
    return dict(re.findall(r"CREATE INDEX IF NOT EXISTS (\w+) ON (\w+ \([^)]*\))", schema))


def test_both_schemas_have_the_same_tables_and_columns() -> None:
    sqlite_tables, pg_tables = _tables(SCHEMA), _tables(postgres_schema.SCHEMA)
    assert pg_tables.pop("meta") == ["key", "value"]  # PostgreSQL's schema version (SQLite: user_version)
    assert sqlite_tables == pg_tables
    assert "part" in sqlite_tables["jobs"] and "part" in sqlite_tables["device_versions"]
    assert _indexes(SCHEMA) == _indexes(postgres_schema.SCHEMA)
    with contextlib.closing(sqlite3.connect(":memory:")) as db:  # and what SQLite makes of its text
        db.executescript(SCHEMA)
        for table, columns in sqlite_tables.items():
            assert [row[1] for row in db.execute(f"PRAGMA table_info({table})")] == columns


def test_pg_sql_translation() -> None:
    assert postgres_schema.pg_sql("SELECT a FROM t WHERE b = ? AND c IN (?, ?)") == \
        "SELECT a FROM t WHERE b = $1 AND c IN ($2, $3)"
    assert postgres_schema.pg_sql("INSERT OR IGNORE INTO t (a) VALUES (?)") == \
        "INSERT INTO t (a) VALUES ($1) ON CONFLICT DO NOTHING"
    assert postgres_schema.shown_dsn("postgresql://ota:secret@db:5432/ota") == "postgresql://ota:***@db:5432/ota"


async def test_sqlite_schema_4_gains_part(tmp_path: Path) -> None:
    path = tmp_path / "ota.sqlite3"
    old = re.sub(r"\n\s*part INTEGER NOT NULL DEFAULT 0,", "", SCHEMA)
    old = old.replace(",\n    part INTEGER NOT NULL DEFAULT 0);", ");")
    old = "\n".join(line for line in old.splitlines() if "_by_part" not in line)
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(old)
        assert "part" not in [row[1] for row in db.execute("PRAGMA table_info(jobs)")]
        db.execute("INSERT INTO device_versions VALUES ('pk', 'd1', 'default', '1.0', 1.0)")
        db.execute("PRAGMA user_version = 4")
        db.commit()
    store = await Store.open(path)
    await store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        for table in ("jobs", "device_versions"):
            assert [row[1] for row in db.execute(f"PRAGMA table_info({table})")][-1] == "part"
        assert db.execute("SELECT part FROM device_versions").fetchall() == [(0,)]
        assert {row[1] for row in db.execute("PRAGMA index_list(jobs)")} >= {"jobs_by_part"}


# -- PostgreSQL ---------------------------------------------------------------------------
class Postgres:
    def __init__(self, data: Path, port: int, dsn: str) -> None:
        self.data, self.port, self.dsn = data, port, dsn
        self._schemas = itertools.count(1)

    def stop(self, immediate: bool = True) -> None:
        subprocess.run([str(SCRIPT), "down", str(self.data), *(["--immediate"] if immediate else [])],
                       check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        subprocess.run([str(SCRIPT), "up", str(self.data), str(self.port)], check=True, capture_output=True,
                       timeout=120)

    async def fresh(self) -> str:
        """A DSN on a schema of its own (asyncpg passes search_path to the server)."""
        import asyncpg
        name = f"t{next(self._schemas)}"
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}")
        finally:
            await conn.close()
        return f"{self.dsn}?search_path={name}"


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    pytest.importorskip("asyncpg")
    data = tmp_path_factory.mktemp("postgres") / "data"
    port = free_port()
    result = subprocess.run([str(SCRIPT), "up", str(data), str(port)], capture_output=True, text=True, timeout=600)
    if result.returncode == 3:
        pytest.skip(f"no PostgreSQL here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    dsn = result.stdout.strip().rpartition("OTA_CLUSTER_POSTGRES=")[2]
    assert dsn == f"postgresql://postgres@127.0.0.1:{port}/ota"
    try:
        yield Postgres(data, port, dsn)
    finally:
        subprocess.run([str(SCRIPT), "down", str(data)], capture_output=True, timeout=60)


def _device(i: int) -> DeviceId:
    return DeviceId("a1Cam", f"cam-{i:04d}")


def _changes(state: FleetState, devices: range, now: float = NOW) -> None:
    """Every kind of change the journal writes: versions, batches (control, ended), targets,
    jobs created and moved (progress, superseded, a code), package status, counters."""
    state.save_batch("b1", "fw-2", {"version": "2.0"}, BatchState.RUNNING, "", now)
    state.set_control("b1", {"paused": {"by": "admin"}, "waves": [1, 2]})
    state.save_batch("old", "fw-1", {"version": "1.0"}, BatchState.RUNNING, "", now - 90 * 86400)
    state.add_targets("b1", "a1Cam", [_device(i).device_name for i in devices])
    state.set_package_status("fw-2", "verified", "ab" * 32)
    state.set_counter("push_id", 41)
    for i in devices:
        device = _device(i)
        state.record_version(device, "default", "1.0", now + i)
        old = state.create_job("old", NewJob(device, "default", "fw-1", "0.9", "1.0", "k1", 10), "targeted", now - 80 * 86400)
        assert old is not None
        state.move(old, JobState.FAILED, "timeout", now - 80 * 86400, code=-1, message="gave up")
        job = state.create_job("b1", NewJob(device, "default", "fw-2", "1.0", "2.0", "k2", 4096), "targeted", now)
        assert job is not None
        state.move(job, JobState.NOTIFIED, "pushed", now + 1)
        if i % 3 == 0:
            state.move(job, JobState.IN_PROGRESS, "progress", now + 2, progress=40)
            state.update(job, now + 3, bytes_served=2048)
        if i % 3 == 1:
            state.move(job, JobState.FAILED, "device said no", now + 2, code=-2, message="flash \u00e9chec",
                       superseded=1)
    state.end_batch("old", BatchState.CANCELED, "removed from the catalog", now - 60 * 86400)
    state.set_control("old", {"removed": True})


def _snapshot(state: FleetState) -> dict[str, Any]:
    def job(j: Any) -> tuple[Any, ...]:
        return (j.id, j.batch, j.device, j.module, j.package_id, j.from_version, j.target_version, j.state,
                j.progress, j.code, j.message, j.file_key, j.file_size, j.bytes_served, j.created_at, j.updated_at,
                j.superseded)
    return {"versions": dict(state.versions), "jobs": {i: job(j) for i, j in state.jobs.items()},
            "batches": {n: (b.name, b.package_id, b.fingerprint, b.state, b.created_at, b.started_at, b.ended_at,
                            b.reason, b.control) for n, b in state.batches.items()},
            "targets": state.targets, "package_status": state.package_status, "counters": state.counters,
            "open": {k: j.id for k, j in state.open_jobs.items()}, "counts": state.counts,
            "next_job_id": state.next_job_id}


async def _pg_journal(dsn: str, partitions: int = 1) -> tuple[Journal, Any]:
    from otacore.storage.postgres_backend import PostgresBackend
    backend = await PostgresBackend.open(dsn, partitions)
    state = FleetState()
    await backend.load_shared(state)
    await backend.load_partitions(state, range(partitions))
    return Journal(backend, state, lambda: NOW), backend


async def _pg_reload(dsn: str, partitions: int = 1, parts: Any = None) -> FleetState:
    from otacore.storage.postgres_backend import PostgresBackend
    backend = await PostgresBackend.open(dsn, partitions)
    try:
        state = FleetState()
        await backend.load_shared(state)
        await backend.load_partitions(state, range(partitions) if parts is None else parts)
        return state
    finally:
        await backend.close(abandoned=False)


async def _sqlite_journal(path: Path) -> Journal:
    store = await Store.open(path)
    await store.close()
    return Journal.open(path, lambda: NOW)


@pytest.mark.cluster
async def test_group_commit_round_trips_like_sqlite(postgres: Postgres, tmp_path: Path) -> None:
    dsn = await postgres.fresh()
    pg, backend = await _pg_journal(dsn)
    lite = await _sqlite_journal(tmp_path / "ota.sqlite3")
    for journal in (pg, lite):
        journal.start()
        _changes(journal.state, range(12))
        await journal.commit()
        # A second tick: rows written again with their latest values (upserts), more events.
        job = journal.state.open_job(_device(0), "default")
        journal.state.move(job, JobState.INSTALLED, "installed", NOW + 10, progress=100)
        journal.state.record_version(_device(0), "default", "2.0", NOW + 11)
        journal.state.set_counter("push_id", 42)
        journal.state.add_targets("b1", "a1Cam", ["cam-0000", "cam-late"])  # one known: ignored
        await journal.commit()
        assert journal.trouble() is None and journal.commits == 2
        await journal.close()
    assert backend.connection is None  # closed
    on_pg = await _pg_reload(dsn)
    on_sqlite, _ = SqliteBackend.open(tmp_path / "ota.sqlite3")[1], None
    expected = _snapshot(on_sqlite)
    assert _snapshot(on_pg) == expected
    assert len(expected["jobs"]) == 12  # the removed batch's finished history stays on disk only
    assert expected["batches"]["b1"][8] == {"paused": {"by": "admin"}, "waves": [1, 2]}


@pytest.mark.cluster
async def test_load_partitions_loads_only_those_parts(postgres: Postgres) -> None:
    import asyncpg
    dsn = await postgres.fresh()
    journal, _ = await _pg_journal(dsn, partitions=4)
    _changes(journal.state, range(40))
    await journal.commit()
    await journal.close()
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT device_name, part FROM jobs UNION ALL SELECT device_name, part "
                                "FROM device_versions")
    finally:
        await conn.close()
    assert rows and all(part == partition_of(DeviceId("a1Cam", name), 4) for name, part in rows)
    whole = await _pg_reload(dsn, 4)
    some = await _pg_reload(dsn, 4, parts={1, 2})
    wanted = {d for d, _ in whole.versions if partition_of(d, 4) in (1, 2)}
    assert 0 < len(wanted) < 40
    assert {d for d, _ in some.versions} == wanted
    assert {j.device for j in some.jobs.values()} == wanted
    assert {i: j.state for i, j in some.jobs.items()} == \
        {i: j.state for i, j in whole.jobs.items() if j.device in wanted}
    assert some.batches.keys() == whole.batches.keys() and some.counters == whole.counters


@pytest.mark.cluster
async def test_a_postgres_restart_loses_no_change(postgres: Postgres, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_module, "RETRY_SECONDS", 0.2)
    dsn = await postgres.fresh()
    journal, backend = await _pg_journal(dsn)
    hooked: list[Any] = []

    async def on_connect(conn: Any) -> None:
        hooked.append(await conn.fetchval("SELECT pg_backend_pid()"))
    backend.on_connect.append(on_connect)
    journal.start()
    try:
        _changes(journal.state, range(5))
        await journal.commit()  # committed before the restart
        await asyncio.to_thread(postgres.stop, True)
        try:
            state = journal.state
            state.record_version(_device(1), "default", "1.5", NOW + 20)
            job = state.open_job(_device(3), "default")
            state.move(job, JobState.SUCCEEDED, "reported 2.0", NOW + 21, progress=100)
            first = asyncio.ensure_future(journal.commit())  # pending across the restart
            await asyncio.sleep(0.6)
            assert not first.done() and "database writes failing" in (journal.trouble() or "")
            created = state.create_job("b1", NewJob(_device(7), "default", "fw-2", "1.0", "2.0", "k2", 4096),
                                       "targeted", NOW + 22)
            second = asyncio.ensure_future(journal.commit())
        finally:
            await asyncio.to_thread(postgres.start)
        await asyncio.wait_for(asyncio.gather(first, second), 15)
        assert journal.trouble() is None and backend.reconnects >= 1 and hooked
    finally:
        await journal.close()
    reloaded = await _pg_reload(dsn)
    assert reloaded.versions[(_device(1), "default")] == ("1.5", NOW + 20)
    assert reloaded.jobs[job.id].state == JobState.SUCCEEDED
    assert created is not None and reloaded.jobs[created.id].device == _device(7)
    live = journal.state
    assert _snapshot(reloaded)["jobs"] == {i: row for i, row in _snapshot(live)["jobs"].items()
                                           if live.jobs[i].batch != "old"}  # removed: history on disk only


@pytest.mark.cluster
async def test_pg_store_answers_like_store(postgres: Postgres, tmp_path: Path) -> None:
    from otacore.storage.pg_store import PgStore
    dsn = await postgres.fresh()
    pg, _ = await _pg_journal(dsn)
    lite = await _sqlite_journal(tmp_path / "ota.sqlite3")
    for journal in (pg, lite):
        _changes(journal.state, range(8))
        await journal.commit()
        await journal.close()
    stores = [await PgStore.open(dsn), await Store.open(tmp_path / "ota.sqlite3")]
    try:
        answers = []
        for store in stores:
            jobs = await store.jobs()
            answers.append({
                "version": await store.reported_version(_device(2), "default"),
                "none": await store.reported_version(_device(99), "default"),
                "versions": await store.reported_versions("a1Cam", "default"),
                "batches": await store.batches(), "targets": await store.targets("b1"),
                "packages": await store.package_statuses(),
                "job": await store.job(jobs[3].id), "no job": await store.job(10_000),
                "jobs": jobs, "open": await store.jobs("b1", open_only=True),
                "counts": await store.state_counts(), "counts b1": await store.state_counts("b1"),
                "latest": await store.latest_jobs("b1"), "history": await store.history(jobs[3].id),
                "device": await store.device_jobs(_device(2)),
                "device page": await store.device_jobs(_device(2), offset=1, limit=1),
                "device count": await store.device_job_count(_device(2)),
                "histories": await store.histories([j.id for j in jobs]),
            })
    finally:
        for store in stores:
            await store.close()

    def plain(value: Any) -> Any:  # Jobs compare by identity: their fields
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if hasattr(value, "__slots__") and hasattr(value, "device"):
            return [getattr(value, name) for name in value.__slots__]
        if hasattr(value, "__dataclass_fields__"):
            return {k: plain(getattr(value, k)) for k in value.__dataclass_fields__}
        return value
    assert plain(answers[0]) == plain(answers[1])
    assert answers[1]["device count"] == 2 and len(answers[1]["device page"]) == 1


@pytest.mark.cluster
async def test_retention_and_reserve_on_postgres(postgres: Postgres, tmp_path: Path) -> None:
    dsn = await postgres.fresh()
    pg, backend = await _pg_journal(dsn)
    lite = await _sqlite_journal(tmp_path / "ota.sqlite3")
    results = []
    for journal in (pg, lite):
        _changes(journal.state, range(6))
        await journal.commit()
        before = NOW - 30 * 86400
        counted = await journal.maintain(lambda db: retention.prunable(db, {"b1"}, before), write=False)
        removed = 0
        while step := await journal.maintain(lambda db: retention.prune_step(db, {"b1"}, before, limit=4)):
            removed += step
        results.append((counted, removed))
    assert results[0] == results[1] == ({"old": 6}, 6)
    firsts = await asyncio.gather(*(backend.reserve("job_ids", 100) for _ in range(5)))
    assert sorted(firsts) == [1 + 100 * i for i in range(5)]
    assert await backend.reserve("push_ids", 1) == 1 and await backend.reserve("push_ids", 10) == 2
    with pytest.raises(ValueError):
        await backend.reserve("jobs", 1)
    for journal in (pg, lite):
        await journal.close()
    assert len((await _pg_reload(dsn)).jobs) == 6


@pytest.mark.cluster
async def test_otactl_reads_postgres_like_sqlite(postgres: Postgres, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    from otacore.cli import main as cli
    from otacore.config.broker_yaml import load_settings
    from otacore.storage.data_dir import database_path
    config = Path(__file__).resolve().parent.parent / "config" / "broker.yaml"
    on_sqlite = load_settings(config, data_dir=str(tmp_path / "var"))
    on_pg = dataclasses.replace(on_sqlite, cluster_postgres=await postgres.fresh())
    pg, _ = await _pg_journal(on_pg.cluster_postgres)
    lite = await _sqlite_journal(database_path(on_sqlite.data_dir))
    for journal in (pg, lite):
        _changes(journal.state, range(5))
        await journal.commit()
        await journal.close()
    assert await cli._status(on_pg, None) == await cli._status(on_sqlite, None)
    assert await cli._status(on_pg, "b1", removed=True) == await cli._status(on_sqlite, "b1", removed=True)
    plans = []
    for settings in (on_pg, on_sqlite):
        code = await asyncio.to_thread(cli.cmd_plan, settings, False, True)
        plans.append((code, capsys.readouterr().out))
    assert plans[0] == plans[1]
    assert cli.cmd_backup(on_pg, None) == 1  # type: ignore[arg-type]
    assert "pg_dump" in capsys.readouterr().err


# -- membership (cluster_worker/membership.py) on a real PostgreSQL ------------------------
async def _nothing(*_: Any) -> None:
    return None


@pytest.mark.cluster
async def test_a_heartbeat_postgresql_holds_up_holds_neither_requests_nor_later_rounds(
        postgres: Postgres, monkeypatch: pytest.MonkeyPatch) -> None:
    """The heartbeat's connection stuck (here: its table locked by another session): a request
    that re-reads the routes waits at most REFRESH_WAIT, the beat gives up after BEAT_TIMEOUT
    and drops its connection, and once PostgreSQL answers again the next beat is written."""
    import asyncpg

    from cluster_worker import membership
    monkeypatch.setattr(membership, "BEAT_TIMEOUT", 2.0)  # the test's patience, not the rule's
    dsn = await postgres.fresh()
    journal, _backend = await _pg_journal(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    blocker = await asyncpg.connect(dsn)
    try:
        member = await membership.Membership.open(pool, journal, "http://127.0.0.1:9", 1, take=_nothing,
                                                  release=_nothing, coordinate=_nothing, fatal=lambda _: None)
        loop = asyncio.get_running_loop()
        hold = blocker.transaction()
        await hold.start()
        await blocker.execute("LOCK TABLE ota_workers IN ACCESS EXCLUSIVE MODE")
        await asyncio.sleep(membership.REFRESH_SECONDS)
        started = loop.time()
        await member.refresh()
        assert loop.time() - started < membership.REFRESH_WAIT + 0.5
        started = loop.time()
        with pytest.raises(TimeoutError):
            await member._heartbeat()
        assert loop.time() - started < 2 * membership.BEAT_TIMEOUT + 0.5  # the refresh's beat held the pool first
        await hold.rollback()
        before = await blocker.fetchval("SELECT seen_at FROM ota_workers WHERE id = $1", member.id)
        await asyncio.wait_for(member._heartbeat(), membership.BEAT_TIMEOUT)
        assert await blocker.fetchval("SELECT seen_at FROM ota_workers WHERE id = $1", member.id) > before
    finally:
        await blocker.close()
        await pool.close()
        await journal.close()


@pytest.mark.cluster
async def test_the_coordinators_lock_stays_its_own_through_a_broken_journal_connection(postgres: Postgres) -> None:
    """The coordinator's lock is free from the moment its journal's connection breaks until the
    connection is made again; another worker that took it then made the coordinator stop. Only
    a coordinator whose row is no longer live is replaced."""
    import asyncpg

    from cluster_worker import membership
    dsn = await postgres.fresh()
    opened: list[tuple[Journal, Any]] = []
    fatal: list[str] = []
    members = []
    try:
        for port in (1, 2):
            journal, _backend = await _pg_journal(dsn)
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
            opened.append((journal, pool))
            members.append(await membership.Membership.open(
                pool, journal, f"http://127.0.0.1:{port}", 1, take=_nothing, release=_nothing,
                coordinate=_nothing, fatal=fatal.append))
        first, second = members
        await first.round()
        await second.round()
        assert first.coordinator and not second.coordinator
        pid = await first.journal.maintain(lambda conn: conn.fetchval("SELECT pg_backend_pid()"), write=False)
        admin = await asyncpg.connect(dsn)
        try:
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        await asyncio.sleep(0.2)
        await second.round()  # the lock is free now; the first's row is live
        assert not second.coordinator
        for _ in range(5):  # the first reconnects (a round may meet the broken connection first)
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await first.round()
                break
        assert first.coordinator and not fatal, fatal
        assert await first.journal.maintain(lambda conn: conn.fetchval("SELECT pg_backend_pid()"), write=False) != pid
    finally:
        for member in members:
            member._stopping = True
        for journal, pool in opened:
            await pool.close()
            await journal.close()
