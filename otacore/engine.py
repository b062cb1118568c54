"""The OTA engine: the one object the adapters (broker_plugin/, fileserver/) talk to.

It owns the live catalog and the fleet (otacore/decisions/live.py), the journal that writes
their changes down, and the outbox that sends what decisions produce once it is committed.
Adapters call named methods for what happened (a device message, a download, an admin
action) and what they read (views); they never reach into its parts.

The synchronous `decide_*` methods serve the broker's packet path (a report is counted
before it is acknowledged); the async ones also wait until what they changed is on disk (an
HTTP answer names only committed state).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from otacore.catalog.loading import LoadedCatalog, prepare_catalog
from otacore.catalog.model import Batch, Catalog, Package
from otacore.catalog.reload_rules import reload_issues
from otacore.config.settings import Settings
from otacore.decisions import admin, assignment, batches, follow, reports, ticks
from otacore.decisions.live import LiveFleet, Send
from otacore.downloads.package_files import DownloadFile
from otacore.downloads.serving import Downloads
from otacore.errors import ConfigError, Refused, partition_moving
from otacore.fleet.jobs import Job
from otacore.fleet.rollout import LocalFigures, RateBudget, RolloutFigures
from otacore.fleet.state import FleetState
from otacore.messaging import DeviceLink
from otacore.protocol.codec import BlockRequest
from otacore.protocol.credentials import DeviceId, check_http_login, check_mqtt_login
from otacore.protocol.topics import UPGRADE_TOPIC_PREFIX
from otacore.storage import retention
from otacore.storage.journal import Journal
from otacore.storage.store import Store
from otacore.views.devices import DeviceQuery, device_detail, device_list, package_list, version_counts
from otacore.views.fleet_figures import EngineFigures, fleet_figures
from otacore.views.status import FleetView, batch_report, batch_summaries

log = logging.getLogger("ota.engine")


ROLLOUT_TICK_SECONDS = 1.0
TROUBLE_POLL_SECONDS = 0.1


class Transfer:
    """One HTTP transfer of a job's file: the file server says when it starts and how many
    bytes it sent; the engine counts them as the job's activity."""

    def __init__(self, downloads: Downloads, job_id: int) -> None:
        self._downloads, self._job_id = downloads, job_id

    @property
    def job_id(self) -> int:
        return self._job_id

    def started(self) -> None:
        self._downloads.started(self._job_id)

    def finished(self, sent: int) -> None:
        self._downloads.finished(self._job_id, sent)


