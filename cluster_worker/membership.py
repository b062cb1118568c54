"""This worker's place among the workers that share the fleet through PostgreSQL: its row in
`ota_workers` (a heartbeat twice a second), the device partitions it holds, and whether it is
the coordinator (docs/cluster.md, "Several workers").

Holding is a PostgreSQL session advisory lock per partition (and one for the coordinator),
taken on the journal's own connection: the connection that writes a partition's rows is the
one that holds it, so a worker killed with `kill -9` (its connection gone) frees its
partitions at once, and a worker whose connection broke cannot write after another took
them (it re-takes its locks before its next write, or stops: see `_relock`).

How many partitions each worker holds is worked out by every worker alike from the live rows
(seen in the last DEAD_AFTER seconds): P // n each, one more for the first P % n by id. A
worker over its share releases (stop consuming, commit, forget, unlock); one under it takes
free partitions (lock, load from PostgreSQL, consume). A dead worker's share is taken within
DEAD_AFTER + one round; a new worker gets its share as soon as the others have released.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from otacore.storage.journal import Journal

log = logging.getLogger("ota.cluster")

LOCK_SPACE = 0x07A0  # the first key of every advisory lock the workers take
COORDINATOR_LOCK = -1  # the second key of the coordinator's; a partition's is its number
ROUND_SECONDS = 0.5
REFRESH_SECONDS = 0.1  # rows read this recently are fresh enough for a request that asks again
REFRESH_WAIT = 1.0  # a request waits at most this long for that read (PostgreSQL may hang)
DEAD_AFTER = 3.0  # seconds without a heartbeat: the worker is gone, its partitions are free
# A heartbeat not done by then is dropped with its connection (the next connects anew): a
# backend that stopped answering. Well above a slow one: at 2 s, 10,000 devices on two cores
# cut beats that were merely slow, each next one reconnected and was cut too, the worker's row
# aged past ROUTE_AFTER and its devices' downloads were answered "moving" (394 failed).
BEAT_TIMEOUT = 10.0
ROUTE_AFTER = 30.0  # requests still go to a worker seen this recently (a slow heartbeat is not a death)
FORGET_AFTER = 3600.0  # a dead worker's row is deleted after this

NOW = "extract(epoch from clock_timestamp())"  # PostgreSQL's clock: the workers' shared one

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS ota_workers (
    id TEXT PRIMARY KEY, url TEXT NOT NULL, started_at DOUBLE PRECISION NOT NULL,
    seen_at DOUBLE PRECISION NOT NULL, partitions INTEGER[] NOT NULL DEFAULT '{{}}',
    coordinator BOOLEAN NOT NULL DEFAULT false);
CREATE TABLE IF NOT EXISTS ota_rate_grants (
    batch TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, n INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS ota_rate_grants_by_batch ON ota_rate_grants (batch, at);
CREATE TABLE IF NOT EXISTS ota_client_ids (
    client_id TEXT PRIMARY KEY, product_key TEXT NOT NULL, device_name TEXT NOT NULL,
    used_at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS ota_catalog (
    id BIGSERIAL PRIMARY KEY, sha256 TEXT NOT NULL, text TEXT NOT NULL, path TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL DEFAULT {NOW});
"""


class LostLock(Exception):
    """A lock this worker held is another's now (its connection to PostgreSQL broke)."""


def preference(worker_id: str, partition: int) -> int:
    """Rendezvous order: each worker prefers partitions in its own order, so two workers
    taking free partitions at once mostly try different ones first."""
    return int.from_bytes(hashlib.blake2b(f"{worker_id}/{partition}".encode(), digest_size=8).digest(), "big")


def share(partitions: int, live: list[str], worker_id: str) -> int:
    """How many partitions this worker should hold among the live ones."""
    if worker_id not in live:
        live = sorted([*live, worker_id])
    base, extra = divmod(partitions, len(live))
    return base + (1 if live.index(worker_id) < extra else 0)


