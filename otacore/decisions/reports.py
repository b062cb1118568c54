"""What devices report: the version they run (inform) and how an upgrade goes (progress)."""
from __future__ import annotations

import logging

from otacore.fleet.eligibility import device_in_scope, wants
from otacore.fleet.jobs import Job, JobState
from otacore.protocol.credentials import DeviceId

from . import assignment, batches
from .live import LiveFleet, Send

log = logging.getLogger("ota.engine")

Q, N, P, I, S, F, C = (JobState.QUEUED, JobState.NOTIFIED, JobState.IN_PROGRESS, JobState.INSTALLED,
                       JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED)


def report_version(live: LiveFleet, device: DeviceId, module: str, version: str, *,
                   deliver: bool = True) -> list[Send]:
    if not live.knows_module(device, module):
        # Not recorded: module names are the device's to choose, the database is ours.
        log.info("version report from %s for module %r ignored: the product has no such module", device, module)
        return []
    now, state = live.clock(), live.state
    state.record_version(device, module, version, now)
    job = state.open_job(device, module)
    if job is None:
        if not _late_success(live, device, module, version, now) and \
                assignment.give_job(live, device, module, version, now, deliver=deliver) is None:
            _count_as_verified(live, device, module, version, now)
    elif version == job.target_version:
        state.move(job, S, f"device reported target version {version}", now, progress=100)
        log.debug("job %d: %s upgraded to %s", job.id, device, version)
        batches.after_final(live, job, now)
    elif job.state == I:
        state.move(job, F, f"device reported {version} after installing {job.target_version}: the new "
                   "image did not boot", now, message=f"reported {version} after install")
        batches.after_final(live, job, now)
    else:
        _version_during_job(live, job, version, now, deliver)
    return live.take_out()


def _late_success(live: LiveFleet, device: DeviceId, module: str, version: str, now: float) -> bool:
    """A device whose last job failed (e.g. timed out while it was still working) and that now
    reports that job's target version did upgrade: the job succeeded after all."""
    failed = [job for job in (live.state.current_job(name, device) for name in live.running)
              if job is not None and job.module == module and job.state == F and job.target_version == version]
    if not failed:
        return False
    job = max(failed, key=lambda j: j.id)  # its latest failure; a placeholder elsewhere does not hide it
    live.state.move(job, S, f"device reported target version {version} after the job had failed", now, progress=100)
    batches.after_final(live, job, now)
    return True


def _count_as_verified(live: LiveFleet, device: DeviceId, module: str, version: str, now: float) -> None:
    """A device listed in a running verify batch that already runs the package's version counts
    as succeeded there, so verification can complete."""
    catalog = live.catalog
    assert catalog is not None
    for batch in list(catalog.batches.values()):
        package = catalog.packages[batch.package]
        if batch.type != "verify" or batch.name not in live.running or package.version != version \
                or not device_in_scope(batch, package, device, module):
            continue
        job = live.state.create_job(batch.name, live.new_job(device, package, version, S),
                                    f"reported {version}: already on the package version", now)
        if job is not None:
            batches.after_final(live, job, now)


def _version_during_job(live: LiveFleet, job: Job, version: str, now: float, deliver: bool) -> None:
    """A device with an open job reported a version again, typically after a reboot."""
    catalog, files = live.catalog, live.files
    assert catalog is not None and files is not None
    batch = catalog.batches.get(job.batch)
    package = catalog.packages.get(job.package_id)
    if batch is None or package is None or job.batch not in live.running or \
            not wants(batch, package, job.device, job.module, version):
        live.state.move(job, C, f"device now reports {version}, which batch {job.batch} does not target",
                        now, superseded=1)
        batches.after_final(live, job, now)
        assignment.give_job(live, job.device, job.module, version, now, deliver=deliver)
        return
    if version != job.from_version:
        download = files.download_for(package, version)
        live.state.move(job, job.state, f"device now reports {version}", now, from_version=version,
                        file_key=download.key, file_size=download.digest.size)
    else:
        live.state.touch(job, now)  # a report is activity: the timeout counts from here
    if deliver and batch.push:
        assignment.push(live, job, now)


def report_progress(live: LiveFleet, device: DeviceId, module: str, step: int, desc: str) -> list[Send]:
    now, state = live.clock(), live.state
    job = state.open_job(device, module)
    if job is None:
        log.info("progress %d from %s module %s ignored: no open job", step, device, module)
        return []
    if step < 0:
        state.move(job, F, f"device reported step {step}: {desc}", now, code=step, message=desc)
        log.info("job %d: %s failed with step %d (%s)", job.id, device, step, desc)
        batches.after_final(live, job, now)
    elif step == 100:
        state.move(job, I, "device reported 100: installed, rebooting", now, progress=100, message=desc)
    elif job.state == I:
        log.info("progress %d from %s after install ignored", step, device)
    elif job.state == P:
        state.update(job, now, progress=step, message=desc)  # telemetry: the latest value is enough
    else:  # step 0 is "started" (Aliyun's C Link SDK 4.x sends it as a download begins)
        state.move(job, P, "device started the upgrade (step 0)" if step == 0 else f"device reported {step}%",
                   now, progress=step, message=desc)
    return live.take_out()
