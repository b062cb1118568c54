"""The OTA engine: the decisions (decisions.py) over the state in memory, the journal that
writes them down, and the outbox that sends what they produced once it is committed.

Adapters call the synchronous `decide_*` methods from the broker's packet path (so a report
is counted before it is acknowledged), or the async `on_*` ones, which also wait until what
they changed is on disk (an HTTP answer names only committed state).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from otacore.storage import retention
from otacore.catalog.model import Catalog, Package
from otacore.catalog.loading import LoadedCatalog, prepare_catalog
from otacore.protocol.credentials import DeviceId
from otacore.decisions.core import OtaCore, Send
from otacore.downloads.serving import Downloads
from otacore.errors import ConfigError, Refused
from otacore.fleet.state import FleetState
from otacore.storage.journal import Journal
from otacore.downloads.package_files import DownloadFile, PackageFiles
from otacore.catalog.reload_rules import reload_issues
from otacore.config.settings import Settings
from otacore.storage.store import Store
from otacore.protocol.topics import UPGRADE_TOPIC_PREFIX

log = logging.getLogger("ota.engine")


class Notifier(Protocol):
    def is_online(self, device: DeviceId) -> bool:
        """Has the device a live session now?"""

    def send(self, device: DeviceId, topic: str, payload: bytes, qos: int) -> bool:
        """Hand a message to the device's live session; False when it is not connected."""


ROLLOUT_TICK_SECONDS = 1.0
TROUBLE_POLL_SECONDS = 0.1


