"""A batch's run-time state and the one table of legal moves between them.

`waiting_verification` (its package must pass a verify batch first) -> `running` -> `completed`
(a verify batch decided its package) or `canceled` (removed from the catalog). A batch
removed after it completed stays `completed`, marked removed in its control. A move to the
state a batch is already in updates its reason in place (a reload while it waits).
"""
from __future__ import annotations

from enum import StrEnum


class BatchState(StrEnum):
    WAITING_VERIFICATION = "waiting_verification"
    RUNNING = "running"
    COMPLETED = "completed"
    CANCELED = "canceled"


W, R, D, C = BatchState.WAITING_VERIFICATION, BatchState.RUNNING, BatchState.COMPLETED, BatchState.CANCELED

ENDED_STATES = frozenset({D, C})
# A batch in these states takes admin pauses and resumes.
CONTROLLABLE_STATES = frozenset({R, W})

# Where a new batch may begin, and every legal move after that, and nothing else.
FIRST_STATES = frozenset({W, R})
LEGAL_MOVES: dict[BatchState, frozenset[BatchState]] = {
    W: frozenset({W, R, C}),
    R: frozenset({R, D, C}),
    D: frozenset({D}),
    C: frozenset({C}),
}


class IllegalBatchMove(RuntimeError):
    """A decision tried a move the table does not allow: a bug, never an admin's doing."""


def check_batch_move(name: str, old: BatchState | None, new: BatchState) -> None:
    allowed = FIRST_STATES if old is None else LEGAL_MOVES[old]
    if new not in allowed:
        raise IllegalBatchMove(f"batch {name}: {old or 'new'} -> {new} is not a legal move")
