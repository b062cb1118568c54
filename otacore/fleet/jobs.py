"""A job: one device, module and batch. Its states and the one table of legal moves between them.

`queued` (targeted, not told) -> `notified` (pushed or handed out) -> `in_progress` -> `installed`
-> `succeeded`; any open state -> `failed` or `canceled`. A move to the state a job is already
in updates it in place (a new progress, a new file after the device reported another version).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from otacore.protocol.credentials import DeviceId


class JobState(StrEnum):
    QUEUED = "queued"
    NOTIFIED = "notified"
    IN_PROGRESS = "in_progress"
    INSTALLED = "installed"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


Q, N, P, I, S, F, C = (JobState.QUEUED, JobState.NOTIFIED, JobState.IN_PROGRESS, JobState.INSTALLED,
                       JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED)

OPEN_STATES = frozenset({Q, N, P, I})
FINAL_STATES = frozenset({S, F, C})
ALL_STATES: tuple[JobState, ...] = (Q, N, P, I, S, F, C)

# Every legal move, and nothing else. Final states are final, with two exceptions that keep
# history honest: a failed job whose device then reports the target version did upgrade
# (failed -> succeeded), and failed/canceled jobs may be marked superseded in place
# (an admin retry, or the device left the batch's versions).
LEGAL_MOVES: dict[JobState, frozenset[JobState]] = {
    Q: frozenset({Q, N, P, I, S, F, C}),
    N: frozenset({N, P, I, S, F, C}),
    P: frozenset({P, I, S, F, C}),
    I: frozenset({I, S, F, C}),
    S: frozenset(),
    F: frozenset({F, S}),
    C: frozenset({C}),
}


class IllegalMove(RuntimeError):
    """A decision tried a move the table does not allow: a bug, never a device's doing."""


def check_move(job_id: int, old: JobState, new: JobState) -> None:
    if new not in LEGAL_MOVES[old]:
        raise IllegalMove(f"job {job_id}: {old} -> {new} is not a legal move")


@dataclass(slots=True, eq=False)
class Job:
    """The live record of a job; memory is the truth, the journal writes it down."""

    id: int
    batch: str
    device: DeviceId
    module: str
    package_id: str
    from_version: str
    target_version: str
    state: JobState
    progress: int
    code: int | None
    message: str
    file_key: str
    file_size: int
    bytes_served: int
    created_at: float
    updated_at: float
    superseded: int = 0  # 1: a later job of the same batch may replace this one

    @property
    def is_open(self) -> bool:
        return self.state in OPEN_STATES

    @property
    def served_percent(self) -> int:
        return min(100, self.bytes_served * 100 // self.file_size) if self.file_size else 0


@dataclass(frozen=True)
class NewJob:
    """A job about to be created: who, what, and the file it will download."""

    device: DeviceId
    module: str
    package_id: str
    from_version: str
    target_version: str
    file_key: str
    file_size: int
    state: JobState = JobState.QUEUED
