"""A batch's rollout at run time: who is in (tags, percent, opened waves), whether a job
may start now (paused or halted, schedule, windows, rate), when the next wave opens, when
to halt (abort), which failures are retried, and why a batch is not pushing (the view).

Pauses, halts and opened waves live in the batch row's `control` (written by the journal,
so they survive restarts); the rate window is memory only. Nothing here sends or awaits:
decisions.py asks and acts.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from otacore.catalog.model import Batch, Catalog
from otacore.protocol.credentials import DeviceId
from otacore.fleet.state import FleetState
from otacore.fleet.jobs import Job, JobState
from otacore.catalog.rollout_policy import STEP_KINDS, RolloutPolicy, device_share, format_time, schedule_block, wave_index

TIMEOUT_MESSAGE = "timed out"  # the start of a timed-out job's message (decisions.fail_stale_jobs)
BOOT_MESSAGE = "after install"  # in the message of a job whose new image did not boot


def failure_of(job: Job) -> str | None:
    """A failed job's failure kind for views (`failure`), None for any other state."""
    return failure_kind(job) if job.state == JobState.FAILED else None


def failure_kind(job: Job) -> str:
    """failed / download / verify / flash (the device's step), timeout, or boot."""
    if job.code is not None and job.code in STEP_KINDS:
        return STEP_KINDS[job.code]
    if job.message.startswith(TIMEOUT_MESSAGE):
        return "timeout"
    if BOOT_MESSAGE in job.message:
        return "boot"
    return "failed"


@dataclass(frozen=True)
class Block:
    """Why a batch starts no job now: kind (paused, halted, scheduled, ended, window), the
    reason in words, and until when (None: until someone acts, or for good)."""

    kind: str
    reason: str
    until: float | None = None


@dataclass(frozen=True)
class WaveFigures:
    jobs: int
    succeeded: int
    finished: int


def wave_figures(policy: RolloutPolicy, batch_name: str, jobs: Iterable[Job], upto: int,
                 *, only_this_wave: bool = False) -> WaveFigures:
    """Counts over the latest jobs of the devices in waves 1..upto+1 (0-based `upto`), or
    of wave upto+1 alone."""
    limit = policy.waves[upto].percent
    floor = policy.waves[upto - 1].percent if only_this_wave and upto > 0 else 0.0
    total = succeeded = finished = 0
    for job in jobs:
        if job.state == JobState.CANCELED or not floor <= device_share(batch_name, job.device.device_name) < limit:
            continue
        total += 1
        succeeded += job.state == JobState.SUCCEEDED
        finished += job.state in (JobState.SUCCEEDED, JobState.FAILED)
    return WaveFigures(total, succeeded, finished)


def wave_met(policy: RolloutPolicy, figures: WaveFigures, index: int) -> bool:
    """Has wave `index` (0-based) done what opens the next one? With success_percent, that
    share of its jobs (and the earlier waves') succeeded; without, all of them finished. A
    wave whose devices got no job counts as succeeded."""
    if figures.jobs == 0:
        return True
    wanted = policy.waves[index].success_percent
    if wanted is None:
        return figures.finished == figures.jobs
    return 100 * figures.succeeded >= wanted * figures.jobs


class RolloutFigures(Protocol):
    """A batch's jobs as a fleet-wide rule (waves, abort, verification) reads them: this
    process's own (LocalFigures), or the whole fleet's from the shared database
    (cluster_worker/fleet_sync.py SharedFigures)."""

    def latest_in_batch(self, batch: str) -> Iterable[Job]: ...

    def counts(self, batch: str) -> dict[str, int]: ...


class LocalFigures:
    """A batch's jobs as this process holds them: the whole fleet, for one process."""

    def __init__(self, state: FleetState) -> None:
        self._state = state

    def latest_in_batch(self, batch: str) -> Iterable[Job]:
        return self._state.latest_in_batch.get(batch, {}).values()

    def counts(self, batch: str) -> dict[str, int]:
        return self._state.counts.get(batch, {})


