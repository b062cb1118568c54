"""The engine's decisions as plain function calls on a fake clock (tests/test_decisions.py,
test_rollout.py, test_policy_properties.py): `World` holds a real catalog in tmp_path
(harness.write_catalog + prepare_catalog), a fresh FleetState, a Downloads with a fixed URL
key, an `online` set the test controls and a fake clock. `World.step` runs one decision and,
after every one, checks the state's invariants: per-batch counts equal a recount of each
device's latest job, `promises` equals the jobs created plus the moves into notified/final
states (plus batch and package rows), the indexes agree with the jobs, every event is a legal
move and ends in the job's state, and every push names the device's open, told job.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.harness import BASE_CATALOG, PK, url_job, write_catalog
from otacore.protocol.credentials import DeviceId
from otacore.decisions import assignment, batches as batch_decisions, reports
from otacore.decisions.live import LiveFleet, Send
from otacore.downloads.serving import Downloads
from otacore.catalog.loading import prepare_catalog
from otacore.fleet.state import Changes, FleetState
from otacore.fleet.jobs import FINAL_STATES, LEGAL_MOVES, Job, JobState
from otacore.config.settings import settings_from_mapping

Q, N, P, I, S, F, C = (JobState.QUEUED, JobState.NOTIFIED, JobState.IN_PROGRESS, JobState.INSTALLED,
                       JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED)

URL_KEY = b"decisions-unit-test-url-key-0123"
PUBLIC_URL = "http://ota.test:8080"
T0 = 1_700_000_000.0
MODULE = "default"

# fw-1.0.0 (SHA256) and fw-1.1.0 (MD5) from the harness, plus 1.2.0 and a 2.0.0 that needs verifying.
BASE = BASE_CATALOG.rstrip() + """
  - {id: fw-1.2.0, product: a1Test, version: 1.2.0, file: fw-1.1.0.bin, sign_method: SHA256}
  - {id: fw-2.0.0, product: a1Test, version: 2.0.0, file: fw-1.1.0.bin, sign_method: SHA256, verify: true}
"""

_PROMISED = {N, I} | FINAL_STATES  # told, installed, or final


class TrackedState(FleetState):
    """A FleetState that also counts the promises made by batch and package rows, so the
    rest of `promises` can be checked against the job events."""

    def __init__(self) -> None:
        super().__init__()
        self.row_promises = 0

    def save_batch(self, *args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
        self.row_promises += 1
        return super().save_batch(*args, **kwargs)

    def end_batch(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.row_promises += name in self.batches
        super().end_batch(name, *args, **kwargs)

    def set_package_status(self, *args: Any, **kwargs: Any) -> None:
        self.row_promises += 1
        super().set_package_status(*args, **kwargs)

    def set_control(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.row_promises += name in self.batches
        super().set_control(name, *args, **kwargs)


@dataclass
class Step:
    sends: list[Send]
    changes: Changes
    promised: int  # increase of state.promises
    result: Any = None


def payload(send: Send) -> dict[str, Any]:
    return json.loads(send.payload)


def dev(name: str) -> DeviceId:
    return DeviceId(PK, name)


def recount(state: FleetState) -> dict[str, Counter[str]]:
    """Per batch: state -> devices, counting each device's latest job in the batch once."""
    latest: dict[tuple[str, DeviceId, str], Job] = {}
    for job in state.jobs.values():
        key = (job.batch, job.device, job.module)
        if key not in latest or latest[key].id < job.id:
            latest[key] = job
    counts: dict[str, Counter[str]] = {}
    for (batch, _, _), job in latest.items():
        counts.setdefault(batch, Counter())[job.state.value] += 1
    return counts


def promise_events(events: list[tuple]) -> int:
    """Job creations and moves into notified, installed or a final state."""
    return sum(1 for _, _, old, new, _, _ in events if old is None or (new != old and new in _PROMISED))


