"""Reads of the journal on PostgreSQL (cluster mode) for admins and `otactl`: `PgStore` has
`Store`'s public methods and answers, over an asyncpg pool. It runs Store's own SQL text
(`?` parameters translated by postgres_schema.pg_sql), so the two never drift apart.
"""
from __future__ import annotations

from typing import Any

import asyncpg

from otacore.storage.postgres_backend import has_schema, no_journal, unusable
from otacore.storage.postgres_schema import pg_sql
from otacore.storage.store import Store


class PgStore(Store):
    """Open with `await PgStore.open(dsn)`; `close()` when done."""

    def __init__(self, pool: asyncpg.Pool) -> None:  # noqa: D107  (not Store's connection)
        self._pool = pool

    @classmethod
    async def open(cls, dsn: str, *, max_size: int = 4) -> "PgStore":  # type: ignore[override]
        """A pool on PostgreSQL at `dsn`; StoreError when it cannot be used or holds no journal
        (a worker makes the schema: this only reads)."""
        try:
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=max_size, timeout=10,
                                             command_timeout=60)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise unusable(dsn, exc) from None
        try:
            async with pool.acquire() as conn:
                if not await has_schema(conn):
                    raise no_journal(dsn)
        except BaseException:
            await pool.close()
            raise
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    async def _rows(self, sql: str, args: Any = ()) -> list[Any]:
        return list(await self._pool.fetch(pg_sql(sql), *args))

    async def _row(self, sql: str, args: Any = ()) -> Any:
        return await self._pool.fetchrow(pg_sql(sql), *args)

    @staticmethod
    def _limit(limit: int) -> int | None:
        return None if limit < 0 else limit  # LIMIT NULL: all


__all__ = ["PgStore"]
