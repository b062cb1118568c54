"""The journal: writes the engine's in-memory changes with group commit, through a backend.

One transaction per tick, many events per transaction. Each tick writes the latest value of
every row that changed (jobs, reported versions, batches, package statuses) and the history
events in order (otacore/storage/records.py), so progress and bytes served cost one row
write per tick however often they change.

`commit()` is how a promise is kept: it returns once everything changed before the call is
on disk; the engine awaits it before a push, URL, streamId or reply that names a new state
leaves the process. Many such waits share one commit. A failed commit (disk full, I/O error,
a lost connection) keeps its changes for the next attempt, once a second; waiters wait until
they are written, and `trouble()` says why meanwhile (for /healthz). A backend that finds
its database replaced raises `DatabaseMoved`: the journal is abandoned for good (waiters are
canceled: what they were waiting for was never kept).

Where the journal goes is the `JournalBackend` seam: SQLite (storage/sqlite_backend.py), whose
methods block and run in a worker thread, or PostgreSQL (storage/postgres_backend.py), an async
backend (`is_async = True`) whose methods the journal awaits in the event loop.
"""
from __future__ import annotations

import asyncio
import datetime
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from otacore.fleet.state import FleetState
from otacore.storage.records import Records, records

log = logging.getLogger("ota.journal")
T = TypeVar("T")

TICK_SECONDS = 0.02
RETRY_SECONDS = 1.0


class DatabaseMoved(Exception):
    """The database at the journal's place is not the one it opened."""


class JournalBackend(Protocol):
    """Where the journal goes. With `is_async` False its methods block and the journal calls
    them from a worker thread; with `is_async` True, `write`, `transaction`, `read` and `close`
    are coroutine functions the journal awaits in the event loop (and `transaction`/`read`
    await what `work` returns when it is awaitable). One call at a time either way."""

    path: Any  # a Path (SQLite), or what names the database in messages (PostgreSQL: its DSN, no password)
    is_async: bool
    partitions: int  # each job's and version's `part` is the device's partition of this many
    transient_errors: tuple[type[BaseException], ...]  # the storage's doing (disk, network), not a bug

    def write(self, records: Records) -> Any:
        """All of these records in one transaction, or none (raise)."""

    def transaction(self, work: Callable[[Any], Any]) -> Any:
        """`work(connection)` in one write transaction."""

    def read(self, work: Callable[[Any], Any]) -> Any:
        """`work(connection)` outside a write transaction (works while writes fail)."""

    def moved(self) -> str | None:
        """Why the database is no longer the one opened, or None."""

    def close(self, *, abandoned: bool) -> Any:
        """Release the connection; `abandoned`: the database was replaced under us."""


class Journal:
    """Open with `Journal.open(path)` after `Store.open` has made the schema; then `start()`."""

    def __init__(self, backend: JournalBackend, state: FleetState, clock: Callable[[], float]) -> None:
        self.backend = backend
        self.state = state
        self._clock = clock
        self.path = backend.path
        self._async = bool(getattr(backend, "is_async", False))
        self._partitions = int(getattr(backend, "partitions", 1))
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
    def open(cls, path: Path, clock: Callable[[], float], partitions: int = 1) -> "Journal":
        """A journal on the SQLite database at `path`, with the state it holds (blocking; once at
        start). `partitions`: what each row's `part` is computed with (1: all 0)."""
        from otacore.storage.sqlite_backend import SqliteBackend

        backend, state = SqliteBackend.open(path, partitions)
        return cls(backend, state, clock)

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
        self._closed = True
        closed = self.backend.close(abandoned=self.abandoned is not None)
        if inspect.isawaitable(closed):
            await closed

    def moved(self) -> str | None:
        """Why the database is not the one the journal opened (deleted, replaced), or None."""
        return self.backend.moved()

    def abandon(self, reason: str) -> None:
        """Write nothing more, for good: the files at our path are not ours. Changes not yet
        written stay so; whoever waits for them is canceled."""
        if self.abandoned is None:
            self.abandoned = reason
            self._cancel_waiters()
            self._wake.set()

    async def maintain(self, work: Callable[[Any], T], *, write: bool = True) -> T:
        """Run `work` on the journal's connection, in its worker thread, between two commits
        (retention deletes history this way: one writer, never a second connection waiting
        on the first), in one write transaction unless `write` is False (a read, which also
        works while the disk refuses writes). Keep `work` short: commits wait for it. On an async
        backend `work` runs in the event loop and may return an awaitable, which is awaited
        inside the transaction (retention.py's functions do so on a PostgreSQL connection)."""
        if self.abandoned is not None or self._closed:
            raise RuntimeError("the journal is closed")
        async with self._connection:
            run = self.backend.transaction if write else self.backend.read
            if self._async:
                return await run(work)
            return await asyncio.to_thread(run, work)

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
                    taken = records(self.state, changes, self._clock(), self._partitions)
                    if self._async:
                        await self.backend.write(taken)
                    else:
                        await asyncio.to_thread(self.backend.write, taken)
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
        if isinstance(exc, self.backend.transient_errors):
            log.error("cannot write the database (%s); retrying every %gs, devices wait for what they were "
                      "promised", exc, RETRY_SECONDS)
        else:  # a bug, not the disk: the traceback is for us
            log.error("cannot write the database; retrying every %gs", RETRY_SECONDS, exc_info=exc)

    def _succeeded(self) -> None:
        if self._last_error:
            log.info("database writes work again")
        self._last_error, self._failing_since = "", None
        self.commits += 1