class OtaEngine:
    """Owns the live catalog, the state, the journal and the outbox."""

    def __init__(self, settings: Settings, store: Store, journal: Journal, link: DeviceLink, url_key: bytes,
                 clock: Callable[[], float] = time.time,
                 last_seen: Callable[[DeviceId], float | None] = lambda device: None) -> None:
        self.settings = settings
        self.store = store  # reads for admins and history
        self.journal = journal
        self.state: FleetState = journal.state
        self.link = link
        # When a device last sent an MQTT message or connected (epoch seconds; None: not since
        # the start). The broker side knows (broker_plugin/runtime.py).
        self.last_seen = last_seen
        self.downloads = Downloads(self.state, url_key, clock)
        self.live = LiveFleet(settings, self.state, self.downloads, link.is_online, clock)
        self._reload_lock = asyncio.Lock()
        self._outbox: list[Send] = []
        self._outbox_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # Called with the new catalog after each successful reload (e.g. to drop sessions
        # of devices that were removed or whose secret changed).
        self._reload_listeners: list[Callable[[Catalog], None]] = []
        # For GET /metrics: upgrade pushes handed to a live session, reloads by result.
        self.pushes_sent = 0
        self.reloads = {"ok": 0, "error": 0}
        self._prune_lock = asyncio.Lock()
        # Cluster mode (cluster_worker/): awaited before each rollout tick (fleet-wide figures,
        # rate grants), and the reading of the whole fleet views show (None: this process's).
        self.before_tick: Callable[[], Awaitable[None]] | None = None
        self.fleet_reading: Callable[[], Awaitable[FleetState]] | None = None
        self._tick_now = asyncio.Event()

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
        return self.live.catalog

    @property
    def running(self) -> set[str]:
        return self.live.running

    @property
    def loaded_catalog(self) -> LoadedCatalog | None:
        """The live catalog with its package files (None before the first load)."""
        live = self.live
        return LoadedCatalog(live.catalog, live.files) if live.catalog is not None and live.files is not None else None

    def on_reload(self, listener: Callable[[Catalog], None]) -> None:
        """Call `listener(catalog)` after each successful reload, before its commit."""
        self._reload_listeners.append(listener)

    def rollout_view(self, batch_name: str) -> dict[str, Any] | None:
        """What a batch's rollout is doing now (state, reason, waves, rate), for views."""
        return admin.rollout_view(self.live, batch_name)

    def current_sha(self, package: Package) -> str:
        return self.live.current_sha(package)

    def package_status(self, package: Package) -> str:
        return self.live.package_status(package)

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
                if self.link.send(send.device, send.topic, send.payload, send.qos) \
                        and send.topic.startswith(UPGRADE_TOPIC_PREFIX):
                    self.pushes_sent += 1

    async def settled(self) -> None:
        """Return once everything decided so far is on disk."""
        await self.journal.commit()

    def trouble(self) -> str | None:
        """Why decisions are not reaching the database now (for /healthz), or None."""
        return self.journal.trouble()

    async def database_behind(self, wait: float) -> str | None:
        """None once the database shows everything decided so far (admin reads of history
        read it), waiting up to `wait` seconds; else why it does not."""
        trouble = self.journal.trouble()
        if trouble is not None:
            return trouble
        try:
            await asyncio.wait_for(asyncio.shield(self.settled()), wait)
            return None
        except TimeoutError:
            return self.journal.trouble() or f"writes took over {wait:g} s"

    def _deciding(self) -> None:
        """Batch decisions are refused in a cluster worker that is not the coordinator (the
        HTTP side sends them to the coordinator; this is the backstop)."""
        if not self.live.decides_batches:
            raise Refused(409, "this worker is not the cluster's coordinator; send this to the coordinator")

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
            self._deciding()
            loaded = await asyncio.to_thread(prepare_catalog, self.settings, catalog_path)
            issues = reload_issues(loaded.catalog, loaded.files, self.state.batches)
            if issues:
                raise ConfigError(issues)
            self._writable()  # the disk may have filled while the files were read
            self.post(batches.apply_catalog(self.live, loaded.catalog, loaded.files))
            # Before the commit: a revoked device loses its sessions even if the disk fills
            # now and the answer is "done in memory, not yet on disk".
            for listener in self._reload_listeners:
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

    # -- cluster mode: a fleet shared with other workers (cluster_worker/fleet_share.py) ---
    def share_fleet(self, *, rate: RateBudget, push_ids: Callable[[], int], holds: Callable[[DeviceId], bool],
                    reading: Callable[[], Awaitable[FleetState]],
                    before_tick: Callable[[], Awaitable[None]]) -> None:
        """This engine holds part of a fleet other workers share: starts counted against
        `rate`, push ids from `push_ids`, decisions only for the devices `holds` names, views
        from `reading`, `before_tick` awaited before each rollout tick. It follows the
        coordinator's batch decisions until `lead`."""
        self.live.decides_batches = False
        self.live.rollout.rate = rate
        self.live.push_ids = push_ids
        self.live.holds = holds
        self.fleet_reading = reading
        self.before_tick = before_tick

    def lead(self, figures: RolloutFigures, settle_seconds: float) -> None:
        """This worker became the coordinator: it decides batches over the fleet-wide `figures`,
        judging a wave `settle_seconds` after it opens (the others' jobs land a moment later)."""
        self.live.decides_batches = True
        self.live.rollout.figures = figures
        self.live.rollout.settle_seconds = settle_seconds

    def use_figures(self, figures: RolloutFigures | None) -> None:
        """The figures fleet-wide rules read from now on (None: this process's own jobs)."""
        self.live.rollout.figures = LocalFigures(self.state) if figures is None else figures

    def fleet_figures_wanted(self) -> list[str]:
        """The running batches whose rules read fleet-wide figures (waves, abort, verification)."""
        return ticks.batches_reading_figures(self.live)

    def starts_wanted(self) -> list[tuple[Batch, int]]:
        """The starts each rate-limited batch could use on this process now (decisions/ticks.py)."""
        return ticks.starts_wanted(self.live)

    def follow_catalog(self, loaded: LoadedCatalog) -> None:
        """Take the catalog version the coordinator applied (decisions/follow.py)."""
        self.post(follow.follow_catalog(self.live, loaded.catalog, loaded.files))
        for listener in self._reload_listeners:
            listener(loaded.catalog)

    def follow_shared(self, rows: dict[str, Any], package_status: dict[str, tuple[str, str]],
                      targets: dict[str, set[str]]) -> None:
        """Take the shared rows the coordinator committed, and act for this worker's devices."""
        self.post(follow.follow_rows(self.live, rows, package_status, targets))

    def publish_catalog(self, text: str, path: str) -> None:
        """The coordinator's applied catalog, written with the next commit (the rows it decided)."""
        self.state.publish_catalog(text, path)

    def take_devices(self, loaded: FleetState) -> None:
        """A partition came to this worker: take its devices' versions and jobs as `loaded`
        from the journal, then give them what they are owed. One step, no await: nothing
        decides for these devices before all of it is in."""
        for (device, module), (version, at) in loaded.versions.items():
            self.state.load_version(device, module, version, at)
        for job in sorted(loaded.jobs.values(), key=lambda job: job.id):
            self.state.load_job(job)
        self.post(follow.take_devices(self.live, loaded.devices()))

    async def settle_devices(self, holds: Callable[[DeviceId], bool]) -> None:
        """Return once nothing for the devices `holds` names waits to be written."""
        while self.state.pending_for(holds) or self.journal.busy:
            await self.settled()
            if self.journal.busy:
                await asyncio.sleep(0.01)

    def drop_devices(self, holds: Callable[[DeviceId], bool]) -> None:
        """Forget the devices `holds` names: their partition went to another worker."""
        self.state.drop_devices(holds)

    async def views_state(self) -> FleetState:
        """The fleet as views show it: this process's memory, or a cluster's reading of all."""
        return self.state if self.fleet_reading is None else await self.fleet_reading()

    # -- device reports: synchronous, from the broker's packet path --------------------
    def decide_version(self, device: DeviceId, module: str, version: str, *, deliver: bool = True) -> None:
        self.post(reports.report_version(self.live, device, module, version, deliver=deliver))

    def decide_progress(self, device: DeviceId, module: str, step: int, desc: str) -> None:
        self.post(reports.report_progress(self.live, device, module, step, desc))

    def decide_offer(self, device: DeviceId, module: str) -> dict[str, Any]:
        data = assignment.hand_out(self.live, device, module)
        self.post(self.live.take_out())
        return data

    def promises_made(self) -> int:
        """A count that grows with every promise decided (a job, a notice, a final state);
        a message whose decision changed it is acknowledged once `settled()`."""
        return self.state.promises

    async def mqtt_block(self, device: DeviceId, request: BlockRequest) -> bytes:
        """The binary reply frame to an MQTT block request (docs/protocol.md 3e)."""
        return await self.downloads.block(device, request)

    # -- who a device is ------------------------------------------------------------------
    def mqtt_login(self, client_id: str | None, username: str | None, password: str | bytes | None,
                   catalog: Catalog | None = None) -> DeviceId | None:
        """The device an MQTT CONNECT proves to be (by the live catalog, or `catalog`), or None."""
        catalog = catalog or self.live.catalog
        if catalog is None:
            return None
        return check_mqtt_login(catalog, client_id, username, password, self.settings.allow_plain_secret)

    def http_login(self, username: str, password: str) -> DeviceId | None:
        """The device HTTP Basic credentials prove to be, or None."""
        catalog = self.live.catalog
        if catalog is None:
            return None
        return check_http_login(catalog, username, password, self.settings.allow_plain_secret)

    def is_online(self, device: DeviceId) -> bool:
        return self.link.is_online(device)

    # -- downloads ---------------------------------------------------------------------------
    def url_device(self, raw_path: str, query: dict[str, str]) -> DeviceId:
        """The device a signed URL was issued to; UrlRejected when it is forged or expired."""
        return self.downloads.check_url(raw_path, query)[0]

    def authorize_download(self, raw_path: str, query: dict[str, str], key: str) -> tuple[DownloadFile, Transfer]:
        """The file a signed URL may fetch now, and the transfer to report; UrlRejected when the
        URL is forged or expired, Refused when its job may not fetch that file now."""
        device, job_id = self.downloads.check_url(raw_path, query)
        return self.downloads.authorize(device, job_id, key), Transfer(self.downloads, job_id)

    def package_file(self, key: str) -> DownloadFile | None:
        """A file the live catalog serves (for admins, who need no signed URL)."""
        files = self.live.files
        return files.by_key(key) if files is not None else None

    def package_files(self) -> list[DownloadFile]:
        """Every file the live catalog serves."""
        files = self.live.files
        return list(files.downloads()) if files is not None else []

    # -- the same, awaiting the commit (HTTP device API, tests) ------------------------
    async def on_version(self, device: DeviceId, module: str, version: str, *, deliver: bool = True) -> None:
        self.decide_version(device, module, version, deliver=deliver)
        await self.settled()

    async def on_progress(self, device: DeviceId, module: str, step: int, desc: str) -> None:
        """A progress report over HTTP. Refused (503) for a device this process no longer holds:
        its partition moved while the request's body came in, and the new holder must decide it."""
        if not self.live.holds(device):
            raise partition_moving()
        self.decide_progress(device, module, step, desc)
        await self.settled()

    async def offer(self, device: DeviceId, module: str) -> dict[str, Any]:
        data = self.decide_offer(device, module)
        await self.settled()
        return data

    # -- what admins read ------------------------------------------------------------------
    async def batch_summaries(self, *, removed: bool = False) -> list[dict[str, Any]]:
        """Every batch of the catalog from memory; with `removed`, also the batches that left
        it, read from the database (call `database_behind` first)."""
        source: Any = self.store if removed else FleetView(await self.views_state())
        return await batch_summaries(source, self.live.catalog, sha_of=self.current_sha,
                                     schedule=self.live.rollout.schedule, removed=removed)

    async def batch_report(self, name: str, *, live: bool) -> dict[str, Any] | None:
        """A batch's summary and every device's row: from memory for a batch of the catalog
        (`live`, as `is_live_batch` said), from the database for a removed one (`database_behind` first)."""
        source: Any = FleetView(await self.views_state()) if live else self.store
        return await batch_report(source, self.live.catalog, name, sha_of=self.current_sha,
                                  schedule=self.live.rollout.schedule)

    def is_live_batch(self, name: str) -> bool:
        catalog = self.live.catalog
        return catalog is not None and name in catalog.batches

    async def job_with_history(self, job_id: int) -> tuple[Job, list[tuple[Any, ...]]] | None:
        """A job as the database holds it and its history (`database_behind` first)."""
        job = await self.store.job(job_id)
        return (job, await self.store.history(job.id)) if job is not None else None

    async def device_list(self, query: DeviceQuery) -> dict[str, Any]:
        return device_list(await self.views_state(), self.live.catalog, query, self.link.is_online, self.last_seen)

    async def device_detail(self, device: DeviceId, offset: int, limit: int) -> dict[str, Any] | None:
        return await device_detail(self.store, await self.views_state(), self.live.catalog, device, self.link.is_online,
                                   self.last_seen, offset, limit)

    async def version_counts(self) -> dict[str, Any]:
        return version_counts(await self.views_state())

    def package_list(self) -> dict[str, Any]:
        return package_list(self.live.catalog, self.live.files, self.package_status)

    def figures(self) -> EngineFigures:
        """What GET /metrics shows of the engine and the fleet."""
        return fleet_figures(self.live, self.pushes_sent, self.reloads)

    # -- admin actions -----------------------------------------------------------------
    async def retry(self, batch_name: str, device_names: list[str] | None = None) -> int:
        self._writable()
        count, sends = admin.retry(self.live, batch_name, device_names)
        self.post(sends)
        await self._admin_settled()
        return count

    async def cancel_devices(self, batch_name: str, device_names: list[str]) -> int:
        self._writable()
        count, sends = admin.cancel_devices(self.live, batch_name, device_names)
        self.post(sends)
        await self._admin_settled()
        return count

    async def pause(self, batch_name: str) -> None:
        self._writable()
        self._deciding()
        self.post(admin.pause(self.live, batch_name))
        await self._admin_settled()

    async def resume(self, batch_name: str) -> None:
        self._writable()
        self._deciding()
        self.post(admin.resume(self.live, batch_name))
        await self._admin_settled()

    # -- rollouts ------------------------------------------------------------------------
    async def run_rollouts(self, every_seconds: float = ROLLOUT_TICK_SECONDS) -> None:
        """Waves, halts, retries, schedules, windows and rates move with time, not only with
        reports: one tick a second. Its sends leave after their commit, like any other."""
        while True:
            try:
                await asyncio.wait_for(self._tick_now.wait(), every_seconds)
            except TimeoutError:
                pass
            self._tick_now.clear()
            try:
                if self.before_tick is not None:
                    await self.before_tick()
                self.post(ticks.rollout_tick(self.live))
            except Exception:  # keep the loop alive; the next tick retries
                log.exception("rollout tick failed")

    def tick_soon(self) -> None:
        """Run the rollout tick now rather than at its second (a job ended somewhere in a cluster)."""
        self._tick_now.set()

    # -- retention ---------------------------------------------------------------------
    async def prune(self, days: float, *, dry_run: bool = False) -> dict[str, int]:
        """Remove (or, dry, count) the finished history of batches that left the catalog and
        ended more than `days` ago (otacore/storage/retention.py says what stays). Runs in steps
        between commits: devices never wait for it. batch -> jobs removed."""
        async with self._prune_lock:  # one at a time: each counts what is left when it starts
            keep = set(self.catalog.batches) if self.catalog is not None else set(self.state.batches)
            before = self.live.clock() - days * 86400
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
                if self.live.decides_batches:  # in a cluster, the coordinator prunes for everyone
                    await self.prune(days)
            except Exception:  # the disk may be full, the database moved: the next round retries
                log.exception("retention failed; it tries again in an hour")
            await asyncio.sleep(every_seconds)

    # -- timeouts ----------------------------------------------------------------------
    async def fail_stale_jobs(self, now: float | None = None) -> int:
        count, sends = ticks.fail_stale_jobs(self.live, now)
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
