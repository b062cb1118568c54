"""Batches starting and stopping: a (re)loaded catalog made live, a verification deciding its
package, the `abort` halt, and what a job's end means for its batch.

`reload_action` is the one answer to "what does applying the catalog do with this batch";
`otactl plan` (otacore/cli/plan.py) asks it too.
"""
from __future__ import annotations

import logging

from otacore.catalog.model import Batch, Catalog, Package
from otacore.downloads.package_files import PackageFiles
from otacore.fleet.batches import ENDED_STATES, BatchState
from otacore.fleet.eligibility import batch_priority, version_qualifies, wants
from otacore.fleet.jobs import Job, JobState
from otacore.fleet.state import BatchRow
from otacore.protocol.credentials import DeviceId

from . import assignment
from .live import LiveFleet, Send

log = logging.getLogger("ota.engine")

S, F, C = JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED


# -- what a reload does, with no side effect ------------------------------------------------
def reload_action(batch: Batch, package: Package, row: BatchRow | None, package_status: str) -> BatchState | None:
    """The state a batch of the catalog enters when the catalog is applied: running, or
    waiting_verification (an upgrade of a package to verify first); None when it keeps the
    state it has (running, or ended)."""
    if row is not None and (row.state == BatchState.RUNNING or row.state in ENDED_STATES):
        return None
    if batch.type == "upgrade" and package.verify and package_status != "verified":
        return BatchState.WAITING_VERIFICATION
    return BatchState.RUNNING


def leaving(catalog: Catalog, batches: dict[str, BatchRow]) -> list[BatchRow]:
    """Batches that left the catalog and are not spent yet: applying it cancels them."""
    return [row for name, row in batches.items()
            if name not in catalog.batches and row.state != BatchState.CANCELED and not row.control.get("removed")]


# -- acting on it -----------------------------------------------------------------------------
def apply_catalog(live: LiveFleet, catalog: Catalog, files: PackageFiles) -> list[Send]:
    """Make a validated catalog the live one: stop removed batches, start new ones."""
    now = live.clock()
    live.catalog, live.files = catalog, files
    state = live.state
    for row in leaving(catalog, state.batches):
        cancel_batch(live, row.name, "batch removed from the catalog", now,
                     end_batch=row.state != BatchState.COMPLETED)
    for batch in sorted(catalog.batches.values(), key=batch_priority, reverse=True):
        row = state.batches.get(batch.name)
        package = catalog.packages[batch.package]
        action = reload_action(batch, package, row, live.package_status(package))
        if action is None:
            if row is not None and row.state == BatchState.RUNNING and batch.mode == "static" \
                    and batch.devices is not None:  # a reload may add listed devices
                state.add_targets(batch.name, package.product, list(batch.devices))
        elif action == BatchState.WAITING_VERIFICATION:
            state.save_batch(batch.name, package.id, live.fingerprint(batch), action, "package not verified yet", now)
        else:
            start_batch(live, batch, package, now)
    for batch in catalog.batches.values():
        live.rollout.apply_catalog(batch, now)
        live.gate_was_open.pop(batch.name, None)  # the next tick looks at everyone again
        if batch.name in live.running:
            _drop_unlisted(live, batch, now)
            if batch.type == "verify":
                check_verification(live, batch, now)
    return live.take_out()


def _drop_unlisted(live: LiveFleet, batch: Batch, now: float) -> None:
    """A reload that narrows a running batch's device list cancels the others' open jobs."""
    if batch.devices is None:
        return
    for job in live.state.batch_open_jobs(batch.name):
        if job.device.device_name not in batch.devices:
            live.state.move(job, C, "removed from the batch's device list", now)


def start_batch(live: LiveFleet, batch: Batch, package: Package, now: float) -> None:
    state = live.state
    known = state.reported_versions(package.product, package.module)
    if batch.devices is not None:
        names = list(batch.devices)
    else:
        names = [n for n, v in known.items() if version_qualifies(batch, package, v)]
    state.save_batch(batch.name, package.id, live.fingerprint(batch), BatchState.RUNNING, "started", now)
    if batch.mode == "static":
        state.add_targets(batch.name, package.product, names)
    live.rollout.apply_catalog(batch, now)
    block = live.rollout.blocked(batch, now)
    if block is not None:
        log.info("batch %s started; no jobs yet: %s", batch.name, block.reason)
        return  # the rollout tick gives devices their jobs once it may
    log.info("batch %s started (%s %s, %s, push %s)", batch.name, package.id, batch.protocol, batch.mode,
             "on" if batch.push else "off")
    verified = give_started_jobs(live, batch, package, names, now)
    if verified:
        check_verification(live, batch, now)