class World:
    def __init__(self, root: Path, batches: str = "", base: str = BASE) -> None:
        self.root = root
        self.settings = settings_from_mapping({"data_dir": str(root / "var"), "http": {"public_url": PUBLIC_URL}},
                                              root / "broker.yaml")
        self.now = T0
        self.online: set[str] = set()
        self.state = TrackedState()
        self.downloads = Downloads(self.state, URL_KEY, self.clock)
        self.live = LiveFleet(self.settings, self.state, self.downloads,
                              lambda device: device.device_name in self.online, self.clock)
        self.written: list[tuple] = []  # every event taken from the state, in order
        self.reload(batches, base)

    def clock(self) -> float:
        return self.now

    # -- running decisions -------------------------------------------------------------
    def step(self, decide: Any, *args: Any, **kwargs: Any) -> Step:
        before = self.state.promises
        result = decide(*args, **kwargs)
        if isinstance(result, tuple):
            result, sends = result
        else:
            result, sends = None, result
        self.check(sends)
        changes = self.state.take_changes()
        self.written.extend(changes.events)
        return Step(sends, changes, self.state.promises - before, result)

    def reload(self, batches: str, base: str = BASE) -> Step:
        write_catalog(self.root, batches, base=base)
        loaded = prepare_catalog(self.settings)
        return self.step(batch_decisions.apply_catalog, self.live, loaded.catalog, loaded.files)

    def report(self, name: str, version: str, module: str = MODULE, deliver: bool = True) -> Step:
        return self.step(reports.report_version, self.live, dev(name), module, version, deliver=deliver)

    def progress(self, name: str, step: int, desc: str = "") -> Step:
        return self.step(reports.report_progress, self.live, dev(name), MODULE, step, desc)

    def hand_out(self, device: DeviceId, module: str) -> tuple[dict[str, Any], list[Send]]:
        return assignment.hand_out(self.live, device, module), self.live.take_out()

    def offer(self, name: str) -> Step:
        return self.step(self.hand_out, dev(name), MODULE)

    # -- reading -----------------------------------------------------------------------
    def job(self, name: str, batch: str | None = None) -> Job | None:
        if batch is None:
            return self.state.latest_job(dev(name), MODULE)
        return self.state.latest_job_in_batch(batch, dev(name))

    def jobs_of(self, name: str, batch: str | None = None) -> list[Job]:
        return sorted((j for j in self.state.jobs.values() if j.device == dev(name)
                       and (batch is None or j.batch == batch)), key=lambda j: j.id)

    def events(self, job: Job) -> list[tuple[str | None, str, str]]:
        return [(e[2], e[3], e[5]) for e in self.written if e[0] == job.id]

    def counts(self, batch: str) -> dict[str, int]:
        return {k: v for k, v in self.state.counts.get(batch, Counter()).items() if v}

    # -- invariants --------------------------------------------------------------------
    def check(self, sends: list[Send]) -> None:
        state = self.state
        # Counts: always a recount of each device's latest job per batch, never negative.
        expected = recount(state)
        for batch in set(state.counts) | set(expected):
            counts = state.counts.get(batch, Counter())
            assert all(v >= 0 for v in counts.values()), (batch, counts)
            assert +counts == expected.get(batch, Counter()), (batch, dict(counts), dict(expected.get(batch, {})))
        # Promises: one per job created or moved into notified/final, plus batch/package rows.
        events = self.written + state.changes.events
        assert state.promises == promise_events(events) + state.row_promises
        # Every event is a legal move, and a job's last event names its state.
        last: dict[int, str] = {}
        for job_id, _, old, new, _, _ in events:
            assert old is None or JobState(new) in LEGAL_MOVES[JobState(old)], (job_id, old, new)
            last[job_id] = new
        assert last == {job.id: job.state.value for job in state.jobs.values()}
        # Indexes agree with the jobs.
        open_jobs = [j for j in state.jobs.values() if j.is_open]
        assert len({(j.device, j.module) for j in open_jobs}) == len(open_jobs), "two open jobs for one module"
        assert state.open_jobs == {(j.device, j.module): j for j in open_jobs}
        current: dict[str, dict[DeviceId, Job]] = {}
        for job in sorted(state.jobs.values(), key=lambda j: j.id):
            if not job.superseded:
                assert job.device not in current.get(job.batch, {}), "two current jobs in one batch"
                current.setdefault(job.batch, {})[job.device] = job
        assert {b: d for b, d in state.current.items() if d} == current
        assert state.next_job_id == max(state.jobs, default=0) + 1
        # Every push names the device's open job, and that job has been told.
        for send in sends:
            assert send.topic == f"/ota/device/upgrade/{PK}/{send.device.device_name}"
            job = state.open_job(send.device, MODULE)
            assert job is not None and job.state != Q, send
            data = payload(send)["data"]
            assert (url_job(data["url"]) if "url" in data else data["streamId"]) == job.id
