"""The run-time database: its schema, opening it, checking it at start, loading the engine's
state from it, and the async reads that admins, `otactl` and tests make (SQLite in WAL mode, so
they read while the server's journal writes; see journal.py for the writing side). A database
that cannot be used is a StoreError whose message says what is wrong and what to do.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import aiosqlite

from otacore.protocol.credentials import DeviceId
from otacore.fleet.batches import BatchState
from otacore.fleet.state import BatchRow, FleetState
from otacore.fleet.jobs import ALL_STATES, FINAL_STATES as FINAL, OPEN_STATES as OPEN, Job, JobState

# Plain strings, in lifecycle order: for SQL `IN (...)` and for tables.
OPEN_STATES = tuple(state.value for state in ALL_STATES if state in OPEN)
FINAL_STATES = tuple(state.value for state in ALL_STATES if state in FINAL)

# Bump with a migration in Store.open whenever SCHEMA changes shape.
SCHEMA_VERSION = 5


class StoreError(Exception):
    """The database cannot be used as it is; the message says why and what to do."""


def _damaged(path: Path, problem: str) -> str:
    return (f"database {path} is damaged ({problem}); restore it from a backup, or move {path.name}* out of "
            f"{path.parent} to start with an empty database (its jobs and history are then lost)")


def database_error(path: Path, exc: sqlite3.Error) -> str:
    """One line for a user: what is wrong with the database at `path`, and what to do."""
    name = getattr(exc, "sqlite_errorname", "")
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return _damaged(path, str(exc))
    return (f"cannot use database {path} ({exc}); check that it and {path.parent} are readable and writable "
            "by this user and that the disk has room")


def check_database(path: Path) -> None:
    """Refuse a damaged database before anything reads it (blocking; once, at start).
    `PRAGMA quick_check` reads every page once: a second or so per few hundred MB."""
    if not path.exists():
        return  # made empty by Store.open
    try:
        db = sqlite3.connect(path)
        try:
            problems = [row[0] for row in db.execute("PRAGMA quick_check(5)") if row[0] != "ok"]
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise StoreError(database_error(path, exc)) from None
    if problems:
        first = " ".join(problems[0].replace("*** in database main ***", "").split())  # it spans lines
        more = f", and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise StoreError(_damaged(path, f"quick_check: {first}{more}"))


SCHEMA = """
CREATE TABLE IF NOT EXISTS device_versions (
    product_key TEXT NOT NULL, device_name TEXT NOT NULL, module TEXT NOT NULL,
    version TEXT NOT NULL, reported_at REAL NOT NULL,
    -- The device's partition (otacore.protocol.routing_keys.partition_of): what a cluster
    -- worker loads when it takes a partition; 0 for one process.
    part INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (product_key, device_name, module));
CREATE INDEX IF NOT EXISTS device_versions_by_part ON device_versions (part);
CREATE TABLE IF NOT EXISTS batches (
    name TEXT PRIMARY KEY, package_id TEXT NOT NULL, fingerprint TEXT NOT NULL,
    state TEXT NOT NULL, created_at REAL NOT NULL, started_at REAL, ended_at REAL, reason TEXT NOT NULL DEFAULT '',
    control TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS batch_targets (
    batch TEXT NOT NULL, product_key TEXT NOT NULL, device_name TEXT NOT NULL,
    PRIMARY KEY (batch, product_key, device_name));
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, batch TEXT NOT NULL,
    product_key TEXT NOT NULL, device_name TEXT NOT NULL, module TEXT NOT NULL,
    package_id TEXT NOT NULL, from_version TEXT NOT NULL, target_version TEXT NOT NULL,
    state TEXT NOT NULL, progress INTEGER NOT NULL DEFAULT 0, code INTEGER,
    message TEXT NOT NULL DEFAULT '', file_key TEXT NOT NULL DEFAULT '', file_size INTEGER NOT NULL DEFAULT 0,
    bytes_served INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    -- 1 when a later job of the same batch may replace this one: an admin retry, or the
    -- device left the versions the batch targets, or a higher batch took it first.
    superseded INTEGER NOT NULL DEFAULT 0,
    part INTEGER NOT NULL DEFAULT 0);  -- the device's partition, as in device_versions
