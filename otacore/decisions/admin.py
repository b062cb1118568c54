"""What admins do to a batch: retry failed devices, cancel devices, pause and resume."""
from __future__ import annotations

import logging
from typing import Any

from otacore.catalog.model import Batch
from otacore.errors import Refused
from otacore.fleet.batches import CONTROLLABLE_STATES
from otacore.fleet.jobs import JobState
from otacore.protocol.credentials import DeviceId

from . import assignment, batches, ticks
from .live import LiveFleet, Send

log = logging.getLogger("ota.engine")

F, C = JobState.FAILED, JobState.CANCELED


def retry(live: LiveFleet, batch_name: str, device_names: list[str] | None = None) -> tuple[int, list[Send]]:
    """Give failed devices of a running batch another job: now, if their last reported version
    still qualifies (pushed when online and the batch pushes), else on their next report."""
    catalog, state, now = live.catalog, live.state, live.clock()
    batch = catalog.batches.get(batch_name) if catalog else None
    if batch is None or catalog is None:
        raise Refused(404, f"no batch named {batch_name!r} in the catalog")
    if batch_name not in live.running:
        raise Refused(409, f"batch {batch_name!r} is not running")
    package = catalog.packages[batch.package]
    failed = [job for job in state.current.get(batch_name, {}).values() if job.state == F
              and (device_names is None or job.device.device_name in device_names) and live.holds(job.device)]
    for job in sorted(failed, key=lambda j: j.id):
        state.move(job, F, "retry requested by an admin", now, superseded=1)
        version = state.version(job.device, job.module)
        if version is not None and state.open_job(job.device, job.module) is None:
            assignment.give_job(live, job.device, package.module, version, now, deliver=True)
    log.info("batch %s: %d failed job(s) retried", batch_name, len(failed))
    return len(failed), live.take_out()


def cancel_devices(live: LiveFleet, batch_name: str, device_names: list[str]) -> tuple[int, list[Send]]:
    """Cancel these devices in a batch: their open jobs, or, for a device with no job yet, a
    canceled placeholder, so the batch does not take it later."""
    catalog, state, now = live.catalog, live.state, live.clock()
    batch = catalog.batches.get(batch_name) if catalog else None
    if batch is None or catalog is None:
        raise Refused(404, f"no batch named {batch_name!r} in the catalog")
    package = catalog.packages[batch.package]
    product = catalog.products[package.product]
    strangers = [name for name in device_names if not product.has_device(name)
                 or (batch.devices is not None and name not in batch.devices)]
    if strangers:
        raise Refused(404, f"not devices of batch {batch_name!r}: {', '.join(strangers)}")
    canceled = 0
    for name in dict.fromkeys(device_names):
        device = DeviceId(package.product, name)
        if not live.holds(device):
            continue  # another worker's: it cancels it (the request reaches every worker)
        job = state.latest_job_in_batch(batch_name, device)
        if job is not None and job.is_open:
            state.move(job, C, "canceled by an admin", now)
            canceled += 1
            batches.after_final(live, job, now)
        elif job is None or job.superseded:  # no job, or only one a later job may replace
            version = state.version(device, package.module) or ""
            placeholder = live.new_job(device, package, version, C)
            canceled += state.create_job(batch_name, placeholder, "canceled by an admin before it started",
                                         now) is not None
    return canceled, live.take_out()  # a verification a cancel ends may start batches


def pause(live: LiveFleet, batch_name: str, reason: str = "paused by an admin") -> list[Send]:
    batch = _controllable(live, batch_name)
    live.rollout.pause(batch.name, "admin", reason, live.clock())
    log.info("batch %s paused by an admin", batch.name)
    return live.take_out()


def resume(live: LiveFleet, batch_name: str) -> list[Send]:
    """Resume a batch paused by hand, by its catalog or halted by `abort`."""
    batch, now = _controllable(live, batch_name), live.clock()
    if live.rollout.control(batch.name).get("by") == "abort":
        live.rollout.note_resume(batch)  # the failures that halted it do not halt it again
    live.rollout.resume(batch.name, "admin", "resumed by an admin", now)
    log.info("batch %s resumed by an admin", batch.name)
    live.gate_was_open.pop(batch.name, None)
    return ticks.rollout_tick(live, now)


def _controllable(live: LiveFleet, batch_name: str) -> Batch:
    batch = live.catalog.batches.get(batch_name) if live.catalog else None
    if batch is None:
        raise Refused(404, f"no batch named {batch_name!r} in the catalog")
    row = live.state.batches.get(batch_name)
    if row is None or row.state not in CONTROLLABLE_STATES:
        raise Refused(409, f"batch {batch_name!r} is {row.state if row else 'not started'}; nothing to pause")
    return batch


def rollout_view(live: LiveFleet, batch_name: str) -> dict[str, Any] | None:
    batch = live.catalog.batches.get(batch_name) if live.catalog else None
    return live.rollout.view(batch, live.clock()) if batch is not None else None
