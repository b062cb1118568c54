"""`rate_per_minute` across workers: starts granted by PostgreSQL (fleet/rollout.py RateBudget).

Before each rollout tick (and when its jobs wait) a worker asks for as many starts as it has
queued jobs, and PostgreSQL grants what the batch has left: under a per-batch transaction
lock it sums the grants of the last WINDOW seconds and records the new one with its own
clock. A grant is spent within LEASE seconds or lapses, so any 60 s window of real starts
falls within WINDOW = 60 + LEASE (and a margin) of grants: the rate holds across the fleet
whichever worker starts what, and a worker that dies takes only unspent grants with it (the
batch runs a little under its rate for a minute, never over).
"""
from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable

import asyncpg

from otacore.catalog.model import Batch

from .membership import LOCK_SPACE, NOW

log = logging.getLogger("ota.cluster")

LEASE = 2.0  # seconds a grant may be spent in
WINDOW = 60.0 + LEASE + 1.0  # seconds of grants a new one is counted against


class GrantedRate:
    """A RateBudget whose starts PostgreSQL grants; `refill` before ticks, spending is local."""

    def __init__(self, pool: asyncpg.Pool, clock: Callable[[], float] = time.monotonic) -> None:
        self._pool = pool
        self._clock = clock
        self._tokens: dict[str, tuple[int, float]] = {}  # batch -> (starts left, lapse time)
        self.granted = 0

    def left(self, batch: Batch, now: float) -> int:
        tokens, lapses = self._tokens.get(batch.name, (0, 0.0))
        return tokens if self._clock() < lapses else 0

    def spend(self, batch: Batch, now: float) -> None:
        tokens, lapses = self._tokens.get(batch.name, (0, 0.0))
        self._tokens[batch.name] = (max(0, tokens - 1), lapses)

    async def refill(self, wanted: list[tuple[Batch, int]]) -> None:
        """Ask for the starts this worker's queued jobs want (OtaEngine.starts_wanted), batch by batch."""
        for batch, count in wanted:
            rate = batch.policy.rate_per_minute
            if rate is not None and count > self.left(batch, 0):
                await self._ask(batch, rate, count)

    async def _ask(self, batch: Batch, rate: int, wanted: int) -> None:
        asked_at = self._clock()
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_SPACE + 1,
                               zlib.crc32(batch.name.encode()) - (1 << 31))
            used = await conn.fetchval(f"SELECT coalesce(sum(n), 0) FROM ota_rate_grants WHERE batch = $1 AND "
                                       f"at > {NOW} - $2", batch.name, WINDOW)
            grant = min(wanted, rate - int(used))
            if grant <= 0:
                return
            await conn.execute(f"INSERT INTO ota_rate_grants (batch, at, n) VALUES ($1, {NOW}, $2)", batch.name, grant)
            await conn.execute(f"DELETE FROM ota_rate_grants WHERE batch = $1 AND at < {NOW} - $2", batch.name,
                               2 * WINDOW)
        # What is left of an earlier grant lapses now: spent later, it could fall outside
        # the window its grant was counted in.
        self._tokens[batch.name] = (grant, asked_at + LEASE)
        self.granted += grant