class OtaEngine:
    """Owns the live catalog, the state, the journal and the outbox."""

    def __init__(self, settings: Settings, store: Store, journal: Journal, notifier: Notifier, url_key: bytes,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store  # reads for admins and history
        self.journal = journal
        self.state: FleetState = journal.state
        self.notifier = notifier
        # When a device last sent an MQTT message or connected (epoch seconds; None: not since
        # the start). The broker side knows; broker_plugin/runtime.py sets it.
        self.last_seen: Callable[[DeviceId], float | None] = lambda device: None
        self.downloads = Downloads(self.state, url_key, self._file_of, clock)
        self.core = OtaCore(settings, self.state, self.downloads, notifier.is_online, clock)
        self._reload_lock = asyncio.Lock()
        self._outbox: list[Send] = []
        self._outbox_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # Called with the new catalog after each successful reload (e.g. to drop sessions
        # of devices that were removed or whose secret changed).
        self.reload_listeners: list[Callable[[Catalog], None]] = []
        # For GET /metrics: upgrade pushes handed to a live session, reloads by result.
        self.pushes_sent = 0
        self.reloads = {"ok": 0, "error": 0}
        self._prune_lock = asyncio.Lock()

    # -- running -----------------------------------------------------------------------
    def start(self, timeout_sweep_seconds: float = 30.0, rollout_tick_seconds: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.journal.start()
        self._tasks = [loop.create_task(self._send_committed(), name="ota-outbox"),
                       loop.create_task(self.run_timeouts(timeout_sweep_seconds), name="ota-timeouts"),
                       loop.create_task(self.run_rollouts(rollout_tick_seconds or ROLLOUT_TICK_SECONDS),
                                        name="ota-rollouts")]
        if self.settings.retention_days is not None:
            self._tasks.append(loop.create_task(self.run_retention(self.settings.retention_days), name="ota-retention"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.journal.close()

    @property
    def catalog(self) -> Catalog | None:
        return self.core.catalog

    @property
    def files(self) -> PackageFiles | None:
        return self.core.files

    @property
    def running(self) -> set[str]:
        return self.core.running

    def _file_of(self, job: Any) -> DownloadFile | None:
        return self.core.file_of(job)

    def current_sha(self, package: Package) -> str:
        return self.core.current_sha(package)

    def package_status(self, package: Package) -> str:
        return self.core.package_status(package)

    # -- the outbox --------------------------------------------------------------------
    def post(self, sends: list[Send]) -> None:
        """Send these once everything decided so far is committed."""
        if sends:
            self._outbox.extend(sends)
            self._outbox_ready.set()

    async def _send_committed(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            sends, self._outbox = self._outbox, []  # taken before the commit that covers them
            await self.journal.commit()
            for send in sends:
                if self.notifier.send(send.device, send.topic, send.payload, send.qos) \
                        and send.topic.startswith(UPGRADE_TOPIC_PREFIX):
                    self.pushes_sent += 1

    async def settled(self) -> None:
        """Return once everything decided so far is on disk."""
        await self.journal.commit()

    def _writable(self) -> None:
        """An admin change is refused at once while the database takes no writes: it would
        wait for the disk with nobody told why."""
        trouble = self.journal.trouble()
        if trouble is not None:
            raise Refused(503, f"nothing changed: {trouble}; /healthz says when the database takes writes again")

    async def _admin_settled(self) -> None:
        """Await the commit of an admin change; if writes start failing meanwhile, answer at
        once: the change holds in memory and is written when the disk takes it."""
        commit = asyncio.ensure_future(self.settled())
        while not (await asyncio.wait({commit}, timeout=TROUBLE_POLL_SECONDS))[0]:
            trouble = self.journal.trouble()
            if trouble is not None:
                commit.add_done_callback(lambda done: done.cancelled() or done.exception())
                raise Refused(503, f"done in memory, not yet on disk: {trouble}; it is written once the "
                                   "database takes writes again (/healthz says when)")
        commit.result()

    # -- catalog -----------------------------------------------------------------------
    async def reload(self, catalog_path: Path | None = None) -> LoadedCatalog:
        """Validate the whole new catalog, then apply it; on any error nothing changes."""
        try:
            loaded = await self._reload(catalog_path)
        except Exception:
            self.reloads["error"] += 1
            raise
        self.reloads["ok"] += 1
        return loaded

    async def _reload(self, catalog_path: Path | None) -> LoadedCatalog:
        async with self._reload_lock:
            self._writable()
            loaded = await asyncio.to_thread(prepare_catalog, self.settings, catalog_path)
            issues = reload_issues(loaded.catalog, loaded.files, self.state.batches)
            if issues:
                raise ConfigError(issues)
            self._writable()  # the disk may have filled while the files were read
            self.post(self.core.apply_catalog(loaded.catalog, loaded.files))
            # Before the commit: a revoked device loses its sessions even if the disk fills
            # now and the answer is "done in memory, not yet on disk".
            for listener in self.reload_listeners:
                listener(loaded.catalog)
            await self._admin_settled()
            self._forget_removed_batches(loaded.catalog)
            return loaded

    def _forget_removed_batches(self, catalog: Catalog) -> None:
        """Memory holds what is live: the jobs of batches that left the catalog go to disk
        only, once they are written (between two commits; the next reload tries again)."""
        if self.journal.busy or self.journal.trouble() is not None:
            return
        removed = {name for name in self.state.batches if name not in catalog.batches}
        forgotten = self.state.forget_batches(removed)
        if forgotten:
            log.info("%d finished jobs of %d removed batches left memory (their history stays in the database)",
                     forgotten, len(removed))

    # -- device reports: synchronous, from the broker's packet path --------------------
    def decide_version(self, device: DeviceId, module: str, version: str, *, deliver: bool = True) -> None:
        self.post(self.core.report_version(device, module, version, deliver=deliver))

    def decide_progress(self, device: DeviceId, module: str, step: int, desc: str) -> None:
        self.post(self.core.report_progress(device, module, step, desc))

    def decide_offer(self, device: DeviceId, module: str) -> dict[str, Any]:
        data, sends = self.core.offer(device, module)
        self.post(sends)
        return data

    # -- the same, awaiting the commit (HTTP device API, tests) ------------------------
    async def on_version(self, device: DeviceId, module: str, version: str, *, deliver: bool = True) -> None:
        self.decide_version(device, module, version, deliver=deliver)
        await self.settled()

    async def on_progress(self, device: DeviceId, module: str, step: int, desc: str) -> None:
        self.decide_progress(device, module, step, desc)
        await self.settled()

    async def offer(self, device: DeviceId, module: str) -> dict[str, Any]:
        data = self.decide_offer(device, module)
        await self.settled()
        return data

    # -- admin actions -----------------------------------------------------------------
    async def retry(self, batch_name: str, device_names: list[str] | None = None) -> int:
        self._writable()
        count, sends = self.core.retry(batch_name, device_names)
        self.post(sends)
        await self._admin_settled()
        return count

    async def cancel_devices(self, batch_name: str, device_names: list[str]) -> int:
        self._writable()
        count, sends = self.core.cancel_devices(batch_name, device_names)
        self.post(sends)
        await self._admin_settled()
        return count

    async def pause(self, batch_name: str) -> None:
        self._writable()
        self.post(self.core.pause(batch_name))
        await self._admin_settled()

    async def resume(self, batch_name: str) -> None:
        self._writable()
        self.post(self.core.resume(batch_name))
        await self._admin_settled()

    # -- rollouts ------------------------------------------------------------------------
    async def run_rollouts(self, every_seconds: float = ROLLOUT_TICK_SECONDS) -> None:
        """Waves, halts, retries, schedules, windows and rates move with time, not only with
        reports: one tick a second. Its sends leave after their commit, like any other."""
        while True:
            await asyncio.sleep(every_seconds)
            try:
                self.post(self.core.rollout_tick())
            except Exception:  # keep the loop alive; the next tick retries
                log.exception("rollout tick failed")

    # -- retention ---------------------------------------------------------------------
    async def prune(self, days: float, *, dry_run: bool = False) -> dict[str, int]:
        """Remove (or, dry, count) the finished history of batches that left the catalog and
        ended more than `days` ago (otacore/storage/retention.py says what stays). Runs in steps
        between commits: devices never wait for it. batch -> jobs removed."""
        async with self._prune_lock:  # one at a time: each counts what is left when it starts
            keep = set(self.catalog.batches) if self.catalog is not None else set(self.state.batches)
            before = self.core.clock() - days * 86400
            counted = await self.journal.maintain(lambda db: retention.prunable(db, keep, before), write=False)
            if dry_run or not counted:
                return counted
            removed = 0
            while step := await self.journal.maintain(lambda db: retention.prune_step(db, keep, before)):
                removed += step
                await asyncio.sleep(0)  # reports and commits go first
            log.info("retention: removed %d finished jobs and their history (batches removed from the catalog "
                     "and ended over %g days ago)", removed, days)
            return counted

    async def run_retention(self, days: float, every_seconds: float = 3600.0) -> None:
        """`retention_days`: prune once an hour, the first time a minute after the start."""
        await asyncio.sleep(min(60.0, every_seconds))
        while True:
            try:
                await self.prune(days)
            except Exception:  # the disk may be full, the database moved: the next round retries
                log.exception("retention failed; it tries again in an hour")
            await asyncio.sleep(every_seconds)

    # -- timeouts ----------------------------------------------------------------------
    async def fail_stale_jobs(self, now: float | None = None) -> int:
        count, sends = self.core.fail_stale_jobs(now)
        self.post(sends)
        await self.settled()
        return count

    async def run_timeouts(self, every_seconds: float = 30.0) -> None:
        while True:
            await asyncio.sleep(every_seconds)
            try:
                count = await self.fail_stale_jobs()
                if count:
                    log.info("%d job(s) timed out", count)
            except Exception:  # keep the loop alive; the next round retries
                log.exception("timeout sweep failed")
