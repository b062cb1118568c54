"""The journal: writes the engine's in-memory changes to SQLite with group commit.

One writer (a sqlite3 connection used from one worker thread at a time), one transaction per
tick, many events per transaction. Each tick writes the latest value of every row that
changed (jobs, reported versions, batches, package statuses) and the history events in
order, so progress and bytes served cost one row write per tick however often they change.

`commit()` is how a promise is kept: it returns once everything changed before the call is
on disk; the engine awaits it before a push, URL, streamId or reply that names a new state
leaves the process. Many such waits share one commit. A failed commit (disk full, I/O error)
keeps its changes for the next attempt, once a second; waiters wait until they are written, and
`trouble()` says why meanwhile (for /healthz).

Each transaction first checks (one stat() call) that the database is still the file the
journal opened, and again after its COMMIT before anyone is told: a database deleted or
replaced under the server gets nothing more, and the journal is abandoned for good (waiters
are canceled: what they were waiting for was never kept). `moved()`, which the runtime asks
every second, also checks the -wal.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from otacore.storage.data_dir import file_id
from otacore.fleet.state import Changes, FleetState
from otacore.storage.store import StoreError, database_error, load_state

log = logging.getLogger("ota.journal")
T = TypeVar("T")

TICK_SECONDS = 0.02
RETRY_SECONDS = 1.0

_JOB_UPSERT = (
    "INSERT INTO jobs (id, batch, product_key, device_name, module, package_id, from_version, target_version, "
    "state, progress, code, message, file_key, file_size, bytes_served, created_at, updated_at, superseded) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
    "from_version = excluded.from_version, state = excluded.state, progress = excluded.progress, "
    "code = excluded.code, message = excluded.message, file_key = excluded.file_key, "
    "file_size = excluded.file_size, bytes_served = excluded.bytes_served, updated_at = excluded.updated_at, "
    "superseded = excluded.superseded")
_EVENT_INSERT = "INSERT INTO job_events (job_id, at, from_state, to_state, progress, reason) VALUES (?, ?, ?, ?, ?, ?)"
_VERSION_UPSERT = (
    "INSERT INTO device_versions VALUES (?, ?, ?, ?, ?) ON CONFLICT (product_key, device_name, module) "
    "DO UPDATE SET version = excluded.version, reported_at = excluded.reported_at")
_BATCH_UPSERT = (
    "INSERT INTO batches (name, package_id, fingerprint, state, created_at, started_at, ended_at, reason, control) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET package_id = excluded.package_id, "
    "fingerprint = excluded.fingerprint, state = excluded.state, started_at = excluded.started_at, "
    "ended_at = excluded.ended_at, reason = excluded.reason, control = excluded.control")
_TARGET_INSERT = "INSERT OR IGNORE INTO batch_targets VALUES (?, ?, ?)"
_PACKAGE_UPSERT = (
    "INSERT INTO package_status (package_id, status, updated_at, sha256) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (package_id) DO UPDATE SET status = excluded.status, updated_at = excluded.updated_at, "
    "sha256 = excluded.sha256")
# In this order: a job's row before its events, so the history never names a missing job.
_COUNTER_UPSERT = "INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value"
_ORDER = (_JOB_UPSERT, _EVENT_INSERT, _VERSION_UPSERT, _BATCH_UPSERT, _TARGET_INSERT, _PACKAGE_UPSERT, _COUNTER_UPSERT)

Rows = dict[str, list[tuple[Any, ...]]]


class DatabaseMoved(Exception):
    """The database (or its -wal) at the journal's path is not the file it opened."""


