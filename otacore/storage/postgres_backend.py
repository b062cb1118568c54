"""The journal's PostgreSQL backend (cluster mode: several workers share one journal): asyncpg,
one connection for writes, awaited by the journal in the event loop (`is_async`).

Group commit as on SQLite: all records of a tick in one transaction (the same statements as
sqlite_backend.STATEMENTS, translated by postgres_schema.pg_sql; asyncpg's executemany sends
each table's rows pipelined). A connection lost to PostgreSQL (server restarted, network)
fails that commit with a transient error; the journal gives the changes back and retries
once a second, and the next attempt connects anew, runs the `on_connect` hooks, and writes
everything still pending. Upserts make a retried commit harmless; only a commit whose COMMIT
reached the server but whose answer was lost writes its history events twice.

Loading is per part of the fleet: `load_shared` (batches, targets, package statuses,
counters) and `load_partitions` (versions and jobs of the devices in some partitions, by
their `part` column), with the same rules as store.load_state.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import asyncpg

from otacore.fleet.jobs import FINAL_STATES
from otacore.fleet.state import FleetState
from otacore.protocol.credentials import DeviceId
from otacore.storage.postgres_schema import (DDL_LOCK, MIGRATIONS, RESERVE_LOCK, SCHEMA, SCHEMA_VERSION, SEQUENCES,
                                             pg_sql, removed_batches_sql, shown_dsn)
from otacore.storage.records import Records
from otacore.storage.sqlite_backend import STATEMENTS
from otacore.storage.store import _BATCH_SELECT, _JOB_COLUMNS, OPEN_STATES, StoreError, _batch, _job

log = logging.getLogger("ota.journal")
T = TypeVar("T")

CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 60.0  # a server that stops answering fails the commit; the journal retries

# A lost or refused connection, a server shutting down or out of room, a read-only standby:
# the storage's doing, logged without a traceback, and the connection is made anew.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.ReadOnlySQLTransactionError)

_WRITES = tuple((table, pg_sql(statement)) for table, statement in STATEMENTS)
_OPEN = ", ".join(f"'{state}'" for state in OPEN_STATES)

OnConnect = Callable[[asyncpg.Connection], Awaitable[None]]


async def connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT)


class NoJournal(StoreError):
    """PostgreSQL holds no journal yet: no worker has made its schema."""


def no_journal(dsn: str) -> NoJournal:
    return NoJournal(f"PostgreSQL at {shown_dsn(dsn)} holds no journal yet; has a worker run with it?")


def unusable(dsn: str, exc: BaseException) -> StoreError:
    """One line for a user: PostgreSQL at `dsn` cannot be used, and what to check."""
    return StoreError(f"cannot use PostgreSQL at {shown_dsn(dsn)} ({type(exc).__name__}: {exc}); check that it runs, "
                      "that cluster.postgres names it and its database, and that this user may connect")


async def migrate(conn: asyncpg.Connection) -> int:
    """Make or migrate the schema (idempotent; workers starting together take turns on an
    advisory lock). Returns the schema version found before (0: none)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", DDL_LOCK)
        found = 0
        if await conn.fetchval("SELECT to_regclass('meta') IS NOT NULL"):
            found = int(await conn.fetchval("SELECT value FROM meta WHERE key = 'schema_version'") or 0)
        if found > SCHEMA_VERSION:
            raise StoreError(f"PostgreSQL database has schema {found}; this server reads schema {SCHEMA_VERSION}: "
                             "run the matching server version on every worker")
        if found:
            for version in range(found, SCHEMA_VERSION):
                if version in MIGRATIONS:
                    await conn.execute(MIGRATIONS[version])
        await conn.execute(SCHEMA)
        await conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', $1) ON CONFLICT (key) "
                           "DO UPDATE SET value = excluded.value", str(SCHEMA_VERSION))
    return found