def give_started_jobs(live: LiveFleet, batch: Batch, package: Package, names: list[str] | None, now: float) -> int:
    """Jobs for the devices this process holds that a batch just started takes (`names`: its
    list; None: every device that reported a version it targets); returns how many devices
    a verify batch found already on its version."""
    state = live.state
    known = state.reported_versions(package.product, package.module)
    if names is None:
        names = [n for n, v in known.items() if version_qualifies(batch, package, v)]
    reason = f"batch {batch.name} started; device reported a version it targets"
    created = verified = 0
    for name in names:
        version = known.get(name)
        if version is None:
            continue  # offline or never reported: it gets its job when it reports
        device = DeviceId(package.product, name)
        if not live.rollout.member(live.catalog, batch, device):
            continue  # outside the batch's tags, percent or opened waves
        if batch.type == "verify" and version == package.version:
            verified += state.create_job(batch.name, live.new_job(device, package, version, S), reason,
                                         now) is not None
        elif wants(batch, package, device, package.module, version):
            current = state.open_job(device, package.module)
            if current is not None and assignment.yields_to(live, current, batch):
                state.move(current, C, f"batch {batch.name} comes first", now, superseded=1)
            job = state.create_job(batch.name, live.new_job(device, package, version), reason, now)
            if job is not None:
                created += 1
                if batch.push:
                    assignment.push(live, job, now)
    log.info("batch %s: %d jobs created", batch.name, created + verified)
    return verified


def cancel_batch(live: LiveFleet, name: str, reason: str, now: float, *, end_batch: bool = True) -> None:
    for job in live.state.batch_open_jobs(name):
        live.state.move(job, C, reason, now)
    if end_batch:
        live.state.end_batch(name, BatchState.CANCELED, reason, now)
    else:  # a completed batch stays "completed", and its name is spent all the same
        live.state.set_control(name, {"removed": True})
    log.info("batch %s canceled: %s", name, reason)


# -- a job ended --------------------------------------------------------------------------------
def after_final(live: LiveFleet, job: Job, now: float) -> None:
    """A job ended: its verify batch may now decide its package's status, its batch may halt.
    (In a cluster the coordinator's tick asks, over the whole fleet's jobs.)"""
    batch = live.batch_of(job)
    if batch is None or not live.decides_batches:
        return
    if batch.type == "verify":
        check_verification(live, batch, now)
    halt_if_due(live, batch, now)


def halt_if_due(live: LiveFleet, batch: Batch, now: float) -> None:
    if not live.decides_batches:
        return
    due = live.rollout.abort_due(batch)
    if due is not None:
        reason, figures = due
        live.rollout.pause(batch.name, "abort", reason, now, **figures)
        log.warning("batch %s halted: %s; `otactl resume %s` resumes it", batch.name, reason, batch.name)


def check_verification(live: LiveFleet, batch: Batch, now: float) -> None:
    """`verified` once every listed device succeeded, `verify_failed` at the first failure
    (a canceled job decides nothing)."""
    catalog, state = live.catalog, live.state
    assert catalog is not None
    if batch.devices is None or batch.name not in live.running or not live.decides_batches:
        return
    jobs = {j.device.device_name: j for j in live.rollout.figures.latest_in_batch(batch.name) if j.state != C}
    if any(j.state == F and name in batch.devices for name, j in jobs.items()):
        status = "verify_failed"
    elif all(name in jobs and jobs[name].state == S for name in batch.devices):
        status = "verified"
    else:
        return
    package = catalog.packages[batch.package]
    state.set_package_status(package.id, status, live.current_sha(package))
    state.end_batch(batch.name, BatchState.COMPLETED, status, now)
    for other in state.batch_open_jobs(batch.name):
        state.move(other, C, f"verification ended: {status}", now)
    log.info("package %s is %s (verify batch %s)", batch.package, status, batch.name)
    if status == "verified":
        _start_waiting(live, package, now)


def _start_waiting(live: LiveFleet, package: Package, now: float) -> None:
    catalog = live.catalog
    assert catalog is not None
    for batch in sorted(catalog.batches.values(), key=batch_priority, reverse=True):
        row = live.state.batches.get(batch.name)
        if batch.package == package.id and row is not None and row.state == BatchState.WAITING_VERIFICATION:
            start_batch(live, batch, package, now)
