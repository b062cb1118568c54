"""Faults of the disk under a running journal: its database connection made to refuse
writes (a full disk) between two of its writes."""
from __future__ import annotations

import asyncio

from otacore.storage.journal import Journal


def refuse_writes(journal: Journal, refuse: bool) -> None:
    """As tests/test_journal.py does: the journal's own connection turned read-only. Called
    between two writes (never while its worker thread holds the connection)."""
    assert not journal._writing
    journal.backend.db.execute(f"PRAGMA query_only={'ON' if refuse else 'OFF'}")


async def idle(journal: Journal) -> Journal:
    """The journal, once its worker thread is between two writes."""
    while journal._writing:
        await asyncio.sleep(0.005)
    return journal
