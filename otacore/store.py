"""Everything that happens at run time, in SQLite: reported versions, batches, jobs and their history.

One connection per process (aiosqlite), WAL mode so `otactl status` can read while the
server writes. Every job transition is one transaction: the row and its history event.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from .credentials import DeviceId

OPEN_STATES = ("queued", "notified", "in_progress", "installed")
FINAL_STATES = ("succeeded", "failed", "canceled")
ALL_STATES = OPEN_STATES + FINAL_STATES
STATE_RANK = {"queued": 0, "notified": 1, "in_progress": 2, "installed": 3,
              "succeeded": 4, "failed": 4, "canceled": 4}

# Bump with a migration in Store.open whenever SCHEMA changes shape.
SCHEMA_VERSION = 1


class StoreError(Exception):
    """The database cannot be used as it is; the message says why and what to do."""


SCHEMA = """
CREATE TABLE IF NOT EXISTS device_versions (
    product_key TEXT NOT NULL, device_name TEXT NOT NULL, module TEXT NOT NULL,
    version TEXT NOT NULL, reported_at REAL NOT NULL,
    PRIMARY KEY (product_key, device_name, module));
CREATE TABLE IF NOT EXISTS batches (
    name TEXT PRIMARY KEY, package_id TEXT NOT NULL, fingerprint TEXT NOT NULL,
    state TEXT NOT NULL, created_at REAL NOT NULL, started_at REAL, ended_at REAL, reason TEXT NOT NULL DEFAULT '');
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
    superseded INTEGER NOT NULL DEFAULT 0);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_one_open_per_module ON jobs (product_key, device_name, module)
    WHERE state IN ('queued', 'notified', 'in_progress', 'installed');
CREATE UNIQUE INDEX IF NOT EXISTS jobs_one_current_per_batch_device ON jobs (batch, product_key, device_name)
    WHERE superseded = 0;
CREATE INDEX IF NOT EXISTS jobs_by_batch ON jobs (batch, state);
CREATE TABLE IF NOT EXISTS job_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_id INTEGER NOT NULL REFERENCES jobs(id),
    at REAL NOT NULL, from_state TEXT, to_state TEXT NOT NULL, progress INTEGER, reason TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (job_id);
CREATE TABLE IF NOT EXISTS package_status (
    package_id TEXT PRIMARY KEY, status TEXT NOT NULL, updated_at REAL NOT NULL,
    sha256 TEXT NOT NULL DEFAULT '');