class SlidingWindow:
    """`rate_per_minute` for one process: the starts of the last 60 s, in memory."""

    def __init__(self) -> None:
        self._starts: dict[str, deque[float]] = {}  # batch -> when its last jobs started

    def left(self, batch: Batch, now: float) -> int:
        starts = self._starts.setdefault(batch.name, deque())
        while starts and starts[0] <= now - 60:
            starts.popleft()
        return max(0, (batch.policy.rate_per_minute or 0) - len(starts))

    def spend(self, batch: Batch, now: float) -> None:
        self._starts.setdefault(batch.name, deque()).append(now)


class RateBudget(Protocol):
    """Where a batch's starts are counted against `rate_per_minute` (SlidingWindow in one
    process; grants from the shared database across workers: cluster_worker/rate_grants.py)."""

    def left(self, batch: Batch, now: float) -> int: ...

    def spend(self, batch: Batch, now: float) -> None: ...


class Rollout:
    """The run-time side of every batch's policy, over the fleet's state. `figures` are the
    batch's jobs a fleet-wide rule reads (waves, abort): this process's own, or the whole
    fleet's as the shared database holds them (cluster mode)."""

    def __init__(self, state: FleetState, rate: RateBudget | None = None) -> None:
        self.state = state
        self.figures: RolloutFigures = LocalFigures(state)
        self.rate: RateBudget = rate or SlidingWindow()
        # Seconds after a batch starts or a wave opens before its waves are judged: 0 in one
        # process (the jobs a start or an opening gives exist at once); a cluster's coordinator
        # reads the whole fleet's jobs from the database, where the other workers' jobs for the
        # newly chosen devices land a moment later (a wave with no job counts as succeeded).
        self.settle_seconds = 0.0
        self._schedule: dict[str, tuple[int, RolloutPolicy, tuple[str, float | None] | None]] = {}

    # -- control (persisted in the batch row) ----------------------------------------
    def control(self, name: str) -> dict[str, Any]:
        row = self.state.batches.get(name)
        return row.control if row is not None else {}

    def _set(self, name: str, **fields: Any) -> None:
        self.state.set_control(name, fields)

    def pause(self, name: str, by: str, reason: str, now: float, **figures: Any) -> None:
        self._set(name, paused=True, by=by, reason=reason, at=now, figures=figures)

    def resume(self, name: str, by: str, reason: str, now: float) -> None:
        self._set(name, paused=False, by=by, reason=reason, at=now, figures={})

    def apply_catalog(self, batch: Batch, now: float) -> None:
        """The catalog's `state:` as of this load: a change in the file acts (the latest of a
        file change, a pause or resume by hand and a halt wins); an unchanged one does not
        undo a pause or resume by hand. Also keeps the policy as loaded, for `otactl plan`."""
        control = self.control(batch.name)
        written = batch.policy.state or "active"
        if control.get("catalog_state", "active") != written:
            if written == "paused":
                self.pause(batch.name, "catalog", "state: paused in the catalog", now)
            else:
                self.resume(batch.name, "catalog", "state: active in the catalog", now)
        if control.get("catalog_state", "active") != written or control.get("policy", {}) != batch.policy.text:
            self._set(batch.name, catalog_state=written, policy=batch.policy.text)

    # -- who is in -------------------------------------------------------------------
    def open_wave(self, batch: Batch) -> int:
        return int(self.control(batch.name).get("wave", 0))

    def member(self, catalog: Catalog, batch: Batch, device: DeviceId) -> bool:
        """Is the device in the batch's chosen share now (tags, percent, opened waves)?"""
        policy = batch.policy
        if policy.tags is not None:
            product = catalog.products.get(device.product_key)
            listed = product.devices.get(device.device_name) if product else None
            if listed is None or not set(listed.tags) & set(policy.tags):
                return False
        if policy.waves:
            index = wave_index(policy, device_share(batch.name, device.device_name))
            return index is not None and index <= self.open_wave(batch)
        if policy.percent is not None:
            return device_share(batch.name, device.device_name) < policy.percent
        return True

    # -- may a job start now ---------------------------------------------------------
    def blocked(self, batch: Batch, now: float) -> Block | None:
        control = self.control(batch.name)
        if control.get("paused"):
            kind = "halted" if control.get("by") == "abort" else "paused"
            return Block(kind, control.get("reason") or kind)
        schedule = self.schedule(batch, now)
        if schedule is None:
            return None
        reason, until = schedule
        kind = "scheduled" if reason.startswith("scheduled") else "ended" if reason.startswith("ended") else "window"
        return Block(kind, reason, until)

    def schedule(self, batch: Batch, now: float) -> tuple[str, float | None] | None:
        """schedule_block's answer, worked out once a second per batch: a batch start asks it
        for thousands of devices at once, and status and metrics ask it per request."""
        if not (batch.policy.windows or batch.policy.start_at or batch.policy.end_at):
            return None
        cached = self._schedule.get(batch.name)
        if cached is None or cached[0] != int(now) or cached[1] is not batch.policy:
            cached = (int(now), batch.policy, schedule_block(batch.policy, now))
            self._schedule[batch.name] = cached
        return cached[2]

    def rate_left(self, batch: Batch, now: float) -> int | None:
        """Jobs that may still start in the current minute (None: no limit)."""
        if batch.policy.rate_per_minute is None:
            return None
        return self.rate.left(batch, now)

    def may_start(self, batch: Batch, now: float) -> bool:
        """May one more job of the batch start now (not blocked, within the rate)? Only asks."""
        return self.blocked(batch, now) is None and self.rate_left(batch, now) != 0

    def note_start(self, batch: Batch, now: float) -> None:
        """A job of the batch started now: it counts against the rate."""
        if batch.policy.rate_per_minute is not None:
            self.rate.spend(batch, now)

    # -- what the tick finds due -----------------------------------------------------
    def advance_waves(self, batch: Batch, now: float) -> bool:
        """Open the next wave when the ones before did what they must and soaked; True when
        one opened. The time a wave's condition was first met is kept, so soaking survives
        a restart."""
        policy = batch.policy
        opened = self.open_wave(batch)
        if not policy.waves or opened >= len(policy.waves) - 1:
            return False
        jobs = self.figures.latest_in_batch(batch.name)
        control = self.control(batch.name)
        met_at = dict(control.get("wave_met", {}))
        key = str(opened)
        row = self.state.batches.get(batch.name)
        since = control.get("wave_opened_at") or (row.started_at if row is not None else None)
        if self.settle_seconds and since is not None and now < since + self.settle_seconds:
            return False
        if key not in met_at:
            if not wave_met(policy, wave_figures(policy, batch.name, jobs, opened), opened):
                return False
            met_at[key] = now
            self._set(batch.name, wave_met=met_at)
        if now < met_at[key] + policy.waves[opened].soak_minutes * 60:
            return False
        self._set(batch.name, wave=opened + 1, wave_opened_at=now)
        return True

    def abort_due(self, batch: Batch) -> tuple[str, dict[str, Any]] | None:
        """The halt reason and figures when the batch's failures reached `abort`."""
        rule = batch.policy.abort
        control = self.control(batch.name)
        if rule is None or control.get("paused"):
            return None
        counts = self.figures.counts(batch.name)
        failed, succeeded = counts.get(JobState.FAILED, 0), counts.get(JobState.SUCCEEDED, 0)
        finished = failed + succeeded
        if finished < rule.min_finished or 100 * failed < rule.failure_percent * finished:
            return None
        # Jobs a halt already counted, resumed by an admin, do not halt it again at once.
        if control.get("resumed_at_failed") is not None and failed <= control["resumed_at_failed"]:
            return None
        share = 100 * failed / finished
        reason = (f"{failed} of {finished} finished jobs failed ({share:.0f}% >= "
                  f"abort.failure_percent {rule.failure_percent:g}%)")
        return reason, {"failed": failed, "finished": finished, "failure_percent": round(share, 1)}

    def note_resume(self, batch: Batch) -> None:
        counts = self.figures.counts(batch.name)
        self._set(batch.name, resumed_at_failed=counts.get(JobState.FAILED, 0))

    def retries_due(self, batch: Batch, now: float) -> list[Job]:
        """Failed jobs whose retry time has come, of the kinds listed, within `count`."""
        retry = batch.policy.retry
        if retry is None or not self.state.counts.get(batch.name, {}).get(JobState.FAILED):
            return []
        due = []
        for job in self.state.current.get(batch.name, {}).values():
            if job.state != JobState.FAILED or now < job.updated_at + retry.interval_minutes * 60:
                continue
            if failure_kind(job) in retry.on and self.state.jobs_of(batch.name, job.device) <= retry.count:
                due.append(job)
        return sorted(due, key=lambda job: job.id)

    # -- the view ----------------------------------------------------------------------
    def view(self, batch: Batch, now: float) -> dict[str, Any]:
        return rollout_view(batch, self.control(batch.name), self.state.latest_in_batch.get(batch.name, {}).values(),
                            now, self.schedule(batch, now))


