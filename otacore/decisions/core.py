"""Every decision of the OTA engine, as plain synchronous functions over the state in memory.

A decision (a version report, a progress report, an offer, a batch start, a reload, a
timeout, a retry, a cancel) reads and changes `FleetState` and returns the messages to
send. It never awaits, so no other decision runs in the middle of one and no locks are
needed. The caller (engine.py) commits what changed before sending what names it.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from otacore.catalog.model import Batch, Catalog, Package
from otacore.protocol.codec import encode_json
from otacore.protocol.credentials import DeviceId
from otacore.downloads.serving import Downloads
from otacore.fleet.eligibility import batch_priority, candidate_batches, device_in_scope, version_qualifies, wants
from otacore.errors import Refused
from otacore.fleet.state import FleetState
from otacore.fleet.jobs import Job, JobState, NewJob
from otacore.protocol.offers import offer_data
from otacore.downloads.package_files import DownloadFile, PackageFiles
from otacore.catalog.reload_rules import batch_fingerprint
from otacore.fleet.rollout import Rollout
from otacore.config.settings import Settings
from otacore.protocol.topics import upgrade_topic

log = logging.getLogger("ota.engine")

Q, N, P, I, S, F, C = (JobState.QUEUED, JobState.NOTIFIED, JobState.IN_PROGRESS, JobState.INSTALLED,
                       JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED)


PUSH_IDS = "push_ids"  # the counter of push ids handed out (reserved ahead)
PUSH_ID_MAX = 2**31 - 1
PUSH_ID_BLOCK = 10_000  # ids reserved per database write; a restart skips what is left of one


@dataclass(frozen=True)
class Send:
    """A message for one device's live session."""

    device: DeviceId
    topic: str
    payload: bytes
    qos: int = 1