"""


@dataclass(frozen=True)
class Job:
    id: int
    batch: str
    device: DeviceId
    module: str
    package_id: str
    from_version: str
    target_version: str
    state: str
    progress: int
    code: int | None
    message: str
    file_key: str
    file_size: int
    bytes_served: int
    created_at: float
    updated_at: float
    superseded: int = 0  # 1: a later job of the same batch may replace this one

    @property
    def is_open(self) -> bool:
        return self.state in OPEN_STATES

    @property
    def served_percent(self) -> int:
        return min(100, self.bytes_served * 100 // self.file_size) if self.file_size else 0


@dataclass(frozen=True)
class NewJob:
    """A job about to be created: who, what, and the file it will download."""

    device: DeviceId
    module: str
    package_id: str
    from_version: str
    target_version: str
    file_key: str
    file_size: int
    state: str = "queued"


@dataclass(frozen=True)
class BatchRow:
    name: str
    package_id: str
    fingerprint: dict[str, str]
    state: str
    created_at: float
    started_at: float | None
    ended_at: float | None
    reason: str


_JOB_COLUMNS = ("id, batch, product_key, device_name, module, package_id, from_version, target_version, state, "
                "progress, code, message, file_key, file_size, bytes_served, created_at, updated_at, superseded")


def _job(row: Any) -> Job:
    return Job(row[0], row[1], DeviceId(row[2], row[3]), *row[4:])


class Store:
    """Async access to the run-time database. Open with `await Store.open(path)`."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        # aiosqlite shares one connection between tasks: a write transaction must not
        # interleave with another task's statements, or one commit would take both.
        self._write = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> "Store":
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA busy_timeout=5000")
            async with db.execute("PRAGMA user_version") as cursor:
                row = await cursor.fetchone()
            version = row[0] if row else 0
            if version not in (0, SCHEMA_VERSION):
                raise StoreError(f"{path} has database schema {version}; this server reads schema "
                                 f"{SCHEMA_VERSION}: use the matching server version or a new data_dir")
            if version == 0:
                async with db.execute("PRAGMA table_info(jobs)") as cursor:
                    columns = {row[1] async for row in cursor}
                if columns and "superseded" not in columns:  # written by a development build
                    raise StoreError(f"{path} was written by a development build of the server; "
                                     "start with a new data_dir")
            await db.executescript(SCHEMA)
            await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            await db.commit()
        except BaseException:
            await db.close()  # its worker thread would keep the process alive
            raise
        return cls(db)

    async def close(self) -> None:
        await self._db.close()

    # -- reported versions -------------------------------------------------------------
    async def record_version(self, device: DeviceId, module: str, version: str) -> None:
        async with self._write:
            await self._db.execute(
                "INSERT INTO device_versions VALUES (?, ?, ?, ?, ?) ON CONFLICT (product_key, device_name, module) "
                "DO UPDATE SET version = excluded.version, reported_at = excluded.reported_at",
                (device.product_key, device.device_name, module, version, time.time()))
            await self._db.commit()

    async def reported_version(self, device: DeviceId, module: str) -> str | None:
        async with self._db.execute(
                "SELECT version FROM device_versions WHERE product_key = ? AND device_name = ? AND module = ?",
                (device.product_key, device.device_name, module)) as cursor:
            row = await cursor.fetchone()
        return row[0] if row else None

    async def reported_versions(self, product_key: str, module: str) -> dict[str, str]:
        async with self._db.execute(
                "SELECT device_name, version FROM device_versions WHERE product_key = ? AND module = ?",
                (product_key, module)) as cursor:
            return {name: version async for name, version in cursor}

    # -- batches -----------------------------------------------------------------------
    async def batches(self) -> dict[str, BatchRow]:
        async with self._db.execute("SELECT name, package_id, fingerprint, state, created_at, started_at, "
                                    "ended_at, reason FROM batches") as cursor:
            return {row[0]: BatchRow(row[0], row[1], json.loads(row[2]), *row[3:]) async for row in cursor}

    async def save_batch(self, name: str, package_id: str, fingerprint: dict[str, str], state: str,
                         reason: str = "", targets: list[DeviceId] | None = None) -> None:
        """Insert or update a batch row, with a static batch's target set in the same
        transaction. Package and fingerprint follow the catalog until the batch starts."""
        now = time.time()
        started = now if state == "running" else None
        async with self._write:
            await self._db.execute(
                "INSERT INTO batches (name, package_id, fingerprint, state, created_at, started_at, ended_at, reason) "
                "VALUES (?, ?, ?, ?, ?, ?, NULL, ?) ON CONFLICT (name) DO UPDATE SET state = excluded.state, "
                "package_id = CASE WHEN batches.started_at IS NULL THEN excluded.package_id ELSE batches.package_id END, "
                "fingerprint = CASE WHEN batches.started_at IS NULL THEN excluded.fingerprint "
                "ELSE batches.fingerprint END, "
                "started_at = COALESCE(batches.started_at, excluded.started_at), reason = excluded.reason",
                (name, package_id, json.dumps(fingerprint, sort_keys=True), state, now, started, reason))
            await self._db.executemany("INSERT OR IGNORE INTO batch_targets VALUES (?, ?, ?)",
                                       [(name, d.product_key, d.device_name) for d in targets or ()])
            await self._db.commit()

    async def set_batch_state(self, name: str, state: str, reason: str) -> None:
        """A batch ends (`completed`, `canceled`); what it was started with stays."""
        async with self._write:
            await self._db.execute("UPDATE batches SET state = ?, reason = ?, ended_at = ? WHERE name = ?",
                                   (state, reason, time.time(), name))
            await self._db.commit()

    async def add_targets(self, batch: str, devices: list[DeviceId]) -> None:
        async with self._write:
            await self._db.executemany(
                "INSERT OR IGNORE INTO batch_targets VALUES (?, ?, ?)",
                [(batch, d.product_key, d.device_name) for d in devices])
            await self._db.commit()

    async def targets(self, batch: str) -> set[str]:
        async with self._db.execute("SELECT device_name FROM batch_targets WHERE batch = ?", (batch,)) as cursor:
            return {row[0] async for row in cursor}

    async def is_target(self, batch: str, device: DeviceId) -> bool:
        async with self._db.execute("SELECT 1 FROM batch_targets WHERE batch = ? AND product_key = ? AND "
                                    "device_name = ?", (batch, device.product_key, device.device_name)) as cursor:
            return await cursor.fetchone() is not None

    # -- packages ----------------------------------------------------------------------
    async def package_statuses(self) -> dict[str, tuple[str, str]]:
        """package id -> (status, sha256 of the file the status was earned with)."""
        async with self._db.execute("SELECT package_id, status, sha256 FROM package_status") as cursor:
            return {row[0]: (row[1], row[2]) async for row in cursor}

    async def set_package_status(self, package_id: str, status: str, sha256: str) -> None:
        async with self._write:
            await self._db.execute(
                "INSERT INTO package_status (package_id, status, updated_at, sha256) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (package_id) DO UPDATE SET status = excluded.status, "
                "updated_at = excluded.updated_at, sha256 = excluded.sha256",
                (package_id, status, time.time(), sha256))
            await self._db.commit()

    # -- jobs --------------------------------------------------------------------------
    async def create_jobs(self, batch: str, new_jobs: list[NewJob], reason: str) -> list[Job]:
        """Insert jobs and their first events in one transaction. A device that already has
        an open job for the module, or already had a job in this batch, is skipped (the
        unique indexes decide), so the result may be shorter than `new_jobs`."""
        now = time.time()
        created = []
        async with self._write:
            for new in new_jobs:
                progress = 100 if new.state == "succeeded" else 0
                cursor = await self._db.execute(
                    "INSERT OR IGNORE INTO jobs (batch, product_key, device_name, module, package_id, from_version, "
                    "target_version, state, progress, file_key, file_size, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (batch, new.device.product_key, new.device.device_name, new.module, new.package_id,
                     new.from_version, new.target_version, new.state, progress, new.file_key, new.file_size,
                     now, now))
                if cursor.rowcount != 1 or cursor.lastrowid is None:
                    continue
                created.append(Job(cursor.lastrowid, batch, new.device, new.module, new.package_id, new.from_version,
                                   new.target_version, new.state, progress, None, "", new.file_key, new.file_size,
                                   0, now, now))
            await self._db.executemany(
                "INSERT INTO job_events (job_id, at, from_state, to_state, progress, reason) "
                "VALUES (?, ?, NULL, ?, ?, ?)", [(job.id, now, job.state, job.progress, reason) for job in created])
            await self._db.commit()
        return created

    async def create_job(self, batch: str, new_job: NewJob, reason: str) -> Job | None:
        created = await self.create_jobs(batch, [new_job], reason)
        return created[0] if created else None

    async def transition(self, job: Job, to_state: str, reason: str, *, progress: int | None = None,
                         code: int | None = None, message: str | None = None,
                         from_version: str | None = None, file_key: str | None = None,
                         file_size: int | None = None, superseded: int | None = None) -> Job:
        """Move `job` to `to_state` (or update it in place) and record why, in one transaction."""
        changes: dict[str, Any] = {}
        for name, value in (("progress", progress), ("code", code), ("message", message),
                            ("from_version", from_version), ("file_key", file_key), ("file_size", file_size),
                            ("superseded", superseded)):
            if value is not None:
                changes[name] = value
        changed = await self.transition_many([job], to_state, reason, **changes)
        if changed:
            return changed[0]
        # Another task moved it since it was read (a batch start marking it notified, a cancel).
        # A step forward still applies on top of an open state; a step back or a revival does not.
        current = await self.job(job.id)
        assert current is not None
        if current.is_open and STATE_RANK[to_state] >= STATE_RANK[current.state]:
            changed = await self.transition_many([current], to_state, reason, **changes)
            if changed:
                return changed[0]
            current = await self.job(job.id)
            assert current is not None
        return current

    async def transition_many(self, jobs: list[Job], to_state: str, reason: str, **changes: Any) -> list[Job]:
        """The same transition for several jobs, in one transaction. A job whose state is no
        longer the one it was read in (another task moved it) is left alone and not returned."""
        if not jobs:
            return []
        now = time.time()
        fields: dict[str, Any] = {"state": to_state, "updated_at": now, **changes}
        assignments = ", ".join(f"{name} = ?" for name in fields)
        moved = []
        async with self._write:
            for job in jobs:
                cursor = await self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ? AND state = ?",
                                                (*fields.values(), job.id, job.state))
                if cursor.rowcount == 1:
                    moved.append(job)
            await self._db.executemany(
                "INSERT INTO job_events (job_id, at, from_state, to_state, progress, reason) VALUES (?, ?, ?, ?, ?, ?)",
                [(job.id, now, job.state, to_state, fields.get("progress", job.progress), reason) for job in moved])
            await self._db.commit()
        return [dataclasses.replace(job, **fields) for job in moved]

    async def add_bytes_served(self, job_id: int, count: int) -> None:
        async with self._write:
            # Serving bytes is activity too: a device downloading silently has not timed out.
            await self._db.execute("UPDATE jobs SET bytes_served = bytes_served + ?, updated_at = ? WHERE id = ?",
                                   (count, time.time(), job_id))
            await self._db.commit()

    async def job(self, job_id: int) -> Job | None:
        async with self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)) as cursor:
            row = await cursor.fetchone()
        return _job(row) if row else None

    async def open_job(self, device: DeviceId, module: str) -> Job | None:
        async with self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE product_key = ? AND device_name = ? AND module = ? "
                f"AND state IN {OPEN_STATES}", (device.product_key, device.device_name, module)) as cursor:
            row = await cursor.fetchone()
        return _job(row) if row else None

    async def latest_job(self, device: DeviceId, module: str) -> Job | None:
        async with self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE product_key = ? AND device_name = ? AND module = ? "
                "ORDER BY id DESC LIMIT 1", (device.product_key, device.device_name, module)) as cursor:
            row = await cursor.fetchone()
        return _job(row) if row else None

    async def latest_job_in_batch(self, batch: str, device: DeviceId) -> Job | None:
        async with self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE batch = ? AND product_key = ? AND device_name = ? "
                "ORDER BY id DESC LIMIT 1", (batch, device.product_key, device.device_name)) as cursor:
            row = await cursor.fetchone()
        return _job(row) if row else None

    async def open_jobs(self, product_key: str, module: str) -> list[Job]:
        async with self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE product_key = ? AND module = ? AND state IN {OPEN_STATES}",
                (product_key, module)) as cursor:
            return [_job(row) async for row in cursor]

    async def has_job_in_batch(self, batch: str, device: DeviceId) -> bool:
        """Has the device a job here that no later job may replace?"""
        async with self._db.execute("SELECT 1 FROM jobs WHERE batch = ? AND product_key = ? AND device_name = ? "
                                    "AND superseded = 0",
                                    (batch, device.product_key, device.device_name)) as cursor:
            return await cursor.fetchone() is not None

    async def jobs(self, batch: str | None = None, open_only: bool = False) -> list[Job]:
        where, args = [], []
        if batch is not None:
            where.append("batch = ?")
            args.append(batch)
        if open_only:
            where.append(f"state IN {OPEN_STATES}")
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY id"
        async with self._db.execute(sql, args) as cursor:
            return [_job(row) async for row in cursor]

    async def supersede_failed(self, batch: str, device_names: list[str] | None, reason: str) -> list[Job]:
        """Let the current failed jobs of `batch` (of these devices, or all) be replaced: a retry."""
        async with self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE batch = ? AND state = 'failed' "
                                    "AND superseded = 0 ORDER BY id", (batch,)) as cursor:
            jobs = [_job(row) async for row in cursor]
        jobs = [job for job in jobs if device_names is None or job.device.device_name in device_names]
        return await self.transition_many(jobs, "failed", reason, superseded=1)

    async def state_counts(self, batch: str | None = None) -> dict[str, dict[str, int]]:
        """batch -> state -> number of devices, counting each device's latest job once."""
        where, args = ("WHERE batch = ?", (batch,)) if batch is not None else ("", ())
        async with self._db.execute(
                f"SELECT batch, state, COUNT(*) FROM jobs WHERE id IN (SELECT MAX(id) FROM jobs {where} "
                "GROUP BY batch, product_key, device_name, module) GROUP BY batch, state", args) as cursor:
            counts: dict[str, dict[str, int]] = {}
            async for name, state, count in cursor:
                counts.setdefault(name, {})[state] = count
            return counts

    async def latest_jobs(self, batch: str) -> list[Job]:
        """Each device's latest job in `batch` (a retried device shows its new job)."""
        async with self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id IN (SELECT MAX(id) FROM jobs WHERE batch = ? "
                "GROUP BY product_key, device_name, module) ORDER BY id", (batch,)) as cursor:
            return [_job(row) async for row in cursor]

    async def stale_jobs(self, batch: str, updated_before: float) -> list[Job]:
        """Jobs of `batch` that were told (or are under way) and have not changed since then."""
        async with self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE batch = ? AND updated_at < ? "
                "AND state IN ('notified', 'in_progress', 'installed')", (batch, updated_before)) as cursor:
            return [_job(row) async for row in cursor]

    async def history(self, job_id: int) -> list[tuple[float, str | None, str, int | None, str]]:
        async with self._db.execute("SELECT at, from_state, to_state, progress, reason FROM job_events "
                                    "WHERE job_id = ? ORDER BY id", (job_id,)) as cursor:
            return [tuple(row) async for row in cursor]
