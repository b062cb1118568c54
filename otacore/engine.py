"""The OTA engine: reacts to what devices report, runs batches and jobs, decides what each
device should get now. Adapters (MQTT plugin, HTTP app) call it and deliver its answers.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .catalog import Batch, Catalog, Package, load_catalog
from .codec import encode_json
from .credentials import DeviceId
from .downloads import Downloads
from .eligibility import (
    batch_priority,
    candidate_batches,
    device_in_scope,
    version_qualifies,
    wants,
)
from .errors import ConfigError, Refused
from .keyed_locks import KeyedLocks
from .offers import offer_data
from .package_files import DownloadFile, PackageFiles
from .reload_rules import batch_fingerprint, reload_issues
from .settings import Settings
from .store import Job, NewJob, Store
from .topics import upgrade_topic

log = logging.getLogger("ota.engine")


class Notifier(Protocol):
    async def send(self, device: DeviceId, topic: str, payload: bytes, qos: int) -> bool:
        """Deliver to the device's live session; False when it is not connected."""


@dataclass(frozen=True)
class LoadedCatalog:
    catalog: Catalog
    files: PackageFiles


def prepare_catalog(settings: Settings, catalog_path: Path | None = None) -> LoadedCatalog:
    """Load, validate and prepare files for a catalog (blocking; run in a thread)."""
    catalog = load_catalog(catalog_path or settings.catalog_path, settings)
    files = PackageFiles(settings.data_dir)
    files.prepare(catalog)
    return LoadedCatalog(catalog, files)