class Journal:
    """Open with `Journal.open(path)` after `Store.open` has made the schema; then `start()`."""

    def __init__(self, db: sqlite3.Connection, state: FleetState, clock: Callable[[], float], path: Path) -> None:
        self._db = db
        self.state = state
        self._clock = clock
        self.path = path
        # The -wal holds the latest commits until a checkpoint: deleting it loses them too.
        self._files = (path, path.with_name(path.name + "-wal"))
        self._ids = tuple(file_id(f) for f in self._files)
        self._waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self._last_error = ""
        self._failing_since: float | None = None
        self.abandoned: str | None = None  # why nothing more is written
        self._writing = False
        self._connection = asyncio.Lock()  # the writer thread's turn: commits, or maintenance
        self.commits = 0

    @classmethod
    def open(cls, path: Path, clock: Callable[[], float]) -> "Journal":
        """Connect and load the state the database holds (blocking; once at start)."""
        try:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")  # after this the -wal exists until we close
                db.execute("PRAGMA synchronous=NORMAL")  # a committed transaction survives kill -9
                db.execute("PRAGMA busy_timeout=5000")
                state = load_state(db)
            except BaseException:
                db.close()
                raise
        except sqlite3.Error as exc:
            raise StoreError(database_error(path, exc)) from None
        return cls(db, state, clock, path)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ota-journal")

    async def close(self, attempts: int = 5) -> None:
        """Write what is left (trying a few times), then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for _ in range(attempts):
            if await self._flush() or self.abandoned is not None:
                break
            await asyncio.sleep(RETRY_SECONDS)
        if self.state.changes and self.abandoned is None:  # abandoned: whoever abandoned it said why
            log.error("shutting down with changes the database did not take; the devices concerned will "
                      "report again and be offered their upgrade again")
        self._cancel_waiters()  # nobody is told what was not kept
        if self.abandoned is not None:
            self._set_own_wal_aside()
        self._closed = True
        self._db.close()  # SQLite neither checkpoints nor deletes anything once the file has moved

    def _set_own_wal_aside(self) -> None:
        """Abandoned: our -wal, if still at our path, would be replayed into whatever database is
        there now (a backup moved over ours, say). Renamed, not deleted: it holds the latest
        writes of the file we opened, wherever that went."""
        wal = self._files[1]
        if file_id(wal) != self._ids[1]:
            return
        aside = wal.with_name(f"{wal.name}.orphaned-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            os.rename(wal, aside)
        except OSError as exc:
            log.error("cannot move %s aside (%s); move it away before the next start", wal, exc)
            return
        log.warning("moved %s to %s: it holds the latest writes of the database file that was at %s; to get "
                    "them back, put it beside that file as <file>-wal", wal, aside.name, self.path)

    def moved(self) -> str | None:
        """Why the database or its -wal at our path is not the file we opened (deleted,
        replaced), or None."""
        for name, path, opened in zip(("database", "-wal of database"), self._files, self._ids):
            if file_id(path) != opened:
                return f"{name} {self.path} was deleted or replaced while the server ran"
        return None

    def abandon(self, reason: str) -> None:
        """Write nothing more, for good: the files at our path are not ours. Changes not yet
        written stay so; whoever waits for them is canceled."""
        if self.abandoned is None:
            self.abandoned = reason
            self._cancel_waiters()
            self._wake.set()

    async def maintain(self, work: Callable[[sqlite3.Connection], T], *, write: bool = True) -> T:
        """Run `work` on the journal's connection, in its worker thread, between two commits
        (retention deletes history this way: one writer, never a second connection waiting
        on the first), in one write transaction unless `write` is False (a read, which also
        works while the disk refuses writes). Keep `work` short: commits wait for it."""
        if self.abandoned is not None or self._closed:
            raise RuntimeError("the journal is closed")
        async with self._connection:
            return await asyncio.to_thread(self._transaction if write else self._read, work)

    def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return work(self._ready())

    def _ready(self) -> sqlite3.Connection:
        """The connection, still on the file it opened, with no transaction left open."""
        self._check_files()
        if self._db.in_transaction:  # a ROLLBACK that failed last time (I/O error) left it open
            self._db.execute("ROLLBACK")
        return self._db

    @property
    def busy(self) -> bool:
        """A transaction is being written: the changes it took name jobs by id."""
        return self._writing

    def trouble(self) -> str | None:
        """Why changes are not reaching the disk now, or None when they are."""
        if self.abandoned is not None:
            return self.abandoned
        if self._failing_since is None:
            return None
        since = datetime.datetime.fromtimestamp(self._failing_since).astimezone().isoformat(timespec="seconds")
        return f"database writes failing since {since}: {self._last_error}"

    def _cancel_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.cancel()

    async def commit(self) -> None:
        """Return once every change made before this call is committed. Canceled (CancelledError)
        when the journal was abandoned: what the caller waits for will never be written."""
        if self._closed:
            raise RuntimeError("the journal is closed")
        if self.abandoned is not None:
            raise asyncio.CancelledError(self.abandoned)
        if not self.state.changes and not self._writing:
            return
        if self._task is None:  # not started: write in place, until it works
            while not await self._flush():
                if self.abandoned is not None:
                    raise asyncio.CancelledError(self.abandoned)
                await asyncio.sleep(RETRY_SECONDS)
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake.set()
        await waiter

    async def _run(self) -> None:
        while not self._closing and self.abandoned is None:
            if not self._waiters:
                try:
                    await asyncio.wait_for(self._wake.wait(), TICK_SECONDS)
                except TimeoutError:
                    pass
            self._wake.clear()
            if not await self._flush() and self.abandoned is None:
                await asyncio.sleep(RETRY_SECONDS)

    async def _flush(self) -> bool:
        """One transaction with everything changed so far; True when it is on disk (or empty)."""
        if self.abandoned is not None:
            return False
        changes, waiters = self.state.take_changes(), self._waiters
        self._waiters = []
        if changes:
            self._writing = True
            try:
                async with self._connection:  # not while maintenance (retention) uses it
                    await asyncio.to_thread(self._write, self._rows(changes))
            except Exception as exc:  # noqa: BLE001  (whatever it was, the changes are kept)
                self.state.give_back(changes)
                self._waiters[:0] = waiters
                self._failed(exc)
                return False
            finally:
                self._writing = False
            self._succeeded()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        return True

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, DatabaseMoved):
            self.abandon(str(exc))
            return
        if self._failing_since is None:
            self._failing_since = self._clock()
        if str(exc) == self._last_error:
            return  # said once per streak and kind
        self._last_error = str(exc)
        if isinstance(exc, (sqlite3.Error, OSError)):
            log.error("cannot write the database (%s); retrying every %gs, devices wait for what they were "
                      "promised", exc, RETRY_SECONDS)
        else:  # a bug, not the disk: the traceback is for us
            log.error("cannot write the database; retrying every %gs", RETRY_SECONDS, exc_info=exc)

    def _succeeded(self) -> None:
        if self._last_error:
            log.info("database writes work again")
        self._last_error, self._failing_since = "", None
        self.commits += 1

    def _rows(self, changes: Changes) -> Rows:
        """Parameters for each statement, taken from memory now (in the event loop), so the
        writer thread never reads state that decisions are changing."""
        state = self.state
        jobs = [state.jobs[job_id] for job_id in sorted(changes.jobs)]  # older jobs first
        versions = []
        for device, module in changes.versions:
            version, at = state.versions[(device, module)]
            versions.append((device.product_key, device.device_name, module, version, at))
        batches = [(row.name, row.package_id, json.dumps(row.fingerprint, sort_keys=True), row.state,
                    row.created_at, row.started_at, row.ended_at, row.reason, json.dumps(row.control, sort_keys=True))
                   for row in (state.batches[name] for name in changes.batches)]
        now = self._clock()
        return {
            _JOB_UPSERT: [(j.id, j.batch, j.device.product_key, j.device.device_name, j.module, j.package_id,
                           j.from_version, j.target_version, j.state.value, j.progress, j.code, j.message,
                           j.file_key, j.file_size, j.bytes_served, j.created_at, j.updated_at, j.superseded)
                          for j in jobs],
            _EVENT_INSERT: changes.events,
            _VERSION_UPSERT: versions,
            _BATCH_UPSERT: batches,
            _TARGET_INSERT: changes.targets,
            _PACKAGE_UPSERT: [(package_id, *state.package_status[package_id][:1], now,
                               state.package_status[package_id][1]) for package_id in changes.packages],
            _COUNTER_UPSERT: [(name, state.counters[name]) for name in sorted(changes.counters)],
        }

    def _write(self, rows: Rows) -> None:
        def write(db: sqlite3.Connection) -> None:
            for statement in _ORDER:
                if rows[statement]:
                    db.executemany(statement, rows[statement])
        self._transaction(write)

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work` in one write transaction on the journal's connection, on the file it opened
        (checked before, and after the commit, before anyone is told); rolled back on error."""
        db = self._ready()
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work(db)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._check_files()  # moved during the transaction: committed to a file nobody will read
        return result

    def _check_files(self) -> None:
        # The database file only: a -wal deleted alone is caught by moved() within a second, and
        # what it held is not lost (SQLite checkpoints it into the unmoved file when it closes).
        if file_id(self.path) != self._ids[0]:
            raise DatabaseMoved(f"database {self.path} was deleted or replaced while the server ran")
