"""The job lifecycle's table of legal moves (otacore/fleet/jobs.py), checked pair by pair against the
lifecycle as docs/operations.md and the module docstring describe it."""
from __future__ import annotations

import itertools

import pytest

from otacore.protocol.credentials import DeviceId
from otacore.fleet.state import FleetState
from otacore.fleet.jobs import (ALL_STATES, FINAL_STATES, LEGAL_MOVES, OPEN_STATES, IllegalMove, Job, JobState, NewJob,
                          check_move)

Q, N, P, I, S, F, C = (JobState.QUEUED, JobState.NOTIFIED, JobState.IN_PROGRESS, JobState.INSTALLED,
                       JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED)

# The lifecycle, written out independently of the table: open states only move forward
# (queued -> notified -> in_progress -> installed), any open state may end (succeeded,
# failed, canceled), an open state may be updated in place; final states are final except
# failed -> succeeded (the device did upgrade) and failed/canceled updated in place (marked
# superseded). A succeeded job never moves, not even in place.
_ORDER = [Q, N, P, I]
EXPECTED: set[tuple[JobState, JobState]] = set()
for _i, _old in enumerate(_ORDER):
    EXPECTED |= {(_old, _new) for _new in _ORDER[_i:]}  # forward or in place
    EXPECTED |= {(_old, S), (_old, F), (_old, C)}
EXPECTED |= {(F, F), (F, S), (C, C)}

ALL_PAIRS = list(itertools.product(ALL_STATES, ALL_STATES))


def test_seven_states_49_pairs_and_a_row_for_each() -> None:
    assert len(ALL_STATES) == 7 and set(ALL_STATES) == set(JobState)
    assert len(ALL_PAIRS) == 49
    assert set(LEGAL_MOVES) == set(JobState)
    assert OPEN_STATES | FINAL_STATES == set(JobState) and not OPEN_STATES & FINAL_STATES
    assert OPEN_STATES == {Q, N, P, I} and FINAL_STATES == {S, F, C}
    # 4 forward-or-in-place from Q, 3 from N, 2 from P, 1 from I; 3 endings from each open state.
    assert len(EXPECTED) == (4 + 3 + 2 + 1) + 4 * 3 + 3 == 25


@pytest.mark.parametrize(("old", "new"), ALL_PAIRS, ids=[f"{o}->{n}" for o, n in ALL_PAIRS])
def test_every_pair(old: JobState, new: JobState) -> None:
    legal = (old, new) in EXPECTED
    assert (new in LEGAL_MOVES[old]) is legal
    if legal:
        check_move(7, old, new)  # no exception
    else:
        with pytest.raises(IllegalMove, match=f"job 7: {old} -> {new} is not a legal move"):
            check_move(7, old, new)


def test_table_is_the_lifecycle() -> None:
    table = {(old, new) for old, targets in LEGAL_MOVES.items() for new in targets}
    assert table == EXPECTED


def test_final_states_have_no_way_back() -> None:
    for final in FINAL_STATES:
        assert not LEGAL_MOVES[final] & OPEN_STATES, f"{final} may reopen"
    assert LEGAL_MOVES[S] == frozenset()
    assert LEGAL_MOVES[F] == {F, S}  # late success, or superseded in place
    assert LEGAL_MOVES[C] == {C}  # superseded in place only
    assert S not in LEGAL_MOVES[C]  # a canceled job never turns into a success


def test_queued_reaches_every_state_and_open_states_only_go_forward() -> None:
    assert LEGAL_MOVES[Q] == set(ALL_STATES)
    for i, old in enumerate(_ORDER):
        assert {S, F, C} <= LEGAL_MOVES[old]
        assert old in LEGAL_MOVES[old]  # update in place (progress, new file)
        for earlier in _ORDER[:i]:
            assert earlier not in LEGAL_MOVES[old], f"{old} -> {earlier} goes back"


def test_every_state_is_reachable_from_queued_by_legal_steps() -> None:
    seen, todo = {Q}, [Q]
    while todo:
        for new in LEGAL_MOVES[todo.pop()]:
            if new not in seen:
                seen.add(new)
                todo.append(new)
    assert seen == set(ALL_STATES)


def test_fleet_state_move_refuses_an_illegal_move_and_changes_nothing() -> None:
    state = FleetState()
    device = DeviceId("pk", "d1")
    job = state.create_job("b", NewJob(device, "default", "p", "1.0.0", "1.1.0", "p", 10), "test", 1.0)
    assert job is not None
    state.move(job, S, "done", 2.0, progress=100)
    state.take_changes()
    for new in ALL_STATES:
        with pytest.raises(IllegalMove):
            state.move(job, new, "again", 3.0, progress=5)
    assert job.state == S and job.progress == 100 and job.updated_at == 2.0
    assert not state.changes
    assert state.counts["b"][S] == 1 and sum(state.counts["b"].values()) == 1


def test_job_properties() -> None:
    job = Job(1, "b", DeviceId("pk", "d"), "default", "p", "1.0.0", "1.1.0", N, 0, None, "", "p", 200, 0, 1.0, 1.0)
    assert job.is_open and job.superseded == 0
    assert job.served_percent == 0
    job.bytes_served = 50
    assert job.served_percent == 25
    job.bytes_served = 500  # a client fetched the file twice: still 100 %
    assert job.served_percent == 100
    job.file_size = 0
    assert job.served_percent == 0
    for state in ALL_STATES:
        job.state = state
        assert job.is_open is (state in {Q, N, P, I})
