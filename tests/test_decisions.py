"""The engine's decisions (otacore/decisions/) as plain function calls: no broker, no sockets.

Each test builds a `World` (tests/support/world.py): a real catalog, a fresh FleetState, an
`online` set the test controls and a fake clock; after every decision `World.step` checks
the state's invariants (counts, promises, indexes, legal moves, pushes naming open jobs).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from support.harness import url_job
from support.world import BASE, C, F, I, MODULE, N, P, PUBLIC_URL, Q, S, T0, World, dev, payload
from otacore.protocol.credentials import DeviceId
from otacore.decisions import admin, reports, ticks
from otacore.decisions.live import PUSH_ID_BLOCK, PUSH_ID_MAX, PUSH_IDS
from otacore.errors import Refused

UP = "- {name: up, package: fw-1.1.0, mode: dynamic, push: true}\n"
UP_QUIET = "- {name: up, package: fw-1.1.0, mode: dynamic, push: false}\n"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- apply_catalog -----------------------------------------------------------------------

def test_static_batch_pushes_only_online_devices_and_keeps_its_targets(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.online = {"d1", "d4"}
    for name, version in (("d1", "1.0.0"), ("d2", "1.0.0"), ("d3", "1.1.0")):
        assert w.report(name, version).sends == []
    assert w.state.jobs == {}

    w.now = T0 + 10
    started = w.reload("- {name: up, package: fw-1.1.0, mode: static, push: true}\n")
    assert [s.device for s in started.sends] == [dev("d1")]
    message = payload(started.sends[0])
    assert message["code"] == "1000" and message["message"] == "success"
    data = message["data"]
    assert data["version"] == "1.1.0" and data["size"] == 160_000
    assert data["signMethod"] == "Md5" and data["md5"] == data["sign"] == hashlib.md5(
        (tmp_path / "packages" / "fw-1.1.0.bin").read_bytes()).hexdigest()
    assert data["url"].startswith(f"{PUBLIC_URL}/files/fw-1.1.0/fw-1.1.0.bin?")
    d1, d2 = w.job("d1"), w.job("d2")
    assert d1 is not None and d2 is not None and w.job("d3") is None
    assert (d1.state, d2.state) == (N, Q)
    assert (d1.batch, d1.from_version, d1.target_version, d1.file_key) == ("up", "1.0.0", "1.1.0", "fw-1.1.0")
    assert url_job(data["url"]) == d1.id
    assert [(old, new) for old, new, _ in w.events(d1)] == [(None, "queued"), ("queued", "notified")]
    assert w.state.targets == {"up": {"d1", "d2"}}
    row = w.state.batches["up"]
    assert (row.state, row.started_at, row.package_id) == ("running", T0 + 10, "fw-1.1.0")
    assert w.live.running == {"up"}
    assert w.counts("up") == {"notified": 1, "queued": 1}
    # 2 jobs created + 1 notified + the batch row.
    assert started.promised == 4

    # Static: a device that qualifies only now is not taken.
    assert w.report("d4", "1.0.0").sends == [] and w.job("d4") is None
    # d2 comes online and reports after a boot: it gets its push now.
    w.online.add("d2")
    again = w.report("d2", "1.0.0")
    assert [s.device for s in again.sends] == [dev("d2")]
    assert d2.state == N and w.counts("up") == {"notified": 2}


def test_dynamic_batch_takes_qualifying_devices_at_start_and_later(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.online = {"d1", "d4"}
    for name, version in (("d1", "1.0.0"), ("d2", "0.9.0"), ("d3", "1.1.0"), ("d5", "abc")):
        w.report(name, version)
    started = w.reload(UP)
    assert [s.device for s in started.sends] == [dev("d1")]
    assert {n: w.job(n).state for n in ("d1", "d2")} == {"d1": N, "d2": Q}
    assert w.job("d2").from_version == "0.9.0"
    assert w.job("d3") is None and w.job("d5") is None  # on the target / an unordered version
    assert w.state.targets == {}
    joined = w.report("d4", "1.0.0")
    assert [s.device for s in joined.sends] == [dev("d4")] and w.job("d4").state == N
    assert w.report("d6", "1.1.0").sends == [] and w.job("d6") is None
    assert w.report("d7", "2.5.0").sends == [] and w.job("d7") is None  # newer than the package
    assert w.counts("up") == {"notified": 2, "queued": 1}


def test_push_false_leaves_jobs_queued_even_for_online_devices(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.online = {"d1"}
    w.report("d1", "1.0.0")
    started = w.reload(UP_QUIET)
    assert started.sends == [] and w.job("d1").state == Q
    assert w.report("d1", "1.0.0").sends == [] and w.job("d1").state == Q


def test_batch_of_unverified_package_waits_and_takes_no_one(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.online = {"d1"}
    w.report("d1", "1.0.0")
    batches = ("- {name: up2, package: fw-2.0.0, mode: dynamic, push: true}\n"
               "- {name: up12, package: fw-1.2.0, mode: dynamic, push: true}\n")
    started = w.reload(batches)
    row = w.state.batches["up2"]
    assert (row.state, row.started_at, row.reason) == ("waiting_verification", None, "package not verified yet")
    assert w.live.running == {"up12"}  # a package without verify starts at once
    assert [s.device for s in started.sends] == [dev("d1")] and w.job("d1").batch == "up12"
    w.report("d2", "1.0.0")
    assert w.job("d2").batch == "up12"
    assert w.jobs_of("d1", "up2") == [] and w.jobs_of("d2", "up2") == []
    w.reload(batches)  # still waiting
    assert w.state.batches["up2"].state == "waiting_verification" and "up2" not in w.live.running
    assert w.live.package_status(w.live.catalog.packages["fw-2.0.0"]) == "unverified"


def test_removed_batch_cancels_its_open_jobs(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.online = {"d1", "d3"}
    for name in ("d1", "d2", "d3"):
        w.report(name, "1.0.0")
    w.reload(UP)
    w.report("d3", "1.1.0")
    assert {n: w.job(n).state for n in ("d1", "d2", "d3")} == {"d1": N, "d2": Q, "d3": S}
    w.now = T0 + 60
    removed = w.reload("")
    assert removed.sends == []
    assert {n: w.job(n).state for n in ("d1", "d2", "d3")} == {"d1": C, "d2": C, "d3": S}
    assert w.events(w.job("d1"))[-1] == ("notified", "canceled", "batch removed from the catalog")
    row = w.state.batches["up"]
    assert (row.state, row.ended_at, row.reason) == ("canceled", T0 + 60, "batch removed from the catalog")
    assert w.live.running == set()
    assert w.counts("up") == {"canceled": 2, "succeeded": 1}
    # Nothing targets the device any more.
    assert w.report("d1", "1.0.0").sends == [] and len(w.jobs_of("d1")) == 1
    # Applying the same catalog again changes nothing.
    assert not w.reload("").changes


def test_narrowing_a_batch_device_list_cancels_the_unlisted_open_jobs(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.online = {"d1", "d2", "d3", "d4"}
    for name in ("d1", "d2", "d3", "d4"):
        w.report(name, "1.0.0")
    w.reload("- {name: up, package: fw-1.1.0, mode: static, push: true, devices: [d1, d2, d3]}\n")
    assert w.state.targets["up"] == {"d1", "d2", "d3"}
    w.report("d3", "1.1.0")
    started_at = w.state.batches["up"].started_at
    w.now = T0 + 30
    narrowed = w.reload("- {name: up, package: fw-1.1.0, mode: static, push: true, devices: [d1]}\n")
    assert narrowed.sends == []  # a reload does not push again
    assert {n: w.job(n).state for n in ("d1", "d2", "d3")} == {"d1": N, "d2": C, "d3": S}
    assert w.events(w.job("d2"))[-1] == ("notified", "canceled", "removed from the batch's device list")
    assert w.state.batches["up"].state == "running" and w.state.batches["up"].started_at == started_at
    assert w.report("d2", "1.0.0").sends == [] and len(w.jobs_of("d2")) == 1
    # Widening a running static batch adds targets; the device joins when it reports.
    w.reload("- {name: up, package: fw-1.1.0, mode: static, push: true, devices: [d1, d4]}\n")
    assert "d4" in w.state.targets["up"] and w.job("d4") is None
    joined = w.report("d4", "1.0.0")
    assert [s.device for s in joined.sends] == [dev("d4")] and w.job("d4").state == N
    assert w.counts("up") == {"notified": 2, "canceled": 1, "succeeded": 1}


# -- report_version ----------------------------------------------------------------------

def test_repeated_identical_report_writes_nothing(tmp_path: Path) -> None:
    w = World(tmp_path, UP_QUIET)
    first = w.report("d1", "1.0.0")
    assert first.changes.versions == {(dev("d1"), MODULE)} and len(first.changes.jobs) == 1
    again = w.report("d1", "1.0.0")
    assert not again.changes and again.promised == 0 and again.sends == []
    w.report("d9", "1.1.0")  # on the target, no job
    again = w.report("d9", "1.1.0")
    assert not again.changes and again.promised == 0
    assert w.state.versions[(dev("d9"), MODULE)] == ("1.1.0", T0)
    # Online with a told job of a batch that does not push: still nothing.
    w.online = {"d1"}
    w.offer("d1")
    repeat = w.report("d1", "1.0.0")
    assert repeat.sends == [] and not repeat.changes and repeat.promised == 0
    # (A pushing batch pushes again and still writes nothing: test_version_during_job_pushes_again.)


def test_target_version_succeeds(tmp_path: Path) -> None:
    w = World(tmp_path, UP)
    w.online = {"d1"}
    w.report("d1", "1.0.0")
    job = w.job("d1")
    w.now = T0 + 5
    done = w.report("d1", "1.1.0")
    assert (job.state, job.progress, job.updated_at) == (S, 100, T0 + 5)
    assert w.state.open_job(dev("d1"), MODULE) is None
    assert w.events(job)[-1] == ("notified", "succeeded", "device reported target version 1.1.0")
    assert done.promised == 1 and done.sends == []
    assert w.counts("up") == {"succeeded": 1}


def test_another_version_after_installed_fails(tmp_path: Path) -> None:
    w = World(tmp_path, UP)
    w.online = {"d1"}
    w.report("d1", "1.0.0")
    w.progress("d1", 40)
    w.progress("d1", 100, "rebooting")
    job = w.job("d1")
    assert job.state == I
    back = w.report("d1", "1.0.0")
    assert job.state == F and job.message == "reported 1.0.0 after install" and job.code is None
    assert w.events(job)[-1][:2] == ("installed", "failed") and back.promised == 1
    # Failed is final: the same version again makes no new job in the batch.
    again = w.report("d1", "1.0.0")
    assert not again.changes and w.jobs_of("d1") == [job]
    assert w.counts("up") == {"failed": 1}


def test_version_during_job_pushes_again(tmp_path: Path) -> None:
    w = World(tmp_path, UP)
    w.online = {"d1"}
    w.report("d1", "1.0.0")
    job = w.job("d1")
    again = w.report("d1", "1.0.0")  # rebooted before downloading
    assert [url_job(payload(s)["data"]["url"]) for s in again.sends] == [job.id]
    assert job.state == N and again.changes.events == [] and again.promised == 0
    w.progress("d1", 30)
    mid = w.report("d1", "1.0.0")  # rebooted mid-download
    assert len(mid.sends) == 1 and job.state == P and mid.changes.events == [] and mid.promised == 0
    assert w.report("d1", "1.0.0", deliver=False).sends == []
    other = w.report("d1", "0.9.0")  # another version the batch targets: same job, updated in place
    assert len(other.sends) == 1 and job.state == P and job.from_version == "0.9.0"
    assert w.events(job)[-1] == ("in_progress", "in_progress", "device now reports 0.9.0")
    assert other.promised == 0 and w.jobs_of("d1") == [job]
    w.online.clear()
    assert w.report("d1", "1.0.0").sends == []  # offline: nothing to send


def test_version_the_batch_no_longer_targets_cancels_and_reconsiders(tmp_path: Path) -> None:
    w = World(tmp_path, "- {name: a, package: fw-1.1.0, mode: dynamic, push: true, src_versions: [1.0.0]}\n"
                        "- {name: b, package: fw-1.2.0, mode: dynamic, push: true, src_versions: [0.9.0]}\n")
    w.online = {"d1"}
    w.report("d1", "1.0.0")
    first = w.job("d1")
    assert (first.batch, first.state) == ("a", N)
    moved = w.report("d1", "0.9.0")
    assert (first.state, first.superseded) == (C, 1)
    assert w.events(first)[-1] == ("notified", "canceled", "device now reports 0.9.0, which batch a does not target")
    second = w.job("d1")
    assert (second.batch, second.state, second.from_version) == ("b", N, "0.9.0")
    assert [url_job(payload(s)["data"]["url"]) for s in moved.sends] == [second.id]
    # Back on 1.0.0: b lets it go and a, whose job was superseded, takes it again.
    back = w.report("d1", "1.0.0")
    third = w.job("d1")
    assert (second.state, second.superseded) == (C, 1)
    assert (third.batch, third.state, third.id) == ("a", N, second.id + 1)
    assert len(back.sends) == 1
    assert w.counts("a") == {"notified": 1} and w.counts("b") == {"canceled": 1}
    # Newer than the package: canceled, and nothing else takes it.
    w.report("d1", "3.0.0")
    assert third.state == C and w.state.open_job(dev("d1"), MODULE) is None
    assert len(w.jobs_of("d1")) == 3


def test_late_success_after_failure(tmp_path: Path) -> None:
    w = World(tmp_path, UP)
    w.online = {"d1"}
    w.report("d1", "1.0.0")
    job = w.job("d1")
    w.progress("d1", -5, "verify error")
    assert job.state == F
    late = w.report("d1", "1.1.0")
    assert (job.state, job.progress, job.superseded, job.code) == (S, 100, 0, -5)
    assert w.events(job)[-1] == ("failed", "succeeded",
                                 "device reported target version 1.1.0 after the job had failed")
    assert late.promised == 1 and w.jobs_of("d1") == [job]
    assert w.counts("up") == {"succeeded": 1}


def test_unknown_module_is_ignored_and_known_module_recorded(tmp_path: Path) -> None:
    w = World(tmp_path, UP)
    ignored = w.report("d1", "1.0.0", module="nosuch")
    assert ignored.sends == [] and not ignored.changes and ignored.promised == 0
    assert w.state.version(dev("d1"), "nosuch") is None
    stranger = w.step(reports.report_version, w.live, DeviceId("otherPk", "d1"), MODULE, "1.0.0")
    assert not stranger.changes and w.state.versions == {}
    mcu = w.report("d1", "1.0.0", module="MCU")  # a module of the product; no package for it
    assert mcu.changes.versions == {(dev("d1"), "MCU")} and not mcu.changes.jobs
    assert w.state.jobs == {}


# -- report_progress ---------------------------------------------------------------------

def test_negative_step_fails_with_its_code(tmp_path: Path) -> None:
    w = World(tmp_path, UP)
    w.online = {"d1"}
    w.report("d1", "1.0.0")
    job = w.job("d1")
    failed = w.progress("d1", -2, "flash error")
    assert (job.state, job.code, job.message) == (F, -2, "flash error")
    assert w.events(job)[-1] == ("notified", "failed", "device reported step -2: flash error")
    assert failed.sends == [] and failed.promised == 1
    assert w.state.open_job(dev("d1"), MODULE) is None


def test_progress_is_in_progress_then_telemetry_then_installed(tmp_path: Path) -> None:
    w = World(tmp_path, UP)
    w.online = {"d1"}
    w.report("d1", "1.0.0")
    job = w.job("d1")
    w.now = T0 + 1
    first = w.progress("d1", 10, "downloading")
    assert (job.state, job.progress) == (P, 10)
    assert [e[2:5] for e in first.changes.events] == [("notified", "in_progress", 10)]
    assert first.promised == 0
    for at, step in ((T0 + 2, 50), (T0 + 3, 99)):
        w.now = at
        more = w.progress("d1", step, f"{step}%")
        assert more.changes.events == [] and more.changes.jobs == {job.id} and more.promised == 0
        assert (job.state, job.progress, job.message, job.updated_at) == (P, step, f"{step}%", at)
    w.now = T0 + 4
    installed = w.progress("d1", 100, "rebooting")
    assert (job.state, job.progress) == (I, 100)
    assert [e[2:5] for e in installed.changes.events] == [("in_progress", "installed", 100)]
    late = w.progress("d1", 30)  # after install: ignored
    assert not late.changes and (job.state, job.progress) == (I, 100)
    assert [new for _, new, _ in w.events(job)] == ["queued", "notified", "in_progress", "installed"]


def test_progress_without_open_job_is_ignored(tmp_path: Path) -> None:
    w = World(tmp_path, UP)
    ignored = w.progress("d1", 50)
    assert ignored.sends == [] and not ignored.changes
    w.report("d2", "1.0.0")
    w.report("d2", "1.1.0")
    ignored = w.progress("d2", -1, "late")
    assert not ignored.changes and w.job("d2").state == S


# -- offer -------------------------------------------------------------------------------

def test_offer_hands_out_the_open_job_and_notifies_it(tmp_path: Path) -> None:
    w = World(tmp_path, UP_QUIET)
    w.report("d1", "1.0.0")
    job = w.job("d1")
    offered = w.offer("d1")
    data = offered.result
    assert data["version"] == "1.1.0" and data["size"] == 160_000 and url_job(data["url"]) == job.id
    assert job.state == N and offered.promised == 1 and offered.sends == []
    assert w.events(job)[-1] == ("queued", "notified", "upgrade info handed out on request")
    again = w.offer("d1")
    assert again.result["url"].split("?")[0] == data["url"].split("?")[0]
    assert not again.changes and again.promised == 0
    assert w.offer("nobody").result == {}  # never reported
    w.report("d9", "1.1.0")
    assert w.offer("d9").result == {}  # nothing to upgrade to


def test_offer_of_mqtt_batch_names_the_stream(tmp_path: Path) -> None:
    w = World(tmp_path, "- {name: up, package: fw-1.2.0, mode: dynamic, push: false, protocol: mqtt}\n")
    w.report("d1", "1.0.0")
    data = w.offer("d1").result
    job = w.job("d1")
    assert (data["dProtocol"], data["streamId"], data["streamFileId"]) == ("mqtt", job.id, 1)
    assert "url" not in data and data["signMethod"] == "SHA256"
    assert data["sign"] == sha256_of(tmp_path / "packages" / "fw-1.1.0.bin")


def test_offer_after_installed_is_empty(tmp_path: Path) -> None:
    w = World(tmp_path, UP)
    w.report("d1", "1.0.0")
    w.progress("d1", 100)
    offered = w.offer("d1")
    assert offered.result == {} and not offered.changes and w.job("d1").state == I


def test_offer_cancels_a_job_of_a_batch_no_longer_running(tmp_path: Path) -> None:
    # b stands first in the file, so a (later) takes d1; once a stops running, an offer
    # cancels a's job and hands out b instead.
    w = World(tmp_path, "- {name: b, package: fw-1.2.0, mode: dynamic, push: false}\n"
                        "- {name: a, package: fw-1.1.0, mode: dynamic, push: false}\n")
    w.report("d1", "1.0.0")
    first = w.job("d1")
    assert first.batch == "a"
    w.live.running.discard("a")
    offered = w.offer("d1")
    assert first.state == C
    assert w.events(first)[-1] == ("queued", "canceled", "batch a is no longer running")
    second = w.job("d1")
    assert (second.batch, second.state) == ("b", N)
    assert offered.result["version"] == "1.2.0" and url_job(offered.result["url"]) == second.id
    w.live.running.discard("b")
    assert w.offer("d1").result == {} and second.state == C


# -- verification ------------------------------------------------------------------------

VERIFY = ("- {name: v, package: fw-2.0.0, type: verify, devices: [d1, d2], push: true}\n"
          "- {name: up2, package: fw-2.0.0, mode: dynamic, push: true}\n")


def test_verify_batch_all_succeeded_verifies_and_starts_waiting_batches(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.online = {"d3"}
    for name in ("d1", "d2", "d3"):
        w.report(name, "1.0.0")
    w.reload(VERIFY)
    assert w.live.running == {"v"} and w.state.batches["up2"].state == "waiting_verification"
    assert {n: w.job(n).state for n in ("d1", "d2")} == {"d1": Q, "d2": Q} and w.job("d3") is None
    w.report("d1", "2.0.0")
    assert "fw-2.0.0" not in w.state.package_status and w.state.batches["v"].state == "running"
    w.now = T0 + 100
    last = w.report("d2", "2.0.0")
    package = w.live.catalog.packages["fw-2.0.0"]
    assert w.state.package_status["fw-2.0.0"] == ("verified", sha256_of(tmp_path / "packages" / "fw-1.1.0.bin"))
    assert w.live.package_status(package) == "verified"
    v = w.state.batches["v"]
    assert (v.state, v.reason, v.ended_at) == ("completed", "verified", T0 + 100)
    assert w.live.running == {"up2"} and w.state.batches["up2"].state == "running"
    assert w.state.batches["up2"].started_at == T0 + 100
    d3 = w.job("d3")
    assert (d3.batch, d3.state, d3.target_version) == ("up2", N, "2.0.0")
    assert [s.device for s in last.sends] == [dev("d3")]
    assert w.jobs_of("d1", "up2") == [] and w.jobs_of("d2", "up2") == []  # already on 2.0.0
    assert w.counts("v") == {"succeeded": 2} and w.counts("up2") == {"notified": 1}


def test_verify_failure_marks_the_package_and_ends_the_batch(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.online = {"d1", "d3"}
    for name in ("d1", "d2", "d3"):
        w.report(name, "1.0.0")
    w.reload(VERIFY)
    w.progress("d1", -1, "boot loop")
    assert w.state.package_status["fw-2.0.0"][0] == "verify_failed"
    assert (w.state.batches["v"].state, w.state.batches["v"].reason) == ("completed", "verify_failed")
    d2 = w.job("d2")
    assert d2.state == C and w.events(d2)[-1] == ("queued", "canceled", "verification ended: verify_failed")
    assert w.state.batches["up2"].state == "waiting_verification" and w.live.running == set()
    assert w.job("d3") is None
    with pytest.raises(Refused) as refused:
        admin.retry(w.live, "v")
    assert refused.value.status == 409
    w.report("d2", "2.0.0")  # too late to change the verdict
    assert w.state.package_status["fw-2.0.0"][0] == "verify_failed"
    assert w.counts("v") == {"failed": 1, "canceled": 1}


def test_devices_already_on_the_package_version_count_as_verified(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.report("d1", "2.0.0")
    started = w.reload(VERIFY)
    d1 = w.job("d1")
    assert (d1.batch, d1.state, d1.from_version, d1.progress) == ("v", S, "2.0.0", 100)
    assert w.state.batches["v"].state == "running"  # d2 never reported
    assert started.sends == []
    w.report("d2", "2.0.0")  # not a job before: counted as succeeded now
    assert w.job("d2").state == S and w.job("d2").batch == "v"
    assert w.state.package_status["fw-2.0.0"][0] == "verified"
    assert w.live.running == {"up2"}


def test_a_canceled_verify_job_decides_nothing(tmp_path: Path) -> None:
    w = World(tmp_path)
    for name in ("d1", "d2"):
        w.report(name, "1.0.0")
    w.reload(VERIFY)
    w.step(admin.cancel_devices, w.live, "v", ["d2"])
    w.report("d1", "2.0.0")
    assert "fw-2.0.0" not in w.state.package_status and w.state.batches["v"].state == "running"


# -- retry -------------------------------------------------------------------------------

def test_retry_supersedes_failed_jobs_and_makes_new_ones(tmp_path: Path) -> None:
    w = World(tmp_path, UP)
    w.online = {"d1", "d2", "d3"}
    for name in ("d1", "d2", "d3"):
        w.report(name, "1.0.0")
        w.progress(name, -3, "flash")
    old1, old2, old3 = (w.job(n) for n in ("d1", "d2", "d3"))
    w.report("d3", "1.2.0")  # now on a version the batch does not target
    assert w.counts("up") == {"failed": 3}
    retried = w.step(admin.retry, w.live, "up", ["d1", "d3"])
    assert retried.result == 2
    assert (old1.state, old1.superseded) == (F, 1) and (old3.state, old3.superseded) == (F, 1)
    assert (old2.state, old2.superseded) == (F, 0)
    assert w.events(old1)[-1] == ("failed", "failed", "retry requested by an admin")
    new1 = w.job("d1")
    assert new1.id > old3.id and (new1.batch, new1.state) == ("up", N)
    assert [url_job(payload(s)["data"]["url"]) for s in retried.sends] == [new1.id]
    assert w.job("d3") is old3  # no new job until it reports a version the batch targets
    assert w.jobs_of("d1") == [old1, new1]  # history keeps the failed job
    assert [new for _, new, _ in w.events(old1)] == ["queued", "notified", "failed", "failed"]
    assert w.counts("up") == {"notified": 1, "failed": 2}
    assert retried.promised == 1 + 1  # a job created, and notified
    back = w.report("d3", "1.0.0")
    assert w.job("d3").state == N and len(back.sends) == 1
    # The retried job's late success does not count: its device moved on to a new job.
    w.report("d1", "1.1.0")
    assert (old1.state, new1.state) == (F, S)
    assert w.step(admin.retry, w.live, "up").result == 1  # d2 only
    assert w.job("d2").state == N and len(w.jobs_of("d2")) == 2
    assert w.counts("up") == {"notified": 2, "succeeded": 1}


def test_retry_refuses_unknown_and_not_running_batches(tmp_path: Path) -> None:
    w = World(tmp_path, "- {name: up2, package: fw-2.0.0, mode: dynamic}\n")
    with pytest.raises(Refused) as unknown:
        admin.retry(w.live, "nope")
    assert unknown.value.status == 404
    with pytest.raises(Refused) as waiting:
        admin.retry(w.live, "up2")
    assert waiting.value.status == 409
    assert not w.state.changes
    w.reload("- {name: up2, package: fw-2.0.0, mode: dynamic}\n" + UP)
    nothing = w.step(admin.retry, w.live, "up")  # running, nothing failed
    assert nothing.result == 0 and not nothing.changes and nothing.sends == []


# -- cancel_devices ----------------------------------------------------------------------

def test_cancel_devices_cancels_open_jobs_and_excludes_devices_without_one(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.online = {"d1", "d2", "d3"}
    w.report("d1", "1.0.0")
    w.report("d3", "1.0.0")
    w.reload("- {name: up, package: fw-1.1.0, push: true, devices: [d1, d2, d3]}\n")
    w.report("d3", "1.1.0")
    canceled = w.step(admin.cancel_devices, w.live, "up", ["d1", "d2", "d2", "d3"])
    assert canceled.result == 2 and canceled.sends == []
    d1, d2, d3 = (w.job(n, "up") for n in ("d1", "d2", "d3"))
    assert d1.state == C and w.events(d1)[-1] == ("notified", "canceled", "canceled by an admin")
    assert (d2.state, d2.from_version, d2.superseded) == (C, "", 0)
    assert w.events(d2) == [(None, "canceled", "canceled by an admin before it started")]
    assert d3.state == S
    assert w.counts("up") == {"canceled": 2, "succeeded": 1}
    # The batch does not take them later.
    assert w.report("d2", "1.0.0").sends == [] and w.jobs_of("d2") == [d2]
    assert w.report("d1", "1.0.0").sends == [] and w.jobs_of("d1") == [d1]
    assert w.state.open_job(dev("d2"), MODULE) is None
    assert w.step(admin.cancel_devices, w.live, "up", ["d2"]).result == 0  # already excluded
    for batch, names in (("up", ["d4"]), ("nope", ["d1"])):
        with pytest.raises(Refused) as refused:
            admin.cancel_devices(w.live, batch, names)
        assert refused.value.status == 404
    assert not w.state.changes


def test_cancel_a_device_of_a_dynamic_batch_before_it_reports(tmp_path: Path) -> None:
    w = World(tmp_path, UP)
    assert w.step(admin.cancel_devices, w.live, "up", ["later"]).result == 1
    assert w.report("later", "1.0.0").sends == [] and w.state.open_job(dev("later"), MODULE) is None


# -- fail_stale_jobs ---------------------------------------------------------------------

def test_stale_told_jobs_fail_queued_and_downloading_ones_do_not(tmp_path: Path) -> None:
    w = World(tmp_path, "- {name: up, package: fw-1.1.0, mode: dynamic, push: true, timeout_minutes: 5}\n")
    w.online = {"n", "p", "dl", "fresh"}
    for name in ("q", "n", "p", "dl", "fresh"):
        w.report(name, "1.0.0")
    w.progress("p", 10)
    downloading = w.job("dl")
    w.downloads.started(downloading.id)
    w.now = T0 + 200
    w.progress("fresh", 20)
    w.now = T0 + 300  # exactly the timeout: not yet
    assert w.step(ticks.fail_stale_jobs, w.live).result == 0
    w.now = T0 + 301
    swept = w.step(ticks.fail_stale_jobs, w.live)
    assert swept.result == 2 and swept.promised == 2
    states = {n: w.job(n).state for n in ("q", "n", "p", "dl", "fresh")}
    assert states == {"q": Q, "n": F, "p": F, "dl": N, "fresh": P}
    assert w.job("n").message == "timed out in state notified"
    assert w.job("p").message == "timed out in state in_progress"
    assert w.events(w.job("n"))[-1] == ("notified", "failed", "no report for 5 min (timeout_minutes)")
    # The download ends; silence counts from then on.
    w.now = T0 + 400
    w.downloads.finished(downloading.id, 4096)
    assert not w.downloads.in_flight(downloading.id)
    assert (downloading.bytes_served, downloading.updated_at) == (4096, T0 + 400)
    assert w.step(ticks.fail_stale_jobs, w.live, T0 + 700).result == 1  # fresh (silent since T0+200)
    assert w.job("dl").state == N
    assert w.step(ticks.fail_stale_jobs, w.live, T0 + 701).result == 1
    assert w.job("dl").state == F and w.job("q").state == Q
    # A timed-out device that did upgrade succeeds after all.
    w.report("n", "1.1.0")
    assert w.job("n").state == S
    assert w.counts("up") == {"queued": 1, "failed": 3, "succeeded": 1}


def test_a_version_report_during_a_told_job_is_activity_for_the_timeout(tmp_path: Path) -> None:
    """docs/operations.md, Timeouts: a job fails when its device "has neither reported nor
    downloaded anything" for timeout_minutes. A device that reboots and reports its version
    again (and is pushed again) has reported."""
    w = World(tmp_path, "- {name: up, package: fw-1.1.0, mode: dynamic, push: true, timeout_minutes: 5}\n")
    w.online = {"d1"}
    w.report("d1", "1.0.0")  # T0: job created and pushed
    w.now = T0 + 290
    again = w.report("d1", "1.0.0")  # rebooted: it reports and is told again
    assert len(again.sends) == 1
    w.now = T0 + 301  # 11 s after that report
    swept = w.step(ticks.fail_stale_jobs, w.live)
    assert w.job("d1").state == N, "the job timed out 11 s after its device reported and was pushed again"
    assert swept.result == 0


def test_late_success_is_not_lost_when_the_device_was_excluded_from_another_batch(tmp_path: Path) -> None:
    """An admin excludes d1 from batch b (a canceled placeholder there); its job in up then
    times out, and d1 reports up's target version: it did upgrade, the job succeeded."""
    up = "- {name: up, package: fw-1.1.0, mode: dynamic, push: true, timeout_minutes: 5}\n"
    w = World(tmp_path, up)
    w.online = {"d1"}
    w.report("d1", "1.0.0")
    job = w.job("d1")
    assert (job.batch, job.state) == ("up", N)
    w.reload(up + "- {name: b, package: fw-1.2.0, devices: [d1, d2]}\n")  # d1 was told: it stays in up
    assert w.jobs_of("d1", "b") == [] and w.job("d1") is job
    assert w.step(admin.cancel_devices, w.live, "b", ["d1"]).result == 1
    assert w.step(ticks.fail_stale_jobs, w.live, T0 + 400).result == 1 and job.state == F
    w.now = T0 + 500
    w.report("d1", "1.1.0")
    assert job.state == S, "the failed job of a device that reported its target version stays failed"