-- One open job per device and module, one current job per batch and device: kept by the
-- engine's memory (fleet_state.py), which the journal writes down; not indexes that could
-- refuse a commit of promises already made.
CREATE INDEX IF NOT EXISTS jobs_by_device ON jobs (product_key, device_name, module);
CREATE INDEX IF NOT EXISTS jobs_by_batch ON jobs (batch, state);
CREATE INDEX IF NOT EXISTS jobs_by_part ON jobs (part);
CREATE TABLE IF NOT EXISTS job_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_id INTEGER NOT NULL REFERENCES jobs(id),
    at REAL NOT NULL, from_state TEXT, to_state TEXT NOT NULL, progress INTEGER, reason TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (job_id);
-- Numbers the engine must never hand out twice, across restarts (e.g. push ids): each
-- holds the highest value that may have been used.
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS package_status (
    package_id TEXT PRIMARY KEY, status TEXT NOT NULL, updated_at REAL NOT NULL,
    sha256 TEXT NOT NULL DEFAULT '');
"""


_JOB_COLUMNS = ("id, batch, product_key, device_name, module, package_id, from_version, target_version, state, "
                "progress, code, message, file_key, file_size, bytes_served, created_at, updated_at, superseded")


_BATCH_SELECT = ("SELECT name, package_id, fingerprint, state, created_at, started_at, ended_at, reason, control "
                 "FROM batches")


def _batch(row: Any) -> BatchRow:
    try:
        state = BatchState(row[3])
    except ValueError:
        raise StoreError(f"the database holds batch {row[0]!r} in state {row[3]!r}, which this version of "
                         "ota-server does not know (a newer version wrote it); run that version, or restore a "
                         "backup made with this one (otactl restore)") from None
    return BatchRow(row[0], row[1], json.loads(row[2]), state, *row[4:8], json.loads(row[8]))


def load_state(db: sqlite3.Connection) -> FleetState:
    """The engine's state as the database last committed it (synchronous: once, at start)."""
    seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'jobs'").fetchone()
    state = FleetState(next_job_id=(seq[0] if seq else 0) + 1)  # ids are never reused
    for pk, name, module, version, at in db.execute("SELECT product_key, device_name, module, version, "
                                                    "reported_at FROM device_versions"):
        state.load_version(DeviceId(pk, name), module, version, at)
    # Not the history of removed batches (canceled by their removal, or completed and marked
    # removed; their names never come back): their finished jobs would leave memory at the
    # first reload anyway, after making the process's memory peak. Each device's latest job
    # per module is loaded.
    open_states = ", ".join(f"'{name}'" for name in OPEN_STATES)
    for row in db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE batch NOT IN (SELECT name FROM batches WHERE "
                          "state = 'canceled' OR json_extract(control, '$.removed') = 1) OR state IN "
                          f"({open_states}) OR id IN (SELECT MAX(id) FROM jobs GROUP BY product_key, device_name, "
                          "module) ORDER BY id"):
        state.load_job(_job(row))
    for row in db.execute(_BATCH_SELECT):
        state.load_batch(_batch(row))
    for batch, name in db.execute("SELECT batch, device_name FROM batch_targets"):
        state.targets.setdefault(batch, set()).add(name)
    for package_id, status, sha256 in db.execute("SELECT package_id, status, sha256 FROM package_status"):
        state.package_status[package_id] = (status, sha256)
    for name, value in db.execute("SELECT name, value FROM counters"):
        state.counters[name] = value
    return state