class Membership:
    """Open with `await Membership.open(...)`; `start()` runs the rounds; `stop()` releases all.
    `pool` is the heartbeat's own (one connection): shared with a worker's login checks and
    views, a burst of logins queued the heartbeat past DEAD_AFTER and ROUTE_AFTER, and every
    call for the devices of a live worker was answered 503."""

    def __init__(self, pool: asyncpg.Pool, journal: Journal, url: str, partitions: int,
                 take: Callable[[int], Awaitable[None]], release: Callable[[int], Awaitable[None]],
                 coordinate: Callable[[], Awaitable[None]], fatal: Callable[[str], None]) -> None:
        self.pool = pool
        self.journal = journal
        self.url = url
        self.partitions = partitions
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._take, self._release, self._coordinate, self._fatal = take, release, coordinate, fatal
        self.held: set[int] = set()
        self.coordinator = False
        self.holders: dict[int, str] = {}  # partition -> URL of the live worker holding it
        self.coordinator_url: str | None = None
        self.live_workers: list[str] = []
        self.moves = 0  # partitions taken or released, for /metrics
        self._task: asyncio.Task[None] | None = None
        self._beat_task: asyncio.Task[None] | None = None
        self._last_beat = 0.0  # loop time of the last heartbeat written
        self._refreshing: asyncio.Future[None] | None = None
        self._stopping = False
        self._changed = asyncio.Event()
        self._rows: dict[str, list[int]] = {}  # live worker id -> the partitions its row lists
        self._urls: list[str] = []
        self._healthy_since: float | None = None  # since when rounds succeed without a break
        self._first_round = True
        self.lost: str | None = None  # why this worker's locks are no longer its own

    @classmethod
    async def open(cls, pool: asyncpg.Pool, *args: Any, **kwargs: Any) -> "Membership":
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, -2)", LOCK_SPACE)  # one worker's DDL at a time
            await conn.execute(SCHEMA)
        member = cls(pool, *args, **kwargs)
        member.journal.backend.on_connect.append(member._relock)
        await member._heartbeat()
        return member

    # -- locks, on the journal's connection --------------------------------------------------
    async def _lock(self, key: int) -> bool:
        async def work(conn: asyncpg.Connection) -> bool:
            return bool(await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", LOCK_SPACE, key))
        return await self.journal.maintain(work, write=False)

    async def _unlock(self, key: int) -> None:
        async def work(conn: asyncpg.Connection) -> None:
            await conn.execute("SELECT pg_advisory_unlock($1, $2)", LOCK_SPACE, key)
        await self.journal.maintain(work, write=False)

    async def _relock(self, conn: asyncpg.Connection) -> None:
        """The journal's connection is new (the old one broke): take this worker's locks again
        before anything is written; one another worker took meanwhile means what this worker
        holds in memory for it may be stale: stop (a supervisor starts it again, clean)."""
        keys = sorted(self.held) + ([COORDINATOR_LOCK] if self.coordinator else [])
        for key in keys:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", LOCK_SPACE, key):
                what = "the coordinator's lock" if key == COORDINATOR_LOCK else f"partition {key}"
                reason = (f"{what} went to another worker while this one's connection to PostgreSQL was broken; "
                          "stopping without writing (start it again: it rejoins with a fresh share)")
                self.lost = reason
                self.journal.abandon(reason)  # nothing more is written: what it holds may be stale
                self._fatal(reason)
                raise LostLock(reason)
        if keys:
            log.warning("cluster: reconnected to PostgreSQL; kept %d partition lock(s)%s", len(self.held),
                        " and the coordinator's" if self.coordinator else "")

    # -- rounds --------------------------------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="ota-membership")
        self._beat_task = loop.create_task(self._beat(), name="ota-heartbeat")

    async def _beat(self) -> None:
        """The heartbeat between rounds too: a round waits for the journal (locks, a partition's
        load or release), which a busy fleet makes slow; this worker must not look dead meanwhile."""
        loop = asyncio.get_running_loop()
        while not self._stopping:
            await asyncio.sleep(ROUND_SECONDS)
            if loop.time() - self._last_beat < ROUND_SECONDS:
                continue
            try:
                await self._heartbeat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001  (the round reports PostgreSQL's trouble)
                log.debug("cluster: heartbeat failed (%r)", exc)

    def nudge(self) -> None:
        """Run a round now (a worker joined or left)."""
        self._changed.set()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("cluster: PostgreSQL round failed (%r); trying again", exc)
            except LostLock:
                return
            except Exception:
                log.exception("cluster: membership round failed")
            try:
                await asyncio.wait_for(self._changed.wait(), ROUND_SECONDS)
            except TimeoutError:
                pass
            self._changed.clear()

    async def round(self) -> None:
        """One round: heartbeat, then release or take to reach this worker's share, then try to
        become the coordinator if there is none."""
        try:
            # The heartbeat first, on its own connection: a busy journal must not make this
            # worker look dead. Then the journal's connection, which relocks if it reconnected.
            live = await self._heartbeat()
            await self.journal.maintain(lambda conn: conn.fetchval("SELECT 1"), write=False)
        except BaseException:
            self._healthy_since = None
            raise
        now = asyncio.get_running_loop().time()
        if self._healthy_since is None:
            self._healthy_since = now
        wanted = share(self.partitions, live, self.id)
        while len(self.held) > wanted and not self._stopping:
            await self.release(min(self.held, key=lambda p: preference(self.id, p)))  # the least wanted
        # Back from an outage of PostgreSQL, the others' rows look dead until they beat again:
        # take nothing new before they had the time to (they keep what they held).
        settled = now - self._healthy_since >= DEAD_AFTER + ROUND_SECONDS or self._first_round
        self._first_round = False
        if len(self.held) < wanted and settled:
            claimed = {p for url_p in self._claimed_by_others(live) for p in url_p}
            free = sorted((p for p in range(self.partitions) if p not in self.held and p not in claimed),
                          key=lambda p: -preference(self.id, p))
            for partition in free:
                if len(self.held) >= wanted or self._stopping:
                    break
                if await self._lock(partition):
                    await self._hold(partition)
        # Not while a live row says another coordinates, as for partitions: its lock is free for a
        # moment when its journal's connection breaks, and taking it then stops that worker.
        if not self.coordinator and self.coordinator_url is None and not self._stopping \
                and await self._lock(COORDINATOR_LOCK):
            self.coordinator = True
            log.info("cluster: this worker (%s) is the coordinator", self.id)
            await self._heartbeat()
            await self._coordinate()

    async def _hold(self, partition: int) -> None:
        # In this worker's row before its devices are given anything: a device pushed at the
        # take downloads at once, through whichever worker nginx picks, which must route it here
        # (until the row says so, the others send it to the last holder, or answer "moving").
        self.held.add(partition)
        try:
            await self._quiet_heartbeat()  # a beat that fails does not stop the take: the next lists it
            await self._take(partition)
        except BaseException:
            self.held.discard(partition)
            await self._unlock(partition)
            raise
        self.moves += 1
        log.info("cluster: took partition %d (now %d: %s)", partition, len(self.held), sorted(self.held))

    async def release(self, partition: int) -> None:
        await self._release(partition)
        self.held.discard(partition)
        await self._unlock(partition)
        self.moves += 1
        await self._heartbeat()
        log.info("cluster: released partition %d (now %d: %s)", partition, len(self.held), sorted(self.held))

    def _claimed_by_others(self, live: list[str]) -> list[list[int]]:
        return [list(parts) for worker, parts in self._rows.items() if worker != self.id and worker in live]

    async def _heartbeat(self) -> list[str]:
        """Write this worker's row; read the live ones (their partitions, the coordinator).
        Within BEAT_TIMEOUT: a connection PostgreSQL stopped answering on (half-open, a stuck
        backend) would otherwise hold every round, and this worker's routes, for good."""
        async with asyncio.timeout(BEAT_TIMEOUT), self.pool.acquire() as conn:
            try:
                await conn.execute(
                    f"INSERT INTO ota_workers (id, url, started_at, seen_at, partitions, coordinator) "
                    f"VALUES ($1, $2, {NOW}, {NOW}, $3, $4) ON CONFLICT (id) DO UPDATE SET seen_at = {NOW}, "
                    "partitions = excluded.partitions, coordinator = excluded.coordinator",
                    self.id, self.url, sorted(self.held), self.coordinator)
                # Rows seen within ROUTE_AFTER: where requests go (the holder's lock is the truth: a
                # dead one's requests fail fast); within DEAD_AFTER: who shares the partitions.
                rows = await conn.fetch(f"SELECT id, url, partitions, coordinator, seen_at > {NOW} - $1 AS live "
                                        f"FROM ota_workers WHERE seen_at > {NOW} - $2 ORDER BY seen_at", DEAD_AFTER,
                                        ROUTE_AFTER)
                await conn.execute(f"DELETE FROM ota_workers WHERE seen_at < {NOW} - $1", FORGET_AFTER)
            except asyncio.CancelledError:
                conn.terminate()  # a statement cut short: the pool connects anew for the next beat
                raise
        self._last_beat = asyncio.get_running_loop().time()
        self.holders = {p: row["url"] for row in rows for p in row["partitions"]}  # the latest row wins
        rows = sorted((row for row in rows if row["live"]), key=lambda row: row["id"])
        self._rows = {row["id"]: row["partitions"] for row in rows}
        coordinators = [row["url"] for row in rows if row["coordinator"]]
        self.coordinator_url = self.url if self.coordinator else (coordinators[0] if coordinators else None)
        self.live_workers = [row["id"] for row in rows]
        self._urls = [row["url"] for row in rows]
        return self.live_workers

    async def refresh(self) -> None:
        """Beat and read the rows now rather than at the next half second (routes, coordinator).
        Callers at the same moment share one read; one within REFRESH_SECONDS of the last is enough."""
        if asyncio.get_running_loop().time() - self._last_beat < REFRESH_SECONDS:
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._quiet_heartbeat())
        try:  # a PostgreSQL that does not answer must not hold the request (nor the next ones)
            await asyncio.wait_for(asyncio.shield(self._refreshing), REFRESH_WAIT)
        except TimeoutError:
            log.debug("cluster: reading the workers' rows took over %g s; routes as they were", REFRESH_WAIT)

    async def _quiet_heartbeat(self) -> None:
        try:
            await self._heartbeat()
        except Exception as exc:  # noqa: BLE001  (the routes stay as they were; the round reports PostgreSQL's trouble)
            log.debug("cluster: reading the workers' rows failed (%r)", exc)

    def worker_urls(self) -> list[str]:
        """Every live worker's HTTP URL (this one's first)."""
        return [self.url, *sorted({url for url in self._urls if url != self.url})]

    async def stop(self) -> None:
        """Release every partition (the others take them at once), then the coordinator's lock;
        after a lost lock, or with the journal unable to write, nothing is released (its
        commits would never come): the connection's end frees the locks."""
        self._stopping = True
        tasks = [task for task in (self._task, self._beat_task, self._refreshing) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.lost is not None or self.journal.abandoned is not None or self.journal.trouble() is not None:
            log.warning("cluster: stopping without releasing partitions cleanly (%s); the other workers take them "
                        "once this one's connection is gone", self.lost or self.journal.trouble())
            return
        for partition in sorted(self.held):
            try:
                await self.release(partition)
            except Exception as exc:  # noqa: BLE001  (the database may be gone: the locks go with the connection)
                log.warning("cluster: could not release partition %d cleanly: %r", partition, exc)
                break
        try:
            async with self.pool.acquire() as conn:
                await conn.execute("DELETE FROM ota_workers WHERE id = $1", self.id)
        except Exception:  # noqa: BLE001
            pass
