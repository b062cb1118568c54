"""Batch states and their move table (otacore/fleet/batches.py), the running set derived from
them, and the pure answers the decisions share: `assignment_for` (what a device gets now),
`may_start` (asking spends no rate), `reload_action` (what a reload does, as `otactl plan`
says it)."""
from __future__ import annotations

from pathlib import Path

import pytest

from otacore.cli.plan import plan_reload
from otacore.decisions import assignment
from otacore.decisions.batches import reload_action
from otacore.fleet.batches import FIRST_STATES, LEGAL_MOVES, BatchState, IllegalBatchMove, check_batch_move
from support.world import T0, World, dev

W, R, D, C = BatchState.WAITING_VERIFICATION, BatchState.RUNNING, BatchState.COMPLETED, BatchState.CANCELED


def test_the_move_table_allows_exactly_the_documented_moves() -> None:
    assert FIRST_STATES == {W, R}
    assert LEGAL_MOVES == {W: {W, R, C}, R: {R, D, C}, D: {D}, C: {C}}
    for old in BatchState:
        for new in BatchState:
            if new in LEGAL_MOVES[old]:
                check_batch_move("b", old, new)
            else:
                with pytest.raises(IllegalBatchMove, match=f"batch b: {old} -> {new}"):
                    check_batch_move("b", old, new)
    with pytest.raises(IllegalBatchMove):
        check_batch_move("b", None, D)  # a batch never begins ended


def test_running_is_derived_from_the_batch_rows(tmp_path: Path) -> None:
    w = World(tmp_path, "- {name: up, package: fw-1.1.0, mode: dynamic, push: true}\n"
                        "- {name: up2, package: fw-2.0.0, mode: dynamic, push: true}\n")
    assert w.live.running == {name for name, row in w.state.batches.items() if row.state == R} == {"up"}
    assert w.state.batches["up2"].state is W
    w.reload("- {name: up2, package: fw-2.0.0, mode: dynamic, push: true}\n")  # up removed: canceled
    assert w.state.batches["up"].state is C and w.live.running == set()
    with pytest.raises(IllegalBatchMove):  # a canceled batch never runs again
        w.state.save_batch("up", "fw-1.1.0", {}, R, "again", T0)
    assert w.state.batches["up"].state is C and w.live.running == set()


def test_assignment_for_answers_without_changing_anything(tmp_path: Path) -> None:
    w = World(tmp_path, "- {name: up, package: fw-1.1.0, mode: dynamic, push: false, rate_per_minute: 1}\n")
    w.state.record_version(dev("d1"), "default", "1.0.0", T0)
    w.state.take_changes()
    promises = w.state.promises
    for _ in range(3):
        batch = assignment.assignment_for(w.live.catalog, w.state, w.live.rollout, dev("d1"), "default", "1.0.0", T0)
        assert batch is not None and batch.name == "up"
    assert w.state.promises == promises and not w.state.take_changes() and not w.state.jobs
    assert w.live.rollout.rate_left(batch, T0) == 1  # asking spent no start


def test_may_start_only_asks_and_handing_out_spends_the_rate(tmp_path: Path) -> None:
    w = World(tmp_path, "- {name: up, package: fw-1.1.0, mode: dynamic, push: false, rate_per_minute: 1}\n")
    w.report("d1", "1.0.0")
    w.report("d2", "1.0.0")
    first, second = w.job("d1"), w.job("d2")
    batch = w.live.catalog.batches["up"]
    assert assignment.may_start(w.live, first, T0) and assignment.may_start(w.live, first, T0)
    assert w.live.rollout.rate_left(batch, T0) == 1
    assert w.offer("d1").result != {}  # told: the one start of this minute is spent
    assert w.live.rollout.rate_left(batch, T0) == 0
    assert not assignment.may_start(w.live, second, T0) and w.offer("d2").result == {}


def test_plan_and_reload_take_the_same_start_or_wait_decision(tmp_path: Path) -> None:
    batches = ("- {name: v, package: fw-2.0.0, type: verify, devices: [d1]}\n"
               "- {name: up2, package: fw-2.0.0, mode: dynamic, push: true}\n"
               "- {name: up, package: fw-1.1.0, mode: dynamic, push: true}\n")
    empty = World(tmp_path / "plan")
    lines = {line.batch: line.action for line in plan_reload(_catalog(tmp_path / "cat", batches), empty.state, {})}
    w = World(tmp_path / "applied", batches)
    applied = {name: row.state for name, row in w.state.batches.items()}
    assert lines == {"v": "start", "up2": "wait", "up": "start"}
    assert applied == {"v": R, "up2": W, "up": R}
    for name, row in w.state.batches.items():
        batch = w.live.catalog.batches[name]
        package = w.live.catalog.packages[batch.package]
        assert reload_action(batch, package, None, w.live.package_status(package)) == row.state
        assert reload_action(batch, package, row, w.live.package_status(package)) in (None, W)


def _catalog(root: Path, batches: str):  # type: ignore[no-untyped-def]
    return World(root, batches).live.catalog