class OtaCore:
    """The live catalog and the fleet's state, and the decisions over them."""

    def __init__(self, settings: Settings, state: FleetState, downloads: Downloads,
                 online: Callable[[DeviceId], bool], clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.state = state
        self.downloads = downloads
        self.online = online
        self.clock = clock
        self.catalog: Catalog | None = None
        self.files: PackageFiles | None = None
        self.running: set[str] = set()
        self._last_push_id = state.counters.get(PUSH_IDS, 0)  # ids up to it may have left before a restart
        self._out: list[Send] = []
        self.rollout = Rollout(state)
        self._gate_was_open: dict[str, bool] = {}  # batch -> could it start jobs at the last tick

    def _take_out(self) -> list[Send]:
        out, self._out = self._out, []
        return out

    # -- helpers -----------------------------------------------------------------------
    def _new_job(self, device: DeviceId, package: Package, version: str, state: JobState = Q) -> NewJob:
        assert self.files is not None
        download = self.files.download_for(package, version)
        return NewJob(device, package.module, package.id, version, package.version, download.key,
                      download.digest.size, state)

    def _fingerprint(self, batch: Batch) -> dict[str, str]:
        assert self.catalog is not None and self.files is not None
        return batch_fingerprint(batch, self.catalog.packages[batch.package], self.files)

    def current_sha(self, package: Package) -> str:
        """SHA-256 of the package's image as the live catalog serves it."""
        assert self.files is not None
        return self.files.download_for(package, None).digest.sha256

    def package_status(self, package: Package) -> str:
        """`verified` / `verify_failed` as earned by this very file; otherwise `unverified`."""
        status, sha256 = self.state.package_status.get(package.id, ("unverified", ""))
        return status if sha256 == self.current_sha(package) else "unverified"

    def file_of(self, job: Job) -> DownloadFile | None:
        """The file this job was given (None once a reload removed it)."""
        return self.files.by_key(job.file_key) if self.files else None

    def _yields_to(self, job: Job, batch: Batch) -> bool:
        """May `batch` take this device from `job`? Only a job not yet told, of a batch
        that ranks lower (verify first, then the later batch in the file)."""
        assert self.catalog is not None
        current = self.catalog.batches.get(job.batch)
        return job.state == Q and (current is None or batch_priority(current) < batch_priority(batch))

    def _knows_module(self, device: DeviceId, module: str) -> bool:
        product = self.catalog.products.get(device.product_key) if self.catalog else None
        return product is not None and module in product.modules

    # -- the catalog: apply a (re)loaded one ---------------------------------------------
    def apply_catalog(self, catalog: Catalog, files: PackageFiles) -> list[Send]:
        """Make a validated catalog the live one: stop removed batches, start new ones."""
        now = self.clock()
        self.catalog, self.files = catalog, files
        self.running &= set(catalog.batches)
        state = self.state
        for name, row in list(state.batches.items()):
            if name not in catalog.batches and row.state != "canceled" and not row.control.get("removed"):
                self._cancel_batch(name, "batch removed from the catalog", now, end_batch=row.state != "completed")
        for batch in sorted(catalog.batches.values(), key=batch_priority, reverse=True):
            row = state.batches.get(batch.name)
            package = catalog.packages[batch.package]
            if row is not None and row.state in ("running", "completed"):
                if row.state == "running":
                    self.running.add(batch.name)
                    if batch.mode == "static" and batch.devices is not None:  # a reload may add listed devices
                        state.add_targets(batch.name, package.product, list(batch.devices))
                continue
            if batch.type == "upgrade" and package.verify and self.package_status(package) != "verified":
                state.save_batch(batch.name, package.id, self._fingerprint(batch), "waiting_verification",
                                 "package not verified yet", now)
                continue
            self._start_batch(batch, package, now)
        for batch in catalog.batches.values():
            self.rollout.apply_catalog(batch, now)
            self._gate_was_open.pop(batch.name, None)  # the next tick looks at everyone again
            if batch.name in self.running:
                self._drop_unlisted(batch, now)
                if batch.type == "verify":
                    self._check_verification(batch, now)
        return self._take_out()

    def _drop_unlisted(self, batch: Batch, now: float) -> None:
        """A reload that narrows a running batch's device list cancels the others' open jobs."""
        if batch.devices is None:
            return
        for job in self.state.batch_open_jobs(batch.name):
            if job.device.device_name not in batch.devices:
                self.state.move(job, C, "removed from the batch's device list", now)

    def _start_batch(self, batch: Batch, package: Package, now: float) -> None:
        state = self.state
        known = state.reported_versions(package.product, package.module)
        if batch.devices is not None:
            names = list(batch.devices)
        else:
            names = [n for n, v in known.items() if version_qualifies(batch, package, v)]
        state.save_batch(batch.name, package.id, self._fingerprint(batch), "running", "started", now)
        if batch.mode == "static":
            state.add_targets(batch.name, package.product, names)
        self.running.add(batch.name)
        self.rollout.apply_catalog(batch, now)
        block = self.rollout.blocked(batch, now)
        if block is not None:
            log.info("batch %s started; no jobs yet: %s", batch.name, block.reason)
            return  # the rollout tick gives devices their jobs once it may
        log.info("batch %s started (%s %s, %s, push %s)", batch.name, package.id, batch.protocol, batch.mode,
                 "on" if batch.push else "off")
        reason = f"batch {batch.name} started; device reported a version it targets"
        created = verified = 0
        for name in names:
            version = known.get(name)
            if version is None:
                continue  # offline or never reported: it gets its job when it reports
            device = DeviceId(package.product, name)
            if not self.rollout.member(self.catalog, batch, device):
                continue  # outside the batch's tags, percent or opened waves
            if batch.type == "verify" and version == package.version:
                verified += state.create_job(batch.name, self._new_job(device, package, version, S), reason,
                                             now) is not None
            elif wants(batch, package, device, package.module, version):
                current = state.open_job(device, package.module)
                if current is not None and self._yields_to(current, batch):
                    state.move(current, C, f"batch {batch.name} comes first", now, superseded=1)
                job = state.create_job(batch.name, self._new_job(device, package, version), reason, now)
                if job is not None:
                    created += 1
                    if batch.push:
                        self._push(job, now)
        log.info("batch %s: %d jobs created", batch.name, created + verified)
        if verified:
            self._check_verification(batch, now)

    def _cancel_batch(self, name: str, reason: str, now: float, *, end_batch: bool = True) -> None:
        self.running.discard(name)
        for job in self.state.batch_open_jobs(name):
            self.state.move(job, C, reason, now)
        if end_batch:
            self.state.end_batch(name, "canceled", reason, now)
        else:  # a completed batch stays "completed", and its name is spent all the same
            self.state.set_control(name, {"removed": True})
        log.info("batch %s canceled: %s", name, reason)

    # -- what a device should get ------------------------------------------------------
    def _consider(self, device: DeviceId, module: str, version: str, now: float, *, deliver: bool) -> Job | None:
        """Give a device with no open job for `module` a job from the best batch that wants it."""
        catalog, state = self.catalog, self.state
        assert catalog is not None
        for batch in candidate_batches(catalog, self.running, device, module, version):
            if batch.mode == "static" and device.device_name not in state.targets.get(batch.name, ()):
                continue
            if state.current_job(batch.name, device) is not None:
                continue
            if not self.rollout.member(catalog, batch, device) or self.rollout.blocked(batch, now) is not None:
                continue  # not chosen (yet), or the batch starts no jobs now: the tick brings it
            package = catalog.packages[batch.package]
            job = state.create_job(batch.name, self._new_job(device, package, version),
                                   f"reported {version}; batch {batch.name} targets it", now)
            if job is None:
                return state.open_job(device, module)
            log.debug("job %d: %s %s -> %s in batch %s", job.id, device, version, package.version, batch.name)
            if deliver and batch.push:
                self._push(job, now)
            return job
        return None

    def _push(self, job: Job, now: float) -> None:
        """Send the upgrade push (b) when the device is connected; it is then `notified`."""
        if not self.online(job.device):
            return  # the push waits for its next report
        if job.state == Q and not self._may_start(job, now):
            return  # queued: the rollout tick pushes it when its turn comes
        self._refresh_file(job, now)
        data = self._offer_data(job)
        if data is None:
            return
        message = {"code": "1000", "id": self._next_push_id(), "message": "success", "data": data}
        self._out.append(Send(job.device, upgrade_topic(job.device), encode_json(message)))
        if job.state == Q:
            self.state.move(job, N, "upgrade pushed", now)

    def _next_push_id(self) -> int:
        """1..2^31-1, so that firmware can keep it in a signed 32-bit int (Aliyun's fit too);
        never reused across restarts: ids are reserved on disk in blocks, and the reservation
        is committed with the push's own changes, before the push leaves."""
        push_id = self._last_push_id % PUSH_ID_MAX + 1  # after 2^31-1 pushes, 1 again
        if push_id > self.state.counters.get(PUSH_IDS, 0) or push_id == 1:
            self.state.set_counter(PUSH_IDS, min(push_id + PUSH_ID_BLOCK - 1, PUSH_ID_MAX))
        self._last_push_id = push_id
        return push_id

    def _may_start(self, job: Job, now: float) -> bool:
        """May this queued job start now (pause, schedule, window, rate)? Counts it if so."""
        batch = self.catalog.batches.get(job.batch) if self.catalog else None
        return batch is None or self.rollout.take_start(batch, now)

    def _refresh_file(self, job: Job, now: float) -> None:
        """A job keeps the file it was given; only if a reload removed that file (a dropped
        `diff_from`) does it move to what the catalog now offers for its version."""
        catalog, files = self.catalog, self.files
        package = catalog.packages.get(job.package_id) if catalog else None
        if files is None or package is None or files.by_key(job.file_key) is not None:
            return
        download = files.download_for(package, job.from_version)
        self.state.move(job, job.state, "its file left the catalog; now " + download.key, now,
                        file_key=download.key, file_size=download.digest.size)

    def _offer_data(self, job: Job) -> dict[str, Any] | None:
        """The `data` of a push / firmware-get reply / get_ota_info answer for this job; None
        when its batch or file is no longer in the catalog."""
        catalog = self.catalog
        package = catalog.packages.get(job.package_id) if catalog else None
        batch = catalog.batches.get(job.batch) if catalog else None
        download = self.file_of(job)
        if package is None or batch is None or download is None:
            return None
        url = None if batch.protocol == "mqtt" else self.downloads.url(
            self.settings.base_url(batch.protocol), download, job, self.settings.url_ttl_seconds)
        return offer_data(package, download, url=url, stream_id=job.id)

    def offer(self, device: DeviceId, module: str) -> tuple[dict[str, Any], list[Send]]:
        """What this device should get now, handed out on request (firmware/get, HTTP): the
        open job's data, or a new job from the best batch for its last reported version."""
        return self._offer(device, module), self._take_out()

    def _offer(self, device: DeviceId, module: str) -> dict[str, Any]:
        now, state = self.clock(), self.state
        job = state.open_job(device, module)
        if job is not None and job.batch not in self.running:
            state.move(job, C, f"batch {job.batch} is no longer running", now)
            job = None
        if job is None:
            version = state.version(device, module)
            if version is None:
                return {}
            job = self._consider(device, module, version, now, deliver=False)
            if job is None:
                return {}
        if job.state == I:
            return {}
        if job.state == Q and not self._may_start(job, now):
            return {}  # "not now": it gets the job when its turn comes (pushed, if the batch pushes)
        self._refresh_file(job, now)
        data = self._offer_data(job)
        if data is None:
            state.move(job, C, "its batch or file left the catalog", now)
            return {}
        if job.state == Q:
            state.move(job, N, "upgrade info handed out on request", now)
        return data

    # -- what devices report -----------------------------------------------------------
    def report_version(self, device: DeviceId, module: str, version: str, *, deliver: bool = True) -> list[Send]:
        if not self._knows_module(device, module):
            # Not recorded: module names are the device's to choose, the database is ours.
            log.info("version report from %s for module %r ignored: the product has no such module",
                     device, module)
            return []
        now, state = self.clock(), self.state
        state.record_version(device, module, version, now)
        job = state.open_job(device, module)
        if job is None:
            if not self._late_success(device, module, version, now) and \
                    self._consider(device, module, version, now, deliver=deliver) is None:
                self._count_as_verified(device, module, version, now)
        elif version == job.target_version:
            state.move(job, S, f"device reported target version {version}", now, progress=100)
            log.debug("job %d: %s upgraded to %s", job.id, device, version)
            self._after_final(job, now)
        elif job.state == I:
            state.move(job, F, f"device reported {version} after installing {job.target_version}: the new "
                       "image did not boot", now, message=f"reported {version} after install")
            self._after_final(job, now)
        else:
            self._version_during_job(job, version, now, deliver)
        return self._take_out()

    def _late_success(self, device: DeviceId, module: str, version: str, now: float) -> bool:
        """A device whose last job failed (e.g. timed out while it was still working) and
        that now reports that job's target version did upgrade: the job succeeded after all."""
        failed = [job for job in (self.state.current_job(name, device) for name in self.running)
                  if job is not None and job.module == module and job.state == F and job.target_version == version]
        if not failed:
            return False
        job = max(failed, key=lambda j: j.id)  # its latest failure; a placeholder elsewhere does not hide it
        self.state.move(job, S, f"device reported target version {version} after the job had failed", now,
                        progress=100)
        self._after_final(job, now)
        return True

    def _count_as_verified(self, device: DeviceId, module: str, version: str, now: float) -> None:
        """A device listed in a running verify batch that already runs the package's version
        counts as succeeded there, so verification can complete."""
        catalog = self.catalog
        assert catalog is not None
        for batch in list(catalog.batches.values()):
            package = catalog.packages[batch.package]
            if batch.type != "verify" or batch.name not in self.running or package.version != version \
                    or not device_in_scope(batch, package, device, module):
                continue
            job = self.state.create_job(batch.name, self._new_job(device, package, version, S),
                                        f"reported {version}: already on the package version", now)
            if job is not None:
                self._after_final(job, now)

    def _version_during_job(self, job: Job, version: str, now: float, deliver: bool) -> None:
        """A device with an open job reported a version again, typically after a reboot."""
        catalog, files = self.catalog, self.files
        assert catalog is not None and files is not None
        batch = catalog.batches.get(job.batch)
        package = catalog.packages.get(job.package_id)
        if batch is None or package is None or job.batch not in self.running or \
                not wants(batch, package, job.device, job.module, version):
            self.state.move(job, C, f"device now reports {version}, which batch {job.batch} does not target",
                            now, superseded=1)
            self._after_final(job, now)
            self._consider(job.device, job.module, version, now, deliver=deliver)
            return
        if version != job.from_version:
            download = files.download_for(package, version)
            self.state.move(job, job.state, f"device now reports {version}", now, from_version=version,
                            file_key=download.key, file_size=download.digest.size)
        else:
            self.state.touch(job, now)  # a report is activity: the timeout counts from here
        if deliver and batch.push:
            self._push(job, now)

    def report_progress(self, device: DeviceId, module: str, step: int, desc: str) -> list[Send]:
        now, state = self.clock(), self.state
        job = state.open_job(device, module)
        if job is None:
            log.info("progress %d from %s module %s ignored: no open job", step, device, module)
            return []
        if step < 0:
            state.move(job, F, f"device reported step {step}: {desc}", now, code=step, message=desc)
            log.info("job %d: %s failed with step %d (%s)", job.id, device, step, desc)
            self._after_final(job, now)
        elif step == 100:
            state.move(job, I, "device reported 100: installed, rebooting", now, progress=100, message=desc)
        elif job.state == I:
            log.info("progress %d from %s after install ignored", step, device)
        elif job.state == P:
            state.update(job, now, progress=step, message=desc)  # telemetry: the latest value is enough
        else:  # step 0 is "started" (Aliyun's C Link SDK 4.x sends it as a download begins)
            state.move(job, P, "device started the upgrade (step 0)" if step == 0 else f"device reported {step}%",
                       now, progress=step, message=desc)
        return self._take_out()

    def _after_final(self, job: Job, now: float) -> None:
        """A job ended: its verify batch may now decide its package's status."""
        assert self.catalog is not None
        batch = self.catalog.batches.get(job.batch)
        if batch is None:
            return
        if batch.type == "verify":
            self._check_verification(batch, now)
        self._halt_if_due(batch, now)

    def _halt_if_due(self, batch: Batch, now: float) -> None:
        due = self.rollout.abort_due(batch)
        if due is not None:
            reason, figures = due
            self.rollout.pause(batch.name, "abort", reason, now, **figures)
            log.warning("batch %s halted: %s; `otactl resume %s` resumes it", batch.name, reason, batch.name)

    def _check_verification(self, batch: Batch, now: float) -> None:
        """`verified` once every listed device succeeded, `verify_failed` at the first failure
        (a canceled job decides nothing)."""
        catalog, state = self.catalog, self.state
        assert catalog is not None
        if batch.devices is None or batch.name not in self.running:
            return
        jobs = {j.device.device_name: j for j in state.latest_in_batch.get(batch.name, {}).values()
                if j.state != C}
        if any(j.state == F and name in batch.devices for name, j in jobs.items()):
            status = "verify_failed"
        elif all(name in jobs and jobs[name].state == S for name in batch.devices):
            status = "verified"
        else:
            return
        package = catalog.packages[batch.package]
        state.set_package_status(package.id, status, self.current_sha(package))
        self.running.discard(batch.name)
        state.end_batch(batch.name, "completed", status, now)
        for other in state.batch_open_jobs(batch.name):
            state.move(other, C, f"verification ended: {status}", now)
        log.info("package %s is %s (verify batch %s)", batch.package, status, batch.name)
        if status == "verified":
            self._start_waiting(package, now)

    def _start_waiting(self, package: Package, now: float) -> None:
        catalog = self.catalog
        assert catalog is not None
        for batch in sorted(catalog.batches.values(), key=batch_priority, reverse=True):
            row = self.state.batches.get(batch.name)
            if batch.package == package.id and row is not None and row.state == "waiting_verification":
                self._start_batch(batch, package, now)

    # -- admin actions -----------------------------------------------------------------
    def retry(self, batch_name: str, device_names: list[str] | None = None) -> tuple[int, list[Send]]:
        """Give failed devices of a running batch another job: now, if their last reported
        version still qualifies (pushed when online and the batch pushes), else on their next report."""
        catalog, state, now = self.catalog, self.state, self.clock()
        batch = catalog.batches.get(batch_name) if catalog else None
        if batch is None or catalog is None:
            raise Refused(404, f"no batch named {batch_name!r} in the catalog")
        if batch_name not in self.running:
            raise Refused(409, f"batch {batch_name!r} is not running")
        package = catalog.packages[batch.package]
        failed = [job for job in state.current.get(batch_name, {}).values() if job.state == F
                  and (device_names is None or job.device.device_name in device_names)]
        for job in sorted(failed, key=lambda j: j.id):
            state.move(job, F, "retry requested by an admin", now, superseded=1)
            version = state.version(job.device, job.module)
            if version is not None and state.open_job(job.device, job.module) is None:
                self._consider(job.device, package.module, version, now, deliver=True)
        log.info("batch %s: %d failed job(s) retried", batch_name, len(failed))
        return len(failed), self._take_out()

    def cancel_devices(self, batch_name: str, device_names: list[str]) -> tuple[int, list[Send]]:
        """Cancel these devices in a batch: their open jobs, or, for a device with no job yet,
        a canceled placeholder, so the batch does not take it later."""
        catalog, state, now = self.catalog, self.state, self.clock()
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
            job = state.latest_job_in_batch(batch_name, device)
            if job is not None and job.is_open:
                state.move(job, C, "canceled by an admin", now)
                canceled += 1
                self._after_final(job, now)
            elif job is None or job.superseded:  # no job, or only one a later job may replace
                version = state.version(device, package.module) or ""
                placeholder = self._new_job(device, package, version, C)
                canceled += state.create_job(batch_name, placeholder, "canceled by an admin before it started",
                                             now) is not None
        return canceled, self._take_out()  # a verification a cancel ends may start batches

    # -- rollouts ------------------------------------------------------------------------
    def pause(self, batch_name: str, reason: str = "paused by an admin") -> list[Send]:
        batch = self._running_batch(batch_name)
        self.rollout.pause(batch.name, "admin", reason, self.clock())
        log.info("batch %s paused by an admin", batch.name)
        return self._take_out()

    def resume(self, batch_name: str) -> list[Send]:
        """Resume a batch paused by hand, by its catalog or halted by `abort`."""
        batch, now = self._running_batch(batch_name), self.clock()
        if self.rollout.control(batch.name).get("by") == "abort":
            self.rollout.note_resume(batch)  # the failures that halted it do not halt it again
        self.rollout.resume(batch.name, "admin", "resumed by an admin", now)
        log.info("batch %s resumed by an admin", batch.name)
        self._gate_was_open.pop(batch.name, None)
        return self.rollout_tick(now)

    def _running_batch(self, batch_name: str) -> Batch:
        batch = self.catalog.batches.get(batch_name) if self.catalog else None
        if batch is None:
            raise Refused(404, f"no batch named {batch_name!r} in the catalog")
        row = self.state.batches.get(batch_name)
        if row is None or row.state not in ("running", "waiting_verification"):
            raise Refused(409, f"batch {batch_name!r} is {row.state if row else 'not started'}; nothing to pause")
        return batch

    def rollout_view(self, batch_name: str) -> dict[str, Any] | None:
        batch = self.catalog.batches.get(batch_name) if self.catalog else None
        return self.rollout.view(batch, self.clock()) if batch is not None else None

    def rollout_tick(self, now: float | None = None) -> list[Send]:
        """Once a second: open waves, halt at `abort`, retry failures that are due, cancel
        queued jobs past `end_at`, and start what the policy now allows (jobs for devices
        that were not chosen or not allowed yet, pushes for queued jobs, within the rate)."""
        catalog = self.catalog
        if catalog is None:
            return []
        now = self.clock() if now is None else now
        for name in sorted(self.running):
            batch = catalog.batches.get(name)
            if batch is None or (batch.policy.empty and not self.rollout.control(name).get("by")):
                continue  # no policy, never paused: everything happened when it was decided
            self._tick_batch(batch, now)
        return self._take_out()

    def _tick_batch(self, batch: Batch, now: float) -> None:
        opened_wave = self.rollout.advance_waves(batch, now)
        if opened_wave:
            log.info("batch %s: wave %d opened", batch.name, self.rollout.open_wave(batch) + 1)
        self._halt_if_due(batch, now)
        block = self.rollout.blocked(batch, now)
        if block is not None and block.kind == "ended":
            for job in self.state.batch_open_jobs(batch.name):
                if job.state == Q:
                    self.state.move(job, C, f"not started before end_at ({block.reason})", now)
        was_open = self._gate_was_open.get(batch.name, False)
        self._gate_was_open[batch.name] = block is None
        if block is not None:
            return
        for job in self.rollout.retries_due(batch, now):
            self._retry_job(batch, job, now)
        if opened_wave or not was_open:
            self._fill(batch, now)
        if batch.push and self.state.counts.get(batch.name, {}).get(Q):
            for job in self.state.batch_open_jobs(batch.name):
                if job.state == Q and self.online(job.device):
                    if self.rollout.rate_left(batch, now) == 0:
                        break
                    self._push(job, now)

    def _retry_job(self, batch: Batch, job: Job, now: float) -> None:
        assert batch.policy.retry is not None
        tries = self.state.jobs_of(batch.name, job.device)
        self.state.move(job, F, f"retry {tries} of {batch.policy.retry.count} (retry policy)", now, superseded=1)
        version = self.state.version(job.device, job.module)
        if version is not None and self.state.open_job(job.device, job.module) is None:
            self._consider(job.device, job.module, version, now, deliver=True)

    def _fill(self, batch: Batch, now: float) -> None:
        """Jobs for the devices the batch may take now and has not: those not chosen or not
        allowed when they reported (a wave opened, a pause ended, a window opened)."""
        catalog = self.catalog
        assert catalog is not None
        package = catalog.packages[batch.package]
        known = self.state.reported_versions(package.product, package.module)
        names = batch.devices if batch.devices is not None else list(known)
        for name in names:
            version = known.get(name)
            device = DeviceId(package.product, name)
            if version is None or self.state.open_job(device, package.module) is not None:
                continue
            self._consider(device, package.module, version, now, deliver=True)

    # -- timeouts ----------------------------------------------------------------------
    def fail_stale_jobs(self, now: float | None = None) -> tuple[int, list[Send]]:
        """Fail jobs whose device went silent for longer than its batch's `timeout_minutes`.
        Queued jobs never time out: their device has not been told yet; a download under way
        is activity too."""
        catalog, state = self.catalog, self.state
        if catalog is None:
            return 0, []
        now = self.clock() if now is None else now
        failed = 0
        for batch in list(catalog.batches.values()):
            if batch.timeout_minutes is None or batch.name not in self.running:
                continue
            cutoff = now - batch.timeout_minutes * 60
            for job in state.batch_open_jobs(batch.name):
                if job.state == Q or job.updated_at >= cutoff or self.downloads.in_flight(job.id):
                    continue
                state.move(job, F, f"no report for {batch.timeout_minutes} min (timeout_minutes)", now,
                           message=f"timed out in state {job.state}")
                failed += 1
                self._after_final(job, now)
        return failed, self._take_out()
