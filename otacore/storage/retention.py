"""Retention: which finished history may leave the database, and removing it in small steps.

A job may go when its batch left the catalog and ended more than the retention period ago,
the job is final, and it is not its device's latest job for its module (decisions and
device pages start from that one, and it stays in memory). Its history events go with it.
Batch rows stay: a removed batch's name stays spent (otacore/catalog/reload_rules.py).

Synchronous sqlite3 on the journal's own connection (Journal.maintain runs each call in a
transaction between two commits), a few thousand jobs per step so devices' commits never
wait long.
"""
from __future__ import annotations

import sqlite3

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


def prunable(db: sqlite3.Connection, keep_batches: set[str], before: float) -> dict[str, int]:
    """batch -> how many of its jobs would go (batches ended before `before`, not kept)."""
    where, names = _candidates(keep_batches)
    rows = db.execute(f"SELECT b.name, COUNT(*) FROM jobs j JOIN batches b ON b.name = j.batch WHERE {where} "
                      "GROUP BY b.name ORDER BY b.name", [before, *names]).fetchall()
    return {name: count for name, count in rows}


def prune_step(db: sqlite3.Connection, keep_batches: set[str], before: float, limit: int = CHUNK_JOBS) -> int:
    """Delete up to `limit` prunable jobs and their events (inside the caller's transaction:
    Journal.maintain); how many went."""
    where, names = _candidates(keep_batches)
    ids = [row[0] for row in db.execute(
        f"SELECT j.id FROM jobs j JOIN batches b ON b.name = j.batch WHERE {where} LIMIT ?", [before, *names, limit])]
    if ids:
        marks = ", ".join("?" for _ in ids)
        db.execute(f"DELETE FROM job_events WHERE job_id IN ({marks})", ids)
        db.execute(f"DELETE FROM jobs WHERE id IN ({marks})", ids)
    return len(ids)
