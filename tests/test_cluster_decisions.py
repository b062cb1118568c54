"""Several workers' decisions as plain function calls (no RabbitMQ, no PostgreSQL): a
coordinator and a follower, each holding some devices, the follower taking the coordinator's
shared rows and catalog as cluster_worker/fleet_share.py hands them over
(otacore/decisions/follow.py); the partition shares of cluster_worker/membership.py; and a
FleetState forgetting a partition's devices."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from cluster_worker.membership import share
from otacore.catalog.loading import prepare_catalog
from otacore.decisions import admin, batches, follow, reports, ticks
from otacore.errors import Refused
from otacore.fleet.id_blocks import IdBlocks
from otacore.fleet.batches import BatchState
from otacore.fleet.jobs import JobState
from support.harness import OtaServer, write_catalog
from support.world import BASE, MODULE, World, dev

UP = "- {name: up, package: fw-1.1.0, mode: dynamic, push: true}\n"


@pytest.mark.parametrize("partitions", [1, 7, 8, 64])
@pytest.mark.parametrize("workers", [1, 2, 3, 5])
def test_every_partition_has_one_share_and_shares_differ_by_at_most_one(partitions: int, workers: int) -> None:
    live = [f"w{i}" for i in range(workers)]
    shares = [share(partitions, live, worker) for worker in live]
    assert sum(shares) == partitions
    assert max(shares) - min(shares) <= 1
    assert share(partitions, live[:-1], live[-1]) == share(partitions, live, live[-1])  # not yet in the rows


def _follower(root: Path, batches_yaml: str, online: set[str]) -> World:
    """A World whose LiveFleet follows: it never decides for batches."""
    world = World(root, "")
    world.live.decides_batches = False
    world.online = online
    write_catalog(root, batches_yaml, base=BASE)
    loaded = prepare_catalog(world.settings)
    world.step(follow.follow_catalog, world.live, loaded.catalog, loaded.files)
    return world


def _share(coordinator: World, follower: World) -> list:
    step = follower.step(follow.follow_rows, follower.live, copy.deepcopy(coordinator.state.batches),
                         dict(coordinator.state.package_status),
                         {k: set(v) for k, v in coordinator.state.targets.items()})
    return step.sends


def test_a_batch_the_coordinator_starts_gives_the_followers_devices_their_jobs(tmp_path: Path) -> None:
    coordinator = World(tmp_path / "c", "")
    follower = _follower(tmp_path / "f", "", {"f-1"})
    follower.report("f-1", "1.0.0")
    follower.report("f-2", "1.0.0")  # offline: queued, pushed at its next report
    coordinator.reload(UP)
    assert coordinator.state.batches["up"].state == BatchState.RUNNING
    assert follower.job("f-1") is None  # nothing until the rows and the catalog reach it
    assert _share(coordinator, follower) == []  # rows first: the batch is not in its catalog yet
    write_catalog(tmp_path / "f", UP, base=BASE)
    loaded = prepare_catalog(follower.settings)
    follower.step(follow.follow_catalog, follower.live, loaded.catalog, loaded.files)
    sends = _share(coordinator, follower)
    assert [send.device for send in sends] == [dev("f-1")]
    assert follower.job("f-1").state == JobState.NOTIFIED and follower.job("f-2").state == JobState.QUEUED
    assert follower.state.changes.batches == set()  # a follower never writes batch rows
    assert _share(coordinator, follower) == []  # the same rows again: nothing more


def test_a_batch_the_coordinator_ends_cancels_the_followers_open_jobs(tmp_path: Path) -> None:
    coordinator = World(tmp_path / "c", UP)
    follower = _follower(tmp_path / "f", UP, {"f-1"})
    _share(coordinator, follower)
    follower.report("f-1", "1.0.0")
    assert follower.job("f-1").state == JobState.NOTIFIED
    coordinator.reload("")  # the batch leaves the catalog: canceled
    assert coordinator.state.batches["up"].state == BatchState.CANCELED
    write_catalog(tmp_path / "f", "", base=BASE)
    loaded = prepare_catalog(follower.settings)
    follower.step(follow.follow_catalog, follower.live, loaded.catalog, loaded.files)
    _share(coordinator, follower)
    assert follower.job("f-1").state == JobState.CANCELED


def test_a_follower_decides_no_batch_rule_and_acts_on_the_coordinators(tmp_path: Path) -> None:
    policy = UP.rstrip().rstrip("}") + ", abort: {failure_percent: 50, min_finished: 1}}\n"
    coordinator = World(tmp_path / "c", policy)
    follower = _follower(tmp_path / "f", policy, {"f-1", "f-2"})
    _share(coordinator, follower)
    follower.report("f-1", "1.0.0")
    follower.progress("f-1", -2, "download failed")
    batch = follower.live.catalog.batches["up"]
    follower.step(ticks.rollout_tick, follower.live)
    assert not follower.state.batches["up"].control.get("paused")  # only the coordinator halts
    coordinator.state.set_control("up", {"paused": True, "by": "abort", "reason": "1 of 1 failed"})
    _share(coordinator, follower)
    follower.report("f-2", "1.0.0")
    assert follower.job("f-2") is None  # halted: no new job, as in one process
    assert follower.live.rollout.blocked(batch, follower.now).kind == "halted"


def test_admin_cancel_and_retry_act_only_for_the_devices_a_worker_holds(tmp_path: Path) -> None:
    follower = _follower(tmp_path / "f", UP, {"f-1", "g-1"})
    _share(World(tmp_path / "c", UP), follower)
    follower.live.holds = lambda device: device.device_name.startswith("f-")
    follower.report("f-1", "1.0.0")
    follower.report("g-1", "1.0.0")  # (held elsewhere in a real cluster: here to show it is left alone)
    count, _ = admin.cancel_devices(follower.live, "up", ["f-1", "g-1", "f-9"])
    assert count == 2  # f-1's open job and a placeholder for f-9; g-1 is another worker's
    assert follower.job("g-1").state == JobState.NOTIFIED


def test_a_partition_that_leaves_takes_its_devices_and_every_index_with_it(tmp_path: Path) -> None:
    world = World(tmp_path, UP)
    world.online = {"a-1", "b-1"}
    for name in ("a-1", "b-1", "b-2"):
        world.report(name, "1.0.0")
    world.progress("b-1", 100)
    world.state.take_changes()
    assert world.state.drop_devices(lambda device: device.device_name.startswith("b-")) == 2
    assert set(world.state.reported_versions(dev("a-1").product_key, MODULE)) == {"a-1"}
    assert world.counts("up") == {JobState.NOTIFIED: 1}
    assert [job.device for job in world.state.batch_open_jobs("up")] == [dev("a-1")]
    state = world.state
    left = {dev("a-1")}
    assert {job.device for job in state.jobs.values()} == left
    assert {device for device, _ in state.open_jobs} == {device for device, _ in state.latest_jobs} == left
    assert set(state.current["up"]) == set(state.latest_in_batch["up"]) == left
    assert {device for _, device in state.job_counts} == left
    # Back again (the partition returned, its state loaded): a report decides as for any device.
    reports.report_version(world.live, dev("b-2"), MODULE, "1.0.0", deliver=True)
    assert world.job("b-2") is not None


def test_job_ids_come_from_reserved_blocks_in_order(tmp_path: Path) -> None:
    world = World(tmp_path, UP)
    world.state.job_ids = IdBlocks("job ids")
    world.state.job_ids.add(range(100, 102))
    world.state.job_ids.add(range(500, 501))
    for name in ("a-1", "a-2", "a-3"):  # (not World.report: its invariants count ids from 1)
        reports.report_version(world.live, dev(name), MODULE, "1.0.0", deliver=True)
    assert [world.job(name).id for name in ("a-1", "a-2", "a-3")] == [100, 101, 500]
    with pytest.raises(RuntimeError, match="no job ids reserved"):
        reports.report_version(world.live, dev("a-4"), MODULE, "1.0.0", deliver=True)


async def test_a_worker_that_does_not_coordinate_refuses_batch_decisions(tmp_path: Path) -> None:
    """The engine's backstop: the HTTP side sends these to the coordinator."""
    from support.harness import OtaServer  # noqa: PLC0415
    server = OtaServer(tmp_path)
    write_catalog(tmp_path, UP)
    await server.start()
    try:
        engine = server.engine
        engine.live.decides_batches = False
        for action in (engine.reload(), engine.pause("up"), engine.resume("up")):
            with pytest.raises(Refused, match="coordinator"):
                await action
    finally:
        await server.stop()
    assert batches  # (imported for the reader: where the coordinator's side lives)


