"""What a device gets now, and handing it out: pushed to its session, or on request.

`assignment_for` is the one answer to "which batch would give this device a job now"; it
changes nothing. `give_job` acts on it (creates the job), `push` and `hand_out` tell the
device, each through the same steps: may the job start now (pause, schedule, window, rate),
spend its start against the rate, keep its file current, describe it, mark it `notified`.
"""
from __future__ import annotations

import logging
from typing import Any

from otacore.catalog.model import Batch, Catalog, Package
from otacore.fleet.eligibility import batch_priority, candidate_batches, wants
from otacore.fleet.jobs import Job, JobState
from otacore.fleet.rollout import Rollout
from otacore.fleet.state import FleetState
from otacore.protocol.codec import encode_json
from otacore.protocol.credentials import DeviceId
from otacore.protocol.offers import offer_data
from otacore.protocol.topics import upgrade_topic

from .live import LiveFleet, Send

log = logging.getLogger("ota.engine")

Q, N, I, C = JobState.QUEUED, JobState.NOTIFIED, JobState.INSTALLED, JobState.CANCELED


# -- the answer, with no side effect ------------------------------------------------------
def chooses(catalog: Catalog, rollout: Rollout, batch: Batch, package: Package, device: DeviceId, module: str,
            version: str) -> bool:
    """Does the batch want this device on this version, and does its policy choose the device
    now (tags, percent, opened waves)?"""
    return wants(batch, package, device, module, version) and rollout.member(catalog, batch, device)


def assignment_for(catalog: Catalog, state: FleetState, rollout: Rollout, device: DeviceId, module: str,
                   version: str, now: float) -> Batch | None:
    """The batch that would give this device, with no open job for `module`, a job now: the
    best running batch that wants its version, lists it (static batches), has not given it a
    job already, whose policy chooses it and that starts jobs now. None: nothing, or not yet
    (the rollout tick brings what a policy holds back)."""
    for batch in candidate_batches(catalog, state.running, device, module, version):
        if batch.mode == "static" and device.device_name not in state.targets.get(batch.name, ()):
            continue
        if state.current_job(batch.name, device) is not None:
            continue
        if not rollout.member(catalog, batch, device) or rollout.blocked(batch, now) is not None:
            continue
        return batch
    return None


def yields_to(live: LiveFleet, job: Job, batch: Batch) -> bool:
    """May `batch` take this device from `job`? Only a job not yet told, of a batch that ranks
    lower (verify first, then the later batch in the file)."""
    current = live.batch_of(job)
    return job.state == Q and (current is None or batch_priority(current) < batch_priority(batch))


def may_start(live: LiveFleet, job: Job, now: float) -> bool:
    """May this job go to its device now? A queued one only when its batch's policy allows
    (pause, schedule, window, rate); only asks."""
    batch = live.batch_of(job)
    return job.state != Q or batch is None or live.rollout.may_start(batch, now)


# -- acting on it ---------------------------------------------------------------------------
def give_job(live: LiveFleet, device: DeviceId, module: str, version: str, now: float, *,
             deliver: bool) -> Job | None:
    """Give a device with no open job for `module` a job from `assignment_for`; pushed at
    once when `deliver` and the batch pushes."""
    catalog, state = live.catalog, live.state
    assert catalog is not None
    batch = assignment_for(catalog, state, live.rollout, device, module, version, now)
    if batch is None:
        return None
    package = catalog.packages[batch.package]
    job = state.create_job(batch.name, live.new_job(device, package, version),
                           f"reported {version}; batch {batch.name} targets it", now)
    if job is None:
        return state.open_job(device, module)
    log.debug("job %d: %s %s -> %s in batch %s", job.id, device, version, package.version, batch.name)
    if deliver and batch.push:
        push(live, job, now)
    return job


def push(live: LiveFleet, job: Job, now: float) -> None:
    """Send the upgrade push (b) when the device is connected; it is then `notified`."""
    if not live.online(job.device):
        return  # the push waits for its next report
    if not may_start(live, job, now):
        return  # queued: the rollout tick pushes it when its turn comes
    _note_start(live, job, now)
    data = _describe(live, job, now)
    if data is None:
        return
    message = {"code": "1000", "id": live.next_push_id(), "message": "success", "data": data}
    live.send(Send(job.device, upgrade_topic(job.device), encode_json(message)))
    _told(live, job, "upgrade pushed", now)


def hand_out(live: LiveFleet, device: DeviceId, module: str) -> dict[str, Any]:
    """What this device gets now, on request (firmware/get, HTTP get_ota_info): its open
    job's data, or a new job for its last reported version; {} for nothing (or not now)."""
    now, state = live.clock(), live.state
    job = state.open_job(device, module)
    if job is not None and job.batch not in live.running:
        state.move(job, C, f"batch {job.batch} is no longer running", now)
        job = None
    if job is None:
        version = state.version(device, module)
        if version is None:
            return {}
        job = give_job(live, device, module, version, now, deliver=False)
        if job is None:
            return {}
    if job.state == I:
        return {}
    if not may_start(live, job, now):
        return {}  # "not now": it gets the job when its turn comes (pushed, if the batch pushes)
    _note_start(live, job, now)
    data = _describe(live, job, now)
    if data is None:
        state.move(job, C, "its batch or file left the catalog", now)
        return {}
    _told(live, job, "upgrade info handed out on request", now)
    return data


def _note_start(live: LiveFleet, job: Job, now: float) -> None:
    """A queued job starts: it counts against its batch's rate."""
    batch = live.batch_of(job)
    if job.state == Q and batch is not None:
        live.rollout.note_start(batch, now)


def _describe(live: LiveFleet, job: Job, now: float) -> dict[str, Any] | None:
    """The `data` of a push / firmware-get reply / get_ota_info answer for this job, its file
    made current first; None when its batch or file is no longer in the catalog."""
    _refresh_file(live, job, now)
    catalog = live.catalog
    package = catalog.packages.get(job.package_id) if catalog else None
    batch = live.batch_of(job)
    download = live.file_of(job)
    if package is None or batch is None or download is None:
        return None
    url = None if batch.protocol == "mqtt" else live.downloads.url(
        live.settings.base_url(batch.protocol), download, job, live.settings.url_ttl_seconds)
    return offer_data(package, download, url=url, stream_id=job.id)


def _refresh_file(live: LiveFleet, job: Job, now: float) -> None:
    """A job keeps the file it was given; only if a reload removed that file (a dropped
    `diff_from`) does it move to what the catalog now offers for its version."""
    catalog, files = live.catalog, live.files
    package = catalog.packages.get(job.package_id) if catalog else None
    if files is None or package is None or files.by_key(job.file_key) is not None:
        return
    download = files.download_for(package, job.from_version)
    live.state.move(job, job.state, "its file left the catalog; now " + download.key, now,
                    file_key=download.key, file_size=download.digest.size)


def _told(live: LiveFleet, job: Job, reason: str, now: float) -> None:
    if job.state == Q:
        live.state.move(job, N, reason, now)
