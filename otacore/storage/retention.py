"""Retention: which finished history may leave the database, and removing it in small steps.

A job may go when its batch left the catalog and ended more than the retention period ago,
the job is final, and it is not its device's latest job for its module (decisions and
device pages start from that one, and it stays in memory). Its history events go with it.
Batch rows stay: a removed batch's name stays spent (otacore/catalog/reload_rules.py).

On the journal's own connection (Journal.maintain runs each call in a transaction between
two commits), a few thousand jobs per step so devices' commits never wait long. On SQLite
(a sqlite3 connection) each function answers at once; on PostgreSQL (an asyncpg connection,
which the journal's async backend passes) it returns a coroutine that Journal.maintain
awaits inside the transaction: the same call works on both.
"""
from __future__ import annotations

import sqlite3
from collections.abc import Awaitable
from typing import Any

from otacore.storage.postgres_schema import pg_sql
from otacore.storage.store import FINAL_STATES

CHUNK_JOBS = 2000

_FINAL = ", ".join(f"'{state}'" for state in FINAL_STATES)


def _candidates(keep_batches: set[str]) -> tuple[str, list[str]]:
    """The WHERE clause of prunable jobs (jobs aliased `j`, batches `b`), and its parameters
    after the `before` time."""
    keep = ", ".join("?" for _ in keep_batches) or "NULL"
    where = (f"b.ended_at IS NOT NULL AND b.ended_at < ? AND b.name NOT IN ({keep}) AND j.state IN ({_FINAL}) "
             "AND j.id NOT IN (SELECT MAX(id) FROM jobs GROUP BY product_key, device_name, module)")
    return where, sorted(keep_batches)


def _prunable_sql(keep_batches: set[str]) -> tuple[str, list[str]]:
    where, names = _candidates(keep_batches)
    return (f"SELECT b.name, COUNT(*) FROM jobs j JOIN batches b ON b.name = j.batch WHERE {where} "
            "GROUP BY b.name ORDER BY b.name"), names


def _step_sql(keep_batches: set[str]) -> tuple[str, list[str]]:
    where, names = _candidates(keep_batches)
    return f"SELECT j.id FROM jobs j JOIN batches b ON b.name = j.batch WHERE {where} LIMIT ?", names


def prunable(db: Any, keep_batches: set[str], before: float) -> dict[str, int] | Awaitable[dict[str, int]]:
    """batch -> how many of its jobs would go (batches ended before `before`, not kept)."""
    sql, names = _prunable_sql(keep_batches)
    if not isinstance(db, sqlite3.Connection):
        return _prunable_pg(db, sql, [before, *names])
    rows = db.execute(sql, [before, *names]).fetchall()
    return {name: count for name, count in rows}


def prune_step(db: Any, keep_batches: set[str], before: float, limit: int = CHUNK_JOBS) -> int | Awaitable[int]:
    """Delete up to `limit` prunable jobs and their events (inside the caller's transaction:
    Journal.maintain); how many went."""
    sql, names = _step_sql(keep_batches)
    if not isinstance(db, sqlite3.Connection):
        return _prune_step_pg(db, sql, [before, *names, limit])
    ids = [row[0] for row in db.execute(sql, [before, *names, limit])]
    if ids:
        marks = ", ".join("?" for _ in ids)
        db.execute(f"DELETE FROM job_events WHERE job_id IN ({marks})", ids)
        db.execute(f"DELETE FROM jobs WHERE id IN ({marks})", ids)
    return len(ids)


async def _prunable_pg(conn: Any, sql: str, args: list[Any]) -> dict[str, int]:
    return {name: int(count) for name, count in await conn.fetch(pg_sql(sql), *args)}


async def _prune_step_pg(conn: Any, sql: str, args: list[Any]) -> int:
    ids = [row[0] for row in await conn.fetch(pg_sql(sql), *args)]
    if ids:
        await conn.execute("DELETE FROM job_events WHERE job_id = ANY($1::bigint[])", ids)
        await conn.execute("DELETE FROM jobs WHERE id = ANY($1::bigint[])", ids)
    return len(ids)