def _job(row: Any) -> Job:
    return Job(row[0], row[1], DeviceId(row[2], row[3]), row[4], row[5], row[6], row[7], JobState(row[8]),
               *row[9:])


class Store:
    """Async access to the run-time database. Open with `await Store.open(path)`."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @classmethod
    async def open(cls, path: Path) -> "Store":
        """Open, and make or migrate the schema; StoreError if the file cannot be used."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return cls(await cls._connect(path))
        except sqlite3.Error as exc:
            raise StoreError(database_error(path, exc)) from None

    @staticmethod
    async def _connect(path: Path) -> aiosqlite.Connection:
        db = await aiosqlite.connect(path)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA busy_timeout=5000")
            async with db.execute("PRAGMA user_version") as cursor:
                row = await cursor.fetchone()
            version = row[0] if row else 0
            if version not in (0, 1, 2, 3, 4, SCHEMA_VERSION):
                raise StoreError(f"{path} has database schema {version}; this server reads schema "
                                 f"{SCHEMA_VERSION}: use the matching server version or a new data_dir")
            if version == 0:
                async with db.execute("PRAGMA table_info(jobs)") as cursor:
                    columns = {row[1] async for row in cursor}
                if columns and "superseded" not in columns:  # written by a development build
                    raise StoreError(f"{path} was written by a development build of the server; "
                                     "start with a new data_dir")
            # Schema 1 -> 2: uniqueness of open and current jobs moved to the engine's memory.
            await db.execute("DROP INDEX IF EXISTS jobs_one_open_per_module")
            await db.execute("DROP INDEX IF EXISTS jobs_one_current_per_batch_device")
            # Schema 4 -> 5: each device's partition on its rows (before SCHEMA indexes it);
            # existing rows get partition 0, right for one process.
            for table in ("jobs", "device_versions"):
                async with db.execute(f"PRAGMA table_info({table})") as cursor:
                    columns = {row[1] async for row in cursor}
                if columns and "part" not in columns:
                    await db.execute(f"ALTER TABLE {table} ADD COLUMN part INTEGER NOT NULL DEFAULT 0")
            await db.executescript(SCHEMA)
            # Schema 2 -> 3: each batch's rollout control (pauses, halts, opened waves).
            async with db.execute("PRAGMA table_info(batches)") as cursor:
                if "control" not in {row[1] async for row in cursor}:
                    await db.execute("ALTER TABLE batches ADD COLUMN control TEXT NOT NULL DEFAULT '{}'")
            # Schema 3 -> 4: the counters table (push ids), made by SCHEMA above.
            await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            await db.commit()
        except BaseException:
            await db.close()  # its worker thread would keep the process alive
            raise
        return db

    async def close(self) -> None:
        await self._db.close()

    # The two ways every read below runs its SQL (`?` parameters); PgStore (pg_store.py) runs
    # the same text on PostgreSQL through these.
    async def _rows(self, sql: str, args: Any = ()) -> list[Any]:
        async with self._db.execute(sql, args) as cursor:
            return list(await cursor.fetchall())

    async def _row(self, sql: str, args: Any = ()) -> Any:
        async with self._db.execute(sql, args) as cursor:
            return await cursor.fetchone()

    # -- reported versions -------------------------------------------------------------
    async def reported_version(self, device: DeviceId, module: str) -> str | None:
        row = await self._row(
            "SELECT version FROM device_versions WHERE product_key = ? AND device_name = ? AND module = ?",
            (device.product_key, device.device_name, module))
        return row[0] if row else None

    async def reported_versions(self, product_key: str, module: str) -> dict[str, str]:
        return {name: version for name, version in await self._rows(
            "SELECT device_name, version FROM device_versions WHERE product_key = ? AND module = ?",
            (product_key, module))}

    # -- batches -----------------------------------------------------------------------
    async def batches(self) -> dict[str, BatchRow]:
        return {row[0]: _batch(row) for row in await self._rows(_BATCH_SELECT)}

    async def targets(self, batch: str) -> set[str]:
        return {row[0] for row in await self._rows("SELECT device_name FROM batch_targets WHERE batch = ?", (batch,))}

    # -- packages ----------------------------------------------------------------------
    async def package_statuses(self) -> dict[str, tuple[str, str]]:
        """package id -> (status, sha256 of the file the status was earned with)."""
        return {row[0]: (row[1], row[2])
                for row in await self._rows("SELECT package_id, status, sha256 FROM package_status")}

    async def job(self, job_id: int) -> Job | None:
        row = await self._row(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return _job(row) if row else None

    async def jobs(self, batch: str | None = None, open_only: bool = False) -> list[Job]:
        where, args = [], []
        if batch is not None:
            where.append("batch = ?")
            args.append(batch)
        if open_only:
            where.append(f"state IN {OPEN_STATES}")
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY id"
        return [_job(row) for row in await self._rows(sql, args)]

    async def state_counts(self, batch: str | None = None) -> dict[str, dict[str, int]]:
        """batch -> state -> number of devices, counting each device's latest job once."""
        where, args = ("WHERE batch = ?", (batch,)) if batch is not None else ("", ())
        counts: dict[str, dict[str, int]] = {}
        for name, state, count in await self._rows(
                f"SELECT batch, state, COUNT(*) FROM jobs WHERE id IN (SELECT MAX(id) FROM jobs {where} "
                "GROUP BY batch, product_key, device_name, module) GROUP BY batch, state", args):
            counts.setdefault(name, {})[state] = count
        return counts

    async def latest_jobs(self, batch: str) -> list[Job]:
        """Each device's latest job in `batch` (a retried device shows its new job)."""
        return [_job(row) for row in await self._rows(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id IN (SELECT MAX(id) FROM jobs WHERE batch = ? "
            "GROUP BY product_key, device_name, module) ORDER BY id", (batch,))]

    async def history(self, job_id: int) -> list[tuple[float, str | None, str, int | None, str]]:
        return [tuple(row) for row in await self._rows(  # type: ignore[misc]
            "SELECT at, from_state, to_state, progress, reason FROM job_events WHERE job_id = ? ORDER BY id",
            (job_id,))]

    async def device_jobs(self, device: DeviceId, offset: int = 0, limit: int = -1) -> list[Job]:
        """The jobs the device had, any module and batch, newest first (index jobs_by_device);
        `limit` of them from `offset` (-1: all)."""
        return [_job(row) for row in await self._rows(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE product_key = ? AND device_name = ? ORDER BY id DESC "
            "LIMIT ? OFFSET ?", (device.product_key, device.device_name, self._limit(limit), offset))]

    @staticmethod
    def _limit(limit: int) -> int | None:
        """`LIMIT ?` for `limit` (-1: all, which SQLite writes -1 and PostgreSQL NULL)."""
        return limit

    async def device_job_count(self, device: DeviceId) -> int:
        row = await self._row("SELECT COUNT(*) FROM jobs WHERE product_key = ? AND device_name = ?",
                              (device.product_key, device.device_name))
        return int(row[0]) if row else 0

    async def histories(self, job_ids: list[int]) -> dict[int, list[tuple[float, str | None, str, int | None, str]]]:
        """The history of each of these jobs (oldest event first), in one query per 500 jobs."""
        events: dict[int, list[tuple[float, str | None, str, int | None, str]]] = {job_id: [] for job_id in job_ids}
        for start in range(0, len(job_ids), 500):
            chunk = job_ids[start:start + 500]
            for job_id, *event in await self._rows(
                    "SELECT job_id, at, from_state, to_state, progress, reason FROM job_events WHERE job_id IN "
                    f"({','.join('?' * len(chunk))}) ORDER BY id", chunk):
                events[job_id].append(tuple(event))  # type: ignore[arg-type]
        return events