class OtaEngine:
    """Owns the live catalog, the store, and every job transition."""

    def __init__(self, settings: Settings, store: Store, notifier: Notifier, url_key: bytes) -> None:
        self.settings = settings
        self.store = store
        self.notifier = notifier
        self.downloads = Downloads(store, url_key, self._file_of)
        self.catalog: Catalog | None = None
        self.files: PackageFiles | None = None
        self.running: set[str] = set()
        self._device_locks = KeyedLocks()
        self._reload_lock = asyncio.Lock()
        self._last_push_id = 0
        # Called with the new catalog after each successful reload (e.g. to drop sessions
        # of devices that were removed or whose secret changed).
        self.reload_listeners: list[Callable[[Catalog], None]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    # -- catalog: start and reload -----------------------------------------------------
    async def reload(self, catalog_path: Path | None = None) -> LoadedCatalog:
        """Validate the whole new catalog, then apply it; on any error nothing changes."""
        async with self._reload_lock:
            loaded = await asyncio.to_thread(prepare_catalog, self.settings, catalog_path)
            issues = reload_issues(loaded.catalog, loaded.files, await self.store.batches())
            if issues:
                raise ConfigError(issues)
            self.catalog, self.files = loaded.catalog, loaded.files
            # Batches gone from the catalog stop now, before any await lets a device in.
            self.running &= set(loaded.catalog.batches)
            await self._apply_batches()
            for listener in self.reload_listeners:
                listener(loaded.catalog)
            return loaded

    def _fingerprint(self, batch: Batch) -> dict[str, str]:
        assert self.catalog is not None and self.files is not None
        return batch_fingerprint(batch, self.catalog.packages[batch.package], self.files)

    def current_sha(self, package: Package) -> str:
        """SHA-256 of the package's image as the live catalog serves it."""
        assert self.files is not None
        return self.files.download_for(package, None).digest.sha256

    async def package_status(self, package: Package) -> str:
        """`verified` / `verify_failed` as earned by this very file; otherwise `unverified`."""
        status, sha256 = (await self.store.package_statuses()).get(package.id, ("unverified", ""))
        return status if sha256 == self.current_sha(package) else "unverified"

    async def _apply_batches(self) -> None:
        catalog = self.catalog
        assert catalog is not None
        rows = await self.store.batches()
        for name, row in rows.items():
            if name not in catalog.batches and row.state != "canceled":
                await self._cancel_batch(name, "batch removed from the catalog", end_batch=row.state != "completed")
        for batch in sorted(catalog.batches.values(), key=batch_priority, reverse=True):
            row = rows.get(batch.name)
            package = catalog.packages[batch.package]
            if row is not None and row.state in ("running", "completed"):
                if row.state == "running":
                    self.running.add(batch.name)
                    await self._sync_listed_targets(batch, package)
                continue
            if batch.type == "upgrade" and package.verify and await self.package_status(package) != "verified":
                await self.store.save_batch(batch.name, package.id, self._fingerprint(batch),
                                            "waiting_verification", "package not verified yet")
                continue
            await self._start_batch(batch, package)
        for batch in catalog.batches.values():
            if batch.name in self.running:
                await self._drop_unlisted(batch)
                if batch.type == "verify":
                    await self._check_verification(batch)

    async def _drop_unlisted(self, batch: Batch) -> None:
        """A reload that narrows a running batch's device list cancels the others' open jobs."""
        if batch.devices is None:
            return
        for job in await self.store.jobs(batch.name, open_only=True):
            if job.device.device_name not in batch.devices:
                await self._cancel_job(job, "removed from the batch's device list")

    async def _cancel_job(self, job: Job, reason: str, *, locked: bool = False) -> Job | None:
        """Cancel a job that was open when read, as it is now (a report may have moved it
        meanwhile); under its device's lock unless the caller holds it. None if it had ended."""
        if not locked:
            async with self._device_locks.hold(job.device):
                return await self._cancel_job(job, reason, locked=True)
        current = await self.store.job(job.id)
        if current is None or not current.is_open:
            return None
        return (await self.store.transition_many([current], "canceled", reason) or [None])[0]

    async def _start_batch(self, batch: Batch, package: Package) -> None:
        known = await self.store.reported_versions(package.product, package.module)
        if batch.devices is not None:
            names = list(batch.devices)
        else:
            names = [n for n, v in known.items() if version_qualifies(batch, package, v)]
        targets = [DeviceId(package.product, n) for n in names] if batch.mode == "static" else None
        # State and target set in one transaction: a crash in between would leave a static
        # batch running with nobody in it.
        await self.store.save_batch(batch.name, package.id, self._fingerprint(batch), "running", "started",
                                    targets=targets)
        self.running.add(batch.name)
        log.info("batch %s started (%s %s, %s, push %s)", batch.name, package.id, batch.protocol, batch.mode,
                 "on" if batch.push else "off")
        # Reports that arrived before `running` had the batch found no batch; read again.
        known = await self.store.reported_versions(package.product, package.module)
        if batch.devices is None:
            late = [n for n, v in known.items() if version_qualifies(batch, package, v) and n not in names]
            if late and batch.mode == "static":
                await self.store.add_targets(batch.name, [DeviceId(package.product, n) for n in late])
            names += late
        # One transaction for the whole fleet, then the pushes: a batch start is a storm.
        open_jobs = {job.device.device_name: job for job in await self.store.open_jobs(package.product, package.module)}
        wanted, displaced = [], []
        for name in names:
            version = known.get(name)
            if version is None:
                continue  # offline or never reported: it gets its job when it reports
            device = DeviceId(package.product, name)
            if batch.type == "verify" and version == package.version:
                wanted.append(self._new_job(device, package, version, state="succeeded"))
            elif wants(batch, package, device, package.module, version):
                current = open_jobs.get(name)
                if current is not None and self._yields_to(current, batch):
                    displaced.append(current)
                wanted.append(self._new_job(device, package, version))
        await self.store.transition_many(displaced, "canceled", f"batch {batch.name} comes first", superseded=1)
        jobs = await self.store.create_jobs(batch.name, wanted, f"batch {batch.name} started; device reported a "
                                            "version it targets")
        queued = [job for job in jobs if job.state == "queued"]
        log.info("batch %s: %d jobs created", batch.name, len(jobs))
        if batch.push:
            delivered = [job for job in queued if await self._send_push(job)]
            await self.store.transition_many(delivered, "notified", "upgrade pushed")
        if len(queued) < len(jobs):
            await self._after_final(next(job for job in jobs if job.state == "succeeded"))

    def _yields_to(self, job: Job, batch: Batch) -> bool:
        """May `batch` take this device from `job`? Only a job not yet told, of a batch
        that ranks lower (CONFIG.md: verify first, then the later batch in the file)."""
        assert self.catalog is not None
        current = self.catalog.batches.get(job.batch)
        return job.state == "queued" and (current is None or batch_priority(current) < batch_priority(batch))

    def _new_job(self, device: DeviceId, package: Package, version: str, state: str = "queued") -> NewJob:
        assert self.files is not None
        download = self.files.download_for(package, version)
        return NewJob(device, package.module, package.id, version, package.version, download.key,
                      download.digest.size, state)

    async def _sync_listed_targets(self, batch: Batch, package: Package) -> None:
        """A reload may add devices to a running static batch's list."""
        if batch.mode == "static" and batch.devices is not None:
            await self.store.add_targets(batch.name, [DeviceId(package.product, n) for n in batch.devices])

    async def _cancel_batch(self, name: str, reason: str, *, end_batch: bool = True) -> None:
        """Cancel a batch's open jobs (each under its device's lock, so a report being
        handled right now finishes first), and the batch itself unless it already ended."""
        self.running.discard(name)
        for job in await self.store.jobs(name, open_only=True):
            await self._cancel_job(job, reason)
        if end_batch:
            await self.store.set_batch_state(name, "canceled", reason)
        log.info("batch %s canceled: %s", name, reason)

    # -- what a device should get ------------------------------------------------------
    async def _consider(self, device: DeviceId, module: str, version: str, *, deliver: bool) -> Job | None:
        """Give a device with no open job for `module` a job from the best batch that wants it."""
        catalog, files = self.catalog, self.files
        assert catalog is not None and files is not None
        for batch in candidate_batches(catalog, self.running, device, module, version):
            if batch.mode == "static" and not await self.store.is_target(batch.name, device):
                continue
            if await self.store.has_job_in_batch(batch.name, device):
                continue
            package = catalog.packages[batch.package]
            job = await self.store.create_job(batch.name, self._new_job(device, package, version),
                                              f"reported {version}; batch {batch.name} targets it")
            if job is None:
                return await self.store.open_job(device, module)
            if batch.name not in self.running:  # stopped (reload, verification end) while we wrote
                await self._cancel_job(job, f"batch {batch.name} stopped", locked=True)
                return None
            log.info("job %d: %s %s -> %s in batch %s", job.id, device, version, package.version, batch.name)
            if deliver and batch.push:
                await self._push(job)
            return job
        return None

    async def _push(self, job: Job) -> None:
        job = await self._refresh_file(job)
        if await self._send_push(job) and job.state == "queued":
            await self.store.transition(job, "notified", "upgrade pushed")

    async def _refresh_file(self, job: Job) -> Job:
        """A job keeps the file it was given; only if a reload removed that file (a dropped
        `diff_from`) does it move to what the catalog now offers for its version."""
        catalog, files = self.catalog, self.files
        package = catalog.packages.get(job.package_id) if catalog else None
        if files is None or package is None or files.by_key(job.file_key) is not None:
            return job
        download = files.download_for(package, job.from_version)
        return await self.store.transition(job, job.state, "its file left the catalog; now " + download.key,
                                           file_key=download.key, file_size=download.digest.size)

    def _next_push_id(self) -> int:
        """Unique per push, also across restarts: the clock in ms, or one more than the last."""
        self._last_push_id = max(self._last_push_id + 1, int(time.time() * 1000))
        return self._last_push_id

    async def _send_push(self, job: Job) -> bool:
        """Send the upgrade push (b); False when the device is not connected."""
        data = self._offer_data(job)
        if data is None:
            return False
        message = {"code": "1000", "id": self._next_push_id(), "message": "success", "data": data}
        delivered = await self.notifier.send(job.device, upgrade_topic(job.device), encode_json(message), 1)
        if not delivered:
            log.debug("job %d: %s is not connected; the push waits for its next report", job.id, job.device)
        return delivered

    def _offer_data(self, job: Job) -> dict[str, Any] | None:
        """The `data` of a push / firmware-get reply / get_ota_info answer for this job; None
        when its batch or file is no longer in the catalog."""
        catalog = self.catalog
        package = catalog.packages.get(job.package_id) if catalog else None
        batch = catalog.batches.get(job.batch) if catalog else None
        download = self._file_of(job)
        if package is None or batch is None or download is None:
            return None
        url = None if batch.protocol == "mqtt" else self.downloads.url(
            self.settings.base_url(batch.protocol), download, job, self.settings.url_ttl_seconds)
        return offer_data(package, download, url=url, stream_id=job.id)

    def _file_of(self, job: Job) -> DownloadFile | None:
        """The file this job was given (None once a reload removed it)."""
        return self.files.by_key(job.file_key) if self.files else None

    async def offer(self, device: DeviceId, module: str) -> dict[str, Any]:
        """What this device should get now, handed out on request (firmware/get, HTTP): the
        open job's data, or a new job from the best batch for its last reported version."""
        async with self._device_locks.hold(device):
            job = await self.store.open_job(device, module)
            if job is not None and job.batch not in self.running:
                await self.store.transition(job, "canceled", f"batch {job.batch} is no longer running")
                job = None
            if job is None:
                version = await self.store.reported_version(device, module)
                if version is None:
                    return {}
                job = await self._consider(device, module, version, deliver=False)
                if job is None:
                    return {}
            if job.state == "installed":
                return {}
            job = await self._refresh_file(job)
            data = self._offer_data(job)
            if data is None:
                await self._cancel_job(job, "its batch or file left the catalog", locked=True)
                return {}
            if job.state == "queued":
                await self.store.transition(job, "notified", "upgrade info handed out on request")
            return data

    # -- what devices report -----------------------------------------------------------
    def _knows_module(self, device: DeviceId, module: str) -> bool:
        product = self.catalog.products.get(device.product_key) if self.catalog else None
        return product is not None and module in product.modules

    async def on_version(self, device: DeviceId, module: str, version: str, *, deliver: bool = True) -> None:
        if not self._knows_module(device, module):
            # Not recorded: module names are the device's to choose, the database is ours.
            log.info("version report from %s for module %r ignored: the product has no such module",
                     device, module)
            return
        async with self._device_locks.hold(device):
            await self.store.record_version(device, module, version)
            job = await self.store.open_job(device, module)
            if job is None:
                if await self._late_success(device, module, version):
                    return
                if await self._consider(device, module, version, deliver=deliver) is None:
                    await self._count_as_verified(device, module, version)
                return
            if version == job.target_version:
                job = await self.store.transition(job, "succeeded", f"device reported target version {version}",
                                                  progress=100)
                log.info("job %d: %s upgraded to %s", job.id, device, version)
                await self._after_final(job)
            elif job.state == "installed":
                job = await self.store.transition(
                    job, "failed", f"device reported {version} after installing {job.target_version}: "
                    "the new image did not boot", message=f"reported {version} after install")
                await self._after_final(job)
            else:
                await self._version_during_job(job, version, deliver)

    async def _late_success(self, device: DeviceId, module: str, version: str) -> bool:
        """A device whose last job failed (e.g. timed out while it was still working) and
        that now reports that job's target version did upgrade: the job succeeded after all."""
        job = await self.store.latest_job(device, module)
        if job is None or job.state != "failed" or job.superseded or job.target_version != version \
                or job.batch not in self.running:
            return False
        job = await self.store.transition(job, "succeeded", f"device reported target version {version} after "
                                          "the job had failed", progress=100)
        log.info("job %d: %s upgraded to %s after all", job.id, device, version)
        await self._after_final(job)
        return True

    async def _count_as_verified(self, device: DeviceId, module: str, version: str) -> None:
        """A device listed in a running verify batch that already runs the package's version
        counts as succeeded there, so verification can complete."""
        catalog = self.catalog
        assert catalog is not None
        for batch in catalog.batches.values():
            package = catalog.packages[batch.package]
            if batch.type != "verify" or batch.name not in self.running or package.version != version \
                    or not device_in_scope(batch, package, device, module):  # on the list, at the version
                continue
            job = await self.store.create_job(batch.name, self._new_job(device, package, version, "succeeded"),
                                              f"reported {version}: already on the package version")
            if job is not None:
                await self._after_final(job)

    async def _version_during_job(self, job: Job, version: str, deliver: bool) -> None:
        """A device with an open job reported a version again, typically after a reboot."""
        catalog, files = self.catalog, self.files
        assert catalog is not None and files is not None
        batch = catalog.batches.get(job.batch)
        package = catalog.packages.get(job.package_id)
        if batch is None or package is None or job.batch not in self.running or \
                not wants(batch, package, job.device, job.module, version):
            job = await self.store.transition(job, "canceled", f"device now reports {version}, which batch "
                                              f"{job.batch} does not target", superseded=1)
            await self._after_final(job)
            await self._consider(job.device, job.module, version, deliver=deliver)
            return
        if version != job.from_version:
            download = files.download_for(package, version)
            job = await self.store.transition(job, job.state, f"device now reports {version}",
                                              from_version=version, file_key=download.key,
                                              file_size=download.digest.size)
        if deliver and batch.push:
            await self._push(job)

    async def on_progress(self, device: DeviceId, module: str, step: int, desc: str) -> None:
        async with self._device_locks.hold(device):
            job = await self.store.open_job(device, module)
            if job is None:
                log.info("progress %d from %s module %s ignored: no open job", step, device, module)
                return
            if step < 0:
                job = await self.store.transition(job, "failed", f"device reported step {step}: {desc}",
                                                  code=step, message=desc)
                log.info("job %d: %s failed with step %d (%s)", job.id, device, step, desc)
                await self._after_final(job)
            elif step == 100:
                await self.store.transition(job, "installed", "device reported 100: installed, rebooting",
                                            progress=100, message=desc)
            elif job.state == "installed":
                log.info("progress %d from %s after install ignored", step, device)
            else:
                await self.store.transition(job, "in_progress", f"device reported {step}%", progress=step,
                                            message=desc)

    async def _after_final(self, job: Job) -> None:
        """A job ended: its verify batch may now decide its package's status."""
        catalog = self.catalog
        assert catalog is not None
        batch = catalog.batches.get(job.batch)
        if batch is not None and batch.type == "verify":
            await self._check_verification(batch, holding=job.device)

    async def _check_verification(self, batch: Batch, holding: DeviceId | None = None) -> None:
        """`verified` once every listed device succeeded, `verify_failed` at the first failure
        (a canceled job decides nothing). `holding`: the device whose lock the caller holds."""
        catalog, files = self.catalog, self.files
        assert catalog is not None and files is not None
        if batch.devices is None or batch.name not in self.running:
            return
        jobs = {j.device.device_name: j for j in await self.store.latest_jobs(batch.name) if j.state != "canceled"}
        if any(j.state == "failed" and j.device.device_name in batch.devices for j in jobs.values()):
            status = "verify_failed"
        elif all(name in jobs and jobs[name].state == "succeeded" for name in batch.devices):
            status = "verified"
        else:
            return
        package = catalog.packages[batch.package]
        await self.store.set_package_status(package.id, status, self.current_sha(package))
        self.running.discard(batch.name)
        await self.store.set_batch_state(batch.name, "completed", status)
        for other in await self.store.jobs(batch.name, open_only=True):
            await self._cancel_job(other, f"verification ended: {status}", locked=other.device == holding)
        log.info("package %s is %s (verify batch %s)", batch.package, status, batch.name)
        if status == "verified":
            # Outside this device's lock (batch starts take device locks), after any reload.
            self._background(self._start_waiting(package.id))

    def _background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background work failed", exc_info=task.exception())

    async def _start_waiting(self, package_id: str) -> None:
        async with self._reload_lock:
            catalog = self.catalog
            assert catalog is not None
            rows = await self.store.batches()
            package = catalog.packages.get(package_id)
            if package is None or await self.package_status(package) != "verified":
                return  # a reload changed the package or its file meanwhile
            for batch in sorted(catalog.batches.values(), key=batch_priority, reverse=True):
                row = rows.get(batch.name)
                if batch.package == package_id and row is not None and row.state == "waiting_verification":
                    await self._start_batch(batch, catalog.packages[package_id])

    # -- admin actions -----------------------------------------------------------------
    async def retry(self, batch_name: str, device_names: list[str] | None = None) -> int:
        """Give failed devices of a running batch another job: now, if their last reported
        version still qualifies (pushed when online and the batch pushes), else on their next report."""
        catalog = self.catalog
        batch = catalog.batches.get(batch_name) if catalog else None
        if batch is None:
            raise Refused(404, f"no batch named {batch_name!r} in the catalog")
        if batch_name not in self.running:
            raise Refused(409, f"batch {batch_name!r} is not running")
        package = catalog.packages[batch.package]
        retried = await self.store.supersede_failed(batch_name, device_names, "retry requested by an admin")
        for job in retried:
            async with self._device_locks.hold(job.device):
                version = await self.store.reported_version(job.device, job.module)
                if version is not None and await self.store.open_job(job.device, job.module) is None:
                    await self._consider(job.device, package.module, version, deliver=True)
        log.info("batch %s: %d failed job(s) retried", batch_name, len(retried))
        return len(retried)

    async def cancel_devices(self, batch_name: str, device_names: list[str]) -> int:
        """Cancel these devices in a batch: their open jobs, or, for a device with no job yet,
        a canceled placeholder, so the batch does not take it later."""
        catalog = self.catalog
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
            async with self._device_locks.hold(device):
                job = await self.store.latest_job_in_batch(batch_name, device)  # as it is now
                if job is not None and job.is_open:
                    job = await self._cancel_job(job, "canceled by an admin", locked=True)
                    if job is not None:
                        canceled += 1
                        await self._after_final(job)
                elif job is None or job.superseded:  # no job, or only one a later job may replace
                    version = await self.store.reported_version(device, package.module) or ""
                    placeholder = self._new_job(device, package, version, state="canceled")
                    canceled += len(await self.store.create_jobs(batch_name, [placeholder],
                                                                 "canceled by an admin before it started"))
        return canceled

    # -- timeouts ----------------------------------------------------------------------
    async def fail_stale_jobs(self, now: float | None = None) -> int:
        """Fail jobs whose device went silent for longer than its batch's `timeout_minutes`.
        Queued jobs never time out: their device has not been told yet."""
        catalog = self.catalog
        if catalog is None:
            return 0
        now = time.time() if now is None else now
        failed = 0
        for batch in catalog.batches.values():
            if batch.timeout_minutes is None or batch.name not in self.running:
                continue
            for job in await self.store.stale_jobs(batch.name, now - batch.timeout_minutes * 60):
                if self.downloads.in_flight(job.id):
                    continue  # a long download is activity too
                async with self._device_locks.hold(job.device):
                    current = await self.store.job(job.id)
                    if current is None or current.updated_at != job.updated_at:
                        continue  # the device spoke meanwhile
                    job = await self.store.transition(
                        current, "failed", f"no report for {batch.timeout_minutes} min (timeout_minutes)",
                        message=f"timed out in state {current.state}")
                    failed += 1
                    await self._after_final(job)
        return failed

    async def run_timeouts(self, every_seconds: float = 30.0) -> None:
        """Background loop for `fail_stale_jobs`; the runtime starts and cancels it."""
        while True:
            await asyncio.sleep(every_seconds)
            try:
                count = await self.fail_stale_jobs()
                if count:
                    log.info("%d job(s) timed out", count)
            except Exception:  # keep the loop alive; the next round retries
                log.exception("timeout sweep failed")