def test_batches_without_timeout_never_time_out(tmp_path: Path) -> None:
    w = World(tmp_path, UP)
    w.online = {"d1"}
    w.report("d1", "1.0.0")
    assert w.step(ticks.fail_stale_jobs, w.live, T0 + 365 * 86400).result == 0 and w.job("d1").state == N


# -- priority ----------------------------------------------------------------------------

def test_verify_batch_comes_first(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.report("d1", "1.0.0")
    w.report("d2", "1.0.0")
    w.reload("- {name: v, package: fw-2.0.0, type: verify, devices: [d1, d3]}\n" + UP)
    assert (w.job("d1").batch, w.job("d2").batch) == ("v", "up")  # at start, although up is later
    w.report("d3", "1.0.0")
    assert w.job("d3").batch == "v"  # on a report
    w.report("d4", "1.0.0")
    assert w.job("d4").batch == "up"
    assert w.jobs_of("d1", "up") == []


def test_a_later_batch_takes_a_device_only_from_a_queued_job_of_a_lower_batch(tmp_path: Path) -> None:
    w = World(tmp_path, UP_QUIET)
    for name in ("d1", "d2", "d3"):
        w.report(name, "1.0.0")
    w.offer("d2")
    w.progress("d3", 10)
    assert {n: w.job(n).state for n in ("d1", "d2", "d3")} == {"d1": Q, "d2": N, "d3": P}
    b = "- {name: b, package: fw-1.2.0, mode: dynamic, push: false}\n"
    w.reload(UP_QUIET + b)
    old = w.jobs_of("d1", "up")[0]
    assert (old.state, old.superseded) == (C, 1)
    assert w.events(old)[-1] == ("queued", "canceled", "batch b comes first")
    assert (w.job("d1").batch, w.job("d1").state) == ("b", Q)
    assert w.jobs_of("d2", "b") == [] and w.jobs_of("d3", "b") == []  # told already: they stay
    assert w.counts("up") == {"canceled": 1, "notified": 1, "in_progress": 1}
    assert w.counts("b") == {"queued": 1}
    # A batch earlier in the file ranks lower: it takes no one from b.
    c = "- {name: c, package: fw-1.2.0, mode: dynamic, push: false}\n"
    w.reload(c + UP_QUIET + b)
    assert w.jobs_of("d1", "c") == [] and w.job("d1").batch == "b" and w.job("d1").state == Q
    w.report("d4", "1.0.0")
    assert w.job("d4").batch == "b"
    assert w.counts("c") == {}


# -- files -------------------------------------------------------------------------------

def test_a_job_keeps_its_file_until_a_reload_removes_it(tmp_path: Path) -> None:
    with_diff = BASE.replace("file: fw-1.1.0.bin, sign_method: MD5}",
                             "file: fw-1.1.0.bin, sign_method: MD5, diff_from: [1.0.0]}")
    assert with_diff != BASE
    w = World(tmp_path, UP, base=with_diff)
    w.online = {"d1"}
    w.report("d0", "0.9.0")  # offline; full image (no patch from 0.9.0)
    pushed = w.report("d1", "1.0.0")
    job = w.job("d1")
    data = payload(pushed.sends[0])["data"]
    assert job.file_key == "fw-1.1.0~from~1.0.0" and data["isDiff"] == 1
    assert data["extData"]["_target_size"] == 160_000 and data["size"] == job.file_size != 160_000
    # The patch leaves the catalog: the next push moves the job to the full image, in place.
    w.reload(UP)
    assert job.file_key == "fw-1.1.0~from~1.0.0"  # nothing happens before it is needed
    again = w.report("d1", "1.0.0")
    data = payload(again.sends[0])["data"]
    assert (job.file_key, job.file_size, job.state) == ("fw-1.1.0", 160_000, N)
    assert "isDiff" not in data and data["size"] == 160_000
    assert w.events(job)[-1] == ("notified", "notified", "its file left the catalog; now fw-1.1.0")
    # A patch added later does not change the file of a job that has one.
    w.reload(UP, base=with_diff)
    w.online.add("d0")
    w.report("d0", "0.9.0")
    w.report("d1", "1.0.0")
    assert w.job("d0").file_key == "fw-1.1.0" and job.file_key == "fw-1.1.0"


def test_push_ids_wrap_to_1_after_2_31_minus_1_and_reserve_a_new_block(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.state.counters[PUSH_IDS] = PUSH_ID_MAX
    world.live._last_push_id = PUSH_ID_MAX - 1  # as loaded after a restart near the end
    ids = [world.live.next_push_id() for _ in range(3)]
    assert ids == [PUSH_ID_MAX, 1, 2]
    assert world.state.counters[PUSH_IDS] == PUSH_ID_BLOCK and PUSH_IDS in world.state.take_changes().counters