async def has_schema(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass('meta') IS NOT NULL AND to_regclass('jobs') IS NOT NULL"))


async def load_shared(conn: asyncpg.Connection, state: FleetState) -> None:
    """Batches, static targets, package statuses and counters into `state` (as store.load_state)."""
    for row in await conn.fetch(_BATCH_SELECT):
        state.load_batch(_batch(row))
    for batch, name in await conn.fetch("SELECT batch, device_name FROM batch_targets"):
        state.targets.setdefault(batch, set()).add(name)
    for package_id, status, sha256 in await conn.fetch("SELECT package_id, status, sha256 FROM package_status"):
        state.package_status[package_id] = (status, sha256)
    for name, value in await conn.fetch("SELECT name, value FROM counters"):
        state.counters[name] = value


async def load_partitions(conn: asyncpg.Connection, state: FleetState, parts: Iterable[int] | None) -> None:
    """Reported versions and jobs of the devices in `parts` (None: every device) into `state`,
    one query per table. As store.load_state: not the finished history of removed batches,
    but each device's latest job per module and every open job."""
    if parts is None:
        where, args = "TRUE", []
    else:
        where, args = "part = ANY($1::integer[])", [sorted(set(parts))]
    for pk, name, module, version, at in await conn.fetch(
            f"SELECT product_key, device_name, module, version, reported_at FROM device_versions WHERE {where}",
            *args):
        state.load_version(DeviceId(pk, name), module, version, at)
    rows = await conn.fetch(
        f"SELECT {_JOB_COLUMNS} FROM jobs WHERE {where} AND (batch NOT IN ({removed_batches_sql()}) "
        f"OR state IN ({_OPEN}) OR id IN (SELECT MAX(id) FROM jobs WHERE {where} "
        "GROUP BY product_key, device_name, module)) ORDER BY id", *args)
    for row in rows:
        state.load_job(_job(row))


_FINAL_VALUES = frozenset(state.value for state in FINAL_STATES)


def _text_safe(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """PostgreSQL's text holds no NUL, which SQLite's does and a device may send (a C string's
    terminator in a version or a progress message): written as U+FFFD, or one such report
    would stop every write."""
    if any(isinstance(value, str) and "\0" in value for value in row):
        return tuple(value.replace("\0", "\ufffd") if isinstance(value, str) else value for value in row)
    return row


class PostgresBackend:
    """Open with `await PostgresBackend.open(dsn, partitions)`; then load the state
    (`load_shared`, `load_partitions`) and give it to `Journal(backend, state, clock)`."""

    is_async = True
    transient_errors = TRANSIENT_ERRORS

    def __init__(self, dsn: str, conn: asyncpg.Connection, partitions: int) -> None:
        self.dsn = dsn
        self.path = shown_dsn(dsn)  # names the database in the journal's messages
        self.partitions = partitions
        self._conn: asyncpg.Connection | None = conn
        self._turn = asyncio.Lock()  # one use of the connection at a time: commits, maintenance, reserve
        self._closed = False
        # Run after every reconnect, before anything else uses the new connection (the first
        # connection is open() 's: whoever registers a hook acts on `connection` itself first).
        self.on_connect: list[OnConnect] = []
        self.reconnects = 0

    @classmethod
    async def open(cls, dsn: str, partitions: int = 1) -> "PostgresBackend":
        """Connect and make or migrate the schema; StoreError when PostgreSQL cannot be used."""
        try:
            conn = await connect(dsn)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise unusable(dsn, exc) from None
        try:
            await migrate(conn)
        except StoreError:
            await conn.close()
            raise
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            conn.terminate()
            raise unusable(dsn, exc) from None
        except BaseException:
            conn.terminate()
            raise
        return cls(dsn, conn, partitions)

    @property
    def connection(self) -> asyncpg.Connection | None:
        """The write connection (None while lost: the next use connects anew). Use it between
        commits, through Journal.maintain."""
        return self._conn

    # -- the connection ------------------------------------------------------------------
    async def _ready(self) -> asyncpg.Connection:
        if self._closed:
            raise RuntimeError("the PostgreSQL journal is closed")
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        self._drop()
        conn = await connect(self.dsn)
        try:
            for hook in list(self.on_connect):
                await hook(conn)
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn
        self.reconnects += 1
        log.info("connected to PostgreSQL at %s again", self.path)
        return conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    def _failed(self, conn: asyncpg.Connection, exc: BaseException) -> None:
        """After a failed use: a lost or suspect connection is dropped (the next use connects
        anew); one that only refused a statement (rolled back) is kept."""
        if not isinstance(exc, Exception) or isinstance(exc, self.transient_errors) or conn.is_closed():
            if self._conn is conn:
                self._drop()

    async def _use(self, work: Callable[[asyncpg.Connection], Any], *, transaction: bool) -> Any:
        async with self._turn:
            conn = await self._ready()
            try:
                if not transaction:
                    result = work(conn)
                    return await result if inspect.isawaitable(result) else result
                async with conn.transaction():
                    result = work(conn)
                    if inspect.isawaitable(result):
                        result = await result
                return result
            except BaseException as exc:
                self._failed(conn, exc)
                raise

    # -- the journal's side --------------------------------------------------------------
    async def write(self, records: Records) -> None:
        """All of these records in one transaction, or none (raise)."""
        async def write(conn: asyncpg.Connection) -> None:
            for table, statement in _WRITES:
                if records[table]:
                    await conn.executemany(statement, [_text_safe(row) for row in records[table]])
            # Delivered at COMMIT to the workers listening (cluster_worker/fleet_sync.py): shared
            # rows changed; a job reached a final state (the coordinator's rules look again).
            for sha256, text, path in records.get("catalog", []):
                # The catalog version the batch rows of this transaction were decided with
                # (ota_catalog: made by the cluster workers, cluster_worker/membership.py).
                version = await conn.fetchval("INSERT INTO ota_catalog (sha256, text, path) VALUES ($1, $2, $3) "
                                              "RETURNING id", sha256, text, path)
                await conn.execute("DELETE FROM ota_catalog WHERE id < $1 - 100", version)  # a little history
                await conn.execute("NOTIFY ota_catalog")
            if records["batches"] or records["packages"] or records["targets"]:
                await conn.execute("NOTIFY ota_shared")
            if any(event[3] in _FINAL_VALUES for event in records["events"]):
                await conn.execute("NOTIFY ota_final")
        await self._use(write, transaction=True)

    async def transaction(self, work: Callable[[asyncpg.Connection], Any]) -> Any:
        """`work(connection)` in one transaction; an awaitable it returns is awaited inside it."""
        return await self._use(work, transaction=True)

    async def read(self, work: Callable[[asyncpg.Connection], Any]) -> Any:
        return await self._use(work, transaction=False)

    def moved(self) -> str | None:
        return None  # a server is not a file that can be swapped under us

    async def close(self, *, abandoned: bool = False) -> None:
        self._closed = True
        async with self._turn:
            conn, self._conn = self._conn, None
            if conn is None or conn.is_closed():
                return
            try:
                await asyncio.wait_for(conn.close(), 5)
            except Exception:  # noqa: BLE001  (closing: the server drops it anyway)
                conn.terminate()

    # -- loading ---------------------------------------------------------------------------
    async def load_shared(self, state: FleetState) -> None:
        """Batches, batch_targets, package_status and counters into `state`."""
        await self.read(lambda conn: load_shared(conn, state))

    async def load_partitions(self, state: FleetState, parts: Iterable[int]) -> None:
        """device_versions and jobs of the devices whose `part` is in `parts` into `state`."""
        parts = set(parts)
        await self.read(lambda conn: load_partitions(conn, state, parts))

    # -- ids ---------------------------------------------------------------------------------
    async def reserve(self, sequence: str, count: int) -> int:
        """Reserve `count` consecutive values of `sequence` (`job_ids` or `push_ids`) for this
        worker; returns the first. How: under the transaction-scoped advisory lock
        RESERVE_LOCK, `nextval` gives the first and `setval` moves the sequence past the
        block, so concurrent reservations never overlap (every user of these sequences must
        go through reserve). Retried once on a fresh connection when the connection was lost."""
        if sequence not in SEQUENCES:
            raise ValueError(f"no sequence {sequence!r}; there are {', '.join(SEQUENCES)}")
        if count < 1:
            raise ValueError("reserve at least one value")

        async def reserve(conn: asyncpg.Connection) -> int:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", RESERVE_LOCK)
            first = int(await conn.fetchval(f"SELECT nextval('{sequence}')"))
            if count > 1:
                await conn.execute(f"SELECT setval('{sequence}', $1::bigint)", first + count - 1)
            return first

        try:
            return await self.transaction(reserve)
        except self.transient_errors:
            return await self.transaction(reserve)


async def load_all(dsn: str) -> FleetState:
    """The whole fleet's state as PostgreSQL last committed it (otactl plan): every partition."""
    try:
        conn = await connect(dsn)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise unusable(dsn, exc) from None
    try:
        if not await has_schema(conn):
            raise no_journal(dsn)
        state = FleetState()
        await load_partitions(conn, state, None)
        await load_shared(conn, state)
        return state
    finally:
        await conn.close()


__all__ = ["NoJournal", "PostgresBackend", "TRANSIENT_ERRORS", "connect", "has_schema", "load_all", "load_partitions",
           "load_shared", "migrate"]
