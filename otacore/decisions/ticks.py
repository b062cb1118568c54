"""What time moves: rollout waves, halts, windows, rates and retries (once a second), and
jobs whose device went silent (the timeout sweep)."""
from __future__ import annotations

import logging

from otacore.catalog.model import Batch
from otacore.fleet.jobs import Job, JobState
from otacore.protocol.credentials import DeviceId

from . import assignment, batches
from .live import LiveFleet, Send

log = logging.getLogger("ota.engine")

Q, F, C = JobState.QUEUED, JobState.FAILED, JobState.CANCELED


def rollout_tick(live: LiveFleet, now: float | None = None) -> list[Send]:
    """Once a second: open waves, halt at `abort`, retry failures that are due, cancel queued
    jobs past `end_at`, and start what the policy now allows (jobs for devices that were not
    chosen or not allowed yet, pushes for queued jobs, within the rate)."""
    catalog = live.catalog
    if catalog is None:
        return []
    now = live.clock() if now is None else now
    for name in sorted(live.running):
        batch = catalog.batches.get(name)
        if batch is not None and batch.type == "verify":
            # Decided as each job ends in one process; a cluster's coordinator decides here,
            # over the whole fleet's jobs (a no-op where it was decided already).
            batches.check_verification(live, batch, now)
        if batch is None or name not in live.running or (batch.policy.empty
                                                          and not live.rollout.control(name).get("by")):
            continue  # no policy, never paused: everything happened when it was decided
        _tick_batch(live, batch, now)
    return live.take_out()


def batches_reading_figures(live: LiveFleet) -> list[str]:
    """The running batches whose rules read the whole fleet's jobs: waves, `abort`, and
    verifications (what a cluster's coordinator reads from the database before a tick)."""
    catalog = live.catalog
    if catalog is None:
        return []
    return [name for name in sorted(live.running) if (batch := catalog.batches.get(name)) is not None
            and (batch.policy.waves or batch.policy.abort is not None or batch.type == "verify")]


def starts_wanted(live: LiveFleet) -> list[tuple[Batch, int]]:
    """The starts each running, rate-limited and unblocked batch could use now: one per queued
    job (an online device's, when the batch pushes), at most its rate. A batch devices ask for
    keeps one start at hand for the next ask. What a shared rate budget asks grants for."""
    catalog = live.catalog
    if catalog is None:
        return []
    wanted = []
    for name in sorted(live.running):
        batch = catalog.batches.get(name)
        rate = batch.policy.rate_per_minute if batch is not None else None
        if batch is None or rate is None or live.rollout.blocked(batch, live.clock()) is not None:
            continue
        queued = sum(1 for job in live.state.open_in_batch.get(name, {}).values()
                     if job.state == Q and (not batch.push or live.online(job.device)))
        wanted.append((batch, min(queued if batch.push else max(queued, 1), rate)))
    return wanted


def _tick_batch(live: LiveFleet, batch: Batch, now: float) -> None:
    rollout, state = live.rollout, live.state
    if live.decides_batches and rollout.advance_waves(batch, now):
        log.info("batch %s: wave %d opened", batch.name, rollout.open_wave(batch) + 1)
    # A wave opened here, or by the coordinator of a cluster (its shared row says so).
    wave = rollout.open_wave(batch)
    opened_wave = live.wave_seen.get(batch.name, wave) != wave
    live.wave_seen[batch.name] = wave
    batches.halt_if_due(live, batch, now)
    block = rollout.blocked(batch, now)
    if block is not None and block.kind == "ended":
        for job in state.batch_open_jobs(batch.name):
            if job.state == Q:
                state.move(job, C, f"not started before end_at ({block.reason})", now)
    was_open = live.gate_was_open.get(batch.name, False)
    live.gate_was_open[batch.name] = block is None
    if block is not None:
        return
    for job in rollout.retries_due(batch, now):
        _retry_job(live, batch, job, now)
    if opened_wave or not was_open:
        _fill(live, batch, now)
    if batch.push and state.counts.get(batch.name, {}).get(Q):
        for job in state.batch_open_jobs(batch.name):
            if job.state == Q and live.online(job.device):
                if rollout.rate_left(batch, now) == 0:
                    break
                assignment.push(live, job, now)


def _retry_job(live: LiveFleet, batch: Batch, job: Job, now: float) -> None:
    assert batch.policy.retry is not None
    state = live.state
    tries = state.jobs_of(batch.name, job.device)
    state.move(job, F, f"retry {tries} of {batch.policy.retry.count} (retry policy)", now, superseded=1)
    version = state.version(job.device, job.module)
    if version is not None and state.open_job(job.device, job.module) is None:
        assignment.give_job(live, job.device, job.module, version, now, deliver=True)


def _fill(live: LiveFleet, batch: Batch, now: float) -> None:
    """Jobs for the devices the batch may take now and has not: those not chosen or not allowed
    when they reported (a wave opened, a pause ended, a window opened)."""
    catalog = live.catalog
    assert catalog is not None
    package = catalog.packages[batch.package]
    known = live.state.reported_versions(package.product, package.module)
    names = batch.devices if batch.devices is not None else list(known)
    for name in names:
        version = known.get(name)
        device = DeviceId(package.product, name)
        if version is None or live.state.open_job(device, package.module) is not None:
            continue
        assignment.give_job(live, device, package.module, version, now, deliver=True)


def fail_stale_jobs(live: LiveFleet, now: float | None = None) -> tuple[int, list[Send]]:
    """Fail jobs whose device went silent for longer than its batch's `timeout_minutes`. Queued
    jobs never time out: their device has not been told yet; a download under way is activity too."""
    catalog, state = live.catalog, live.state
    if catalog is None:
        return 0, []
    now = live.clock() if now is None else now
    failed = 0
    for batch in list(catalog.batches.values()):
        if batch.timeout_minutes is None or batch.name not in live.running:
            continue
        cutoff = now - batch.timeout_minutes * 60
        for job in state.batch_open_jobs(batch.name):
            if job.state == Q or job.updated_at >= cutoff or live.downloads.in_flight(job.id):
                continue
            state.move(job, F, f"no report for {batch.timeout_minutes} min (timeout_minutes)", now,
                       message=f"timed out in state {job.state}")
            failed += 1
            batches.after_final(live, job, now)
    return failed, live.take_out()
