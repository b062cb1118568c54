"""The journal's SQLite backend: one sqlite3 connection, used from one worker thread at a time.

It writes a group of records (otacore/storage/records.py) in one transaction, runs
maintenance between commits, and checks that the database is still the file it opened:
one stat() before each transaction and again after its COMMIT, before anyone is told. A
database deleted or replaced under the server raises `DatabaseMoved`, and the journal is
abandoned for good. `moved()`, which the runtime asks every second, also checks the -wal.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from otacore.fleet.state import FleetState
from otacore.storage.data_dir import file_id
from otacore.storage.journal import DatabaseMoved
from otacore.storage.records import Records
from otacore.storage.store import StoreError, database_error, load_state

log = logging.getLogger("ota.journal")
T = TypeVar("T")

# Shared with the PostgreSQL backend (postgres_schema.pg_sql translates them).
_JOB_UPSERT = (
    "INSERT INTO jobs (id, batch, product_key, device_name, module, package_id, from_version, target_version, "
    "state, progress, code, message, file_key, file_size, bytes_served, created_at, updated_at, superseded, part) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
    "from_version = excluded.from_version, state = excluded.state, progress = excluded.progress, "
    "code = excluded.code, message = excluded.message, file_key = excluded.file_key, "
    "file_size = excluded.file_size, bytes_served = excluded.bytes_served, updated_at = excluded.updated_at, "
    "superseded = excluded.superseded, part = excluded.part")
_EVENT_INSERT = "INSERT INTO job_events (job_id, at, from_state, to_state, progress, reason) VALUES (?, ?, ?, ?, ?, ?)"
_VERSION_UPSERT = (
    "INSERT INTO device_versions (product_key, device_name, module, version, reported_at, part) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (product_key, device_name, module) "
    "DO UPDATE SET version = excluded.version, reported_at = excluded.reported_at, part = excluded.part")
_BATCH_UPSERT = (
    "INSERT INTO batches (name, package_id, fingerprint, state, created_at, started_at, ended_at, reason, control) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET package_id = excluded.package_id, "
    "fingerprint = excluded.fingerprint, state = excluded.state, started_at = excluded.started_at, "
    "ended_at = excluded.ended_at, reason = excluded.reason, control = excluded.control")
_TARGET_INSERT = "INSERT OR IGNORE INTO batch_targets (batch, product_key, device_name) VALUES (?, ?, ?)"
_PACKAGE_UPSERT = (
    "INSERT INTO package_status (package_id, status, updated_at, sha256) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (package_id) DO UPDATE SET status = excluded.status, updated_at = excluded.updated_at, "
    "sha256 = excluded.sha256")
_COUNTER_UPSERT = ("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) "
                   "DO UPDATE SET value = excluded.value")
# In this order: a job's row before its events, so the history never names a missing job.
STATEMENTS = (("jobs", _JOB_UPSERT), ("events", _EVENT_INSERT), ("versions", _VERSION_UPSERT),
              ("batches", _BATCH_UPSERT), ("targets", _TARGET_INSERT), ("packages", _PACKAGE_UPSERT),
              ("counters", _COUNTER_UPSERT))




class SqliteBackend:
    """Open with `SqliteBackend.open(path)` after `Store.open` has made the schema."""

    transient_errors = (sqlite3.Error, OSError)  # the disk's doing, not a bug: logged without a traceback

    is_async = False

    def __init__(self, db: sqlite3.Connection, path: Path, partitions: int = 1) -> None:
        self.db = db
        self.path = path
        self.partitions = partitions  # what the journal's records compute each row's `part` with
        # The -wal holds the latest commits until a checkpoint: deleting it loses them too.
        self._files = (path, path.with_name(path.name + "-wal"))
        self._ids = tuple(file_id(f) for f in self._files)

    @classmethod
    def open(cls, path: Path, partitions: int = 1) -> tuple["SqliteBackend", FleetState]:
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
        return cls(db, path, partitions), state

    # -- writing (blocking: called in a worker thread) -----------------------------------
    def write(self, records: Records) -> None:
        def write(db: sqlite3.Connection) -> None:
            for table, statement in STATEMENTS:
                if records[table]:
                    db.executemany(statement, records[table])
        self.transaction(write)

    def transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work` in one write transaction on the connection, on the file it opened (checked
        before, and after the commit, before anyone is told); rolled back on error."""
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

    def read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return work(self._ready())

    def _ready(self) -> sqlite3.Connection:
        """The connection, still on the file it opened, with no transaction left open."""
        self._check_files()
        if self.db.in_transaction:  # a ROLLBACK that failed last time (I/O error) left it open
            self.db.execute("ROLLBACK")
        return self.db

    def _check_files(self) -> None:
        # The database file only: a -wal deleted alone is caught by moved() within a second, and
        # what it held is not lost (SQLite checkpoints it into the unmoved file when it closes).
        if file_id(self.path) != self._ids[0]:
            raise DatabaseMoved(f"database {self.path} was deleted or replaced while the server ran")

    # -- identity and closing ------------------------------------------------------------
    def moved(self) -> str | None:
        """Why the database or its -wal at our path is not the file we opened (deleted,
        replaced), or None."""
        for name, path, opened in zip(("database", "-wal of database"), self._files, self._ids):
            if file_id(path) != opened:
                return f"{name} {self.path} was deleted or replaced while the server ran"
        return None

    def close(self, *, abandoned: bool) -> None:
        if abandoned:
            self._set_own_wal_aside()
        self.db.close()  # SQLite neither checkpoints nor deletes anything once the file has moved

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
