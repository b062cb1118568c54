"""What a worker that does not decide batches does (cluster mode, docs/cluster.md): the
coordinator decides batch starts, halts, waves and verifications over the whole fleet and
commits them as shared rows; every other worker takes those rows and the catalog version the
coordinator applied, and does for the devices it holds what the change means (a started
batch gives them jobs, an ended one cancels their open jobs, a narrowed list drops them).
The coordinator's own devices are served by its own decisions (batches.py).
"""
from __future__ import annotations

import logging

from otacore.catalog.model import Catalog
from otacore.downloads.package_files import PackageFiles
from otacore.fleet.batches import ENDED_STATES, BatchState
from otacore.fleet.jobs import JobState
from otacore.fleet.state import BatchRow
from otacore.protocol.credentials import DeviceId

from . import assignment, batches
from .live import LiveFleet, Send

log = logging.getLogger("ota.engine")

C = JobState.CANCELED


def follow_catalog(live: LiveFleet, catalog: Catalog, files: PackageFiles) -> list[Send]:
    """Take the catalog the coordinator applied: cancel the jobs of batches that left it and of
    devices a running batch no longer lists."""
    now = live.clock()
    live.catalog, live.files = catalog, files
    for name in [name for name in live.state.open_in_batch if name not in catalog.batches]:
        for job in live.state.batch_open_jobs(name):
            live.state.move(job, C, "batch removed from the catalog", now)
    for batch in catalog.batches.values():
        live.gate_was_open.pop(batch.name, None)  # the next tick looks at everyone again
        live.followed.pop(batch.name, None)  # its row is acted on again: it may have started with this version
        if batch.name in live.running and batch.devices is not None:
            for job in live.state.batch_open_jobs(batch.name):
                if job.device.device_name not in batch.devices:
                    live.state.move(job, C, "removed from the batch's device list", now)
    return live.take_out()


def follow_rows(live: LiveFleet, rows: dict[str, BatchRow], package_status: dict[str, tuple[str, str]],
                targets: dict[str, set[str]]) -> list[Send]:
    """Take the shared batch rows, package statuses and targets the coordinator committed, and
    act for this worker's devices: jobs in batches that started, cancels in ones that ended."""
    state, now = live.state, live.clock()
    state.replace_shared(rows, package_status, targets)
    catalog = live.catalog
    if catalog is None:
        return live.take_out()
    for name, row in rows.items():
        batch = catalog.batches.get(name)
        # A batch the catalog does not hold yet is acted on once the version holding it arrives
        # (the coordinator publishes a version after committing what it decided with it).
        if batch is None or live.followed.get(name) == row.state:
            continue
        live.followed[name] = row.state
        if row.state == BatchState.RUNNING:
            package = catalog.packages[batch.package]
            if live.rollout.blocked(batch, now) is None:
                names = list(batch.devices) if batch.devices is not None else None
                batches.give_started_jobs(live, batch, package, names, now)
        elif row.state in ENDED_STATES:
            for job in state.batch_open_jobs(name):
                state.move(job, C, f"batch {row.state}: {row.reason}" if row.reason else f"batch {row.state}", now)
    return live.take_out()


def take_devices(live: LiveFleet, devices: set[DeviceId]) -> list[Send]:
    """Devices this worker now holds (their partition moved here): the jobs their batches owe
    them and a worker that went down had not committed (what it had committed came with them)."""
    state, now = live.state, live.clock()
    if live.catalog is None:
        return []
    for (device, module), (version, _) in list(state.versions.items()):
        if device in devices and state.open_job(device, module) is None:
            assignment.give_job(live, device, module, version, now, deliver=True)
    return live.take_out()