_UNSET: Any = object()


def rollout_view(batch: Batch, control: dict[str, Any], latest_jobs: Iterable[Job], now: float,
                 schedule: tuple[str, float | None] | None = _UNSET) -> dict[str, Any]:
    """What the batch's policy is doing now and why it is not pushing, for status (the
    server's memory or a reading of the database give the same answer). `schedule`: the
    answer of Rollout.schedule when the caller has one; without, it is worked out here (the
    windows keep their last answer, so that costs no cron arithmetic within an opening)."""
    policy = batch.policy
    jobs = list(latest_jobs)
    queued = sum(job.state == JobState.QUEUED for job in jobs)
    view: dict[str, Any] = {"policy": policy.text, "state": "active", "reason": "", "until": None,
                            "queued": queued}
    if control.get("paused"):
        view.update(state="halted" if control.get("by") == "abort" else "paused",
                    reason=control.get("reason", ""), paused_by=control.get("by"),
                    since=format_time(control["at"]) if control.get("at") else None,
                    figures=control.get("figures") or {})
    else:
        block = schedule_block(policy, now) if schedule is _UNSET else schedule
        if block is not None:
            reason, until = block
            view.update(state="scheduled" if reason.startswith("scheduled") else
                        "ended" if reason.startswith("ended") else "outside_window", reason=reason,
                        until=format_time(until) if until else None)
        elif policy.rate_per_minute is not None and queued:
            view.update(state="rate_limited",
                        reason=f"rate-limited ({policy.rate_per_minute}/min) with {queued} queued")
    if policy.waves:
        opened = int(control.get("wave", 0))
        waves = []
        for index, wave in enumerate(policy.waves):
            figures = wave_figures(policy, batch.name, jobs, index, only_this_wave=True)
            waves.append({"wave": index + 1, "percent": wave.percent, "open": index <= opened,
                          "jobs": figures.jobs, "succeeded": figures.succeeded, "finished": figures.finished})
        view["waves"] = waves
        view["wave"] = opened + 1
        if view["state"] == "active" and opened < len(policy.waves) - 1:
            met = control.get("wave_met", {}).get(str(opened))
            wave = policy.waves[opened]
            if met is not None:
                view["reason"] = f"wave {opened + 1} of {len(policy.waves)} soaking; wave {opened + 2} opens " \
                                 f"{format_time(met + wave.soak_minutes * 60)}"
            else:
                wanted = f"{wave.success_percent:g}% succeeded" if wave.success_percent is not None else \
                    "all finished"
                view["reason"] = f"wave {opened + 1} of {len(policy.waves)}; waiting for {wanted} to open " \
                                 f"wave {opened + 2}"
    return view