VERIFY = ("- {name: v, package: fw-2.0.0, type: verify, devices: [c1, f1], push: true}\n"
          "- {name: up2, package: fw-2.0.0, mode: dynamic, push: true}\n")


def test_a_verification_over_two_workers_gates_the_upgrade_on_both(tmp_path: Path) -> None:
    """The verify batch's devices are held by two workers; the coordinator decides from the
    whole fleet's jobs (what PostgreSQL holds: here both workers' memory), and the follower's
    devices get the verified upgrade once it takes the rows."""
    from cluster_worker.fleet_sync import SharedFigures  # noqa: PLC0415
    coordinator = World(tmp_path / "c")
    coordinator.online = {"c1", "c9"}
    follower = _follower(tmp_path / "f", "", {"f1", "f9"})
    for world, names in ((coordinator, ("c1", "c9")), (follower, ("f1", "f9"))):
        for name in names:
            world.report(name, "1.0.0")
    coordinator.reload(VERIFY)
    assert coordinator.state.batches["up2"].state == BatchState.WAITING_VERIFICATION
    write_catalog(tmp_path / "f", VERIFY, base=BASE)
    loaded = prepare_catalog(follower.settings)
    follower.step(follow.follow_catalog, follower.live, loaded.catalog, loaded.files)
    _share(coordinator, follower)
    assert follower.job("f1").batch == "v" and follower.job("f9") is None  # waiting: no upgrade yet

    def whole_fleet() -> SharedFigures:
        jobs = [*coordinator.state.latest_in_batch.get("v", {}).values(),
                *follower.state.latest_in_batch.get("v", {}).values()]
        return SharedFigures({"v": jobs})

    coordinator.report("c1", "2.0.0")
    coordinator.live.rollout.figures = whole_fleet()
    coordinator.step(ticks.rollout_tick, coordinator.live)
    assert coordinator.state.batches["v"].state == BatchState.RUNNING  # f1 has not upgraded yet
    follower.report("f1", "2.0.0")
    coordinator.live.rollout.figures = whole_fleet()
    coordinator.step(ticks.rollout_tick, coordinator.live)
    assert coordinator.state.package_status["fw-2.0.0"][0] == "verified"
    assert coordinator.state.batches["up2"].state == BatchState.RUNNING
    assert coordinator.job("c9").batch == "up2"
    sends = _share(coordinator, follower)
    assert follower.job("f9").batch == "up2" and [send.device for send in sends] == [dev("f9")]


async def test_a_progress_report_for_a_device_whose_partition_left_is_refused_not_dropped(tmp_path: Path) -> None:
    """An HTTP progress report whose body came in while the device's partition moved: the old
    holder answered 200 and dropped it (no job in its memory any more); now 503, to ask again."""
    server = OtaServer(tmp_path)
    write_catalog(tmp_path, UP)
    await server.start()
    try:
        server.engine.live.holds = lambda device: False
        with pytest.raises(Refused, match="moving") as refused:
            await server.engine.on_progress(dev("c1"), MODULE, -1, "flash failed")
        assert refused.value.status == 503
    finally:
        await server.stop()
