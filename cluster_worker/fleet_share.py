"""A worker's share of a fleet several workers serve through one PostgreSQL (docs/cluster.md,
"Several workers"): the glue between its engine, its AMQP consumer and the cluster.

- **Partitions** (membership.py): taking one loads its devices from PostgreSQL, gives them
  what their batches owe (decisions/follow.py take_devices) and starts consuming its queue;
  releasing one stops consuming, waits until its devices' changes are committed and forgets
  them.
- **The coordinator** (one worker, elected by an advisory lock) decides for batches: it
  applies catalogs and publishes each version, and before each rollout tick reads the whole
  fleet's jobs in the batches whose waves, abort rule or verification need them. The others
  take what it commits (shared rows, catalog versions) when PostgreSQL notifies them.
- **Rates** come from PostgreSQL grants (rate_grants.py); job and push ids from blocks
  reserved in its sequences; views read the whole fleet (fleet_sync.py FleetReading).
"""
from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncpg

from otacore.catalog.loading import LoadedCatalog, prepare_catalog
from otacore.catalog.model import Catalog
from otacore.config.settings import Settings
from fileserver.broker_auth import CLIENT_ID_HELD_SECONDS
from otacore.errors import Refused, partition_moving
from otacore.fleet.id_blocks import IdBlocks
from otacore.fleet.state import FleetState
from otacore.protocol.credentials import DeviceId
from otacore.protocol.routing_keys import partition_of
from otacore.storage.journal import Journal
from otacore.storage.pg_store import PgStore
from otacore.storage.postgres_backend import PostgresBackend, load_partitions

from . import fleet_sync
from .membership import COORDINATOR_LOCK, Membership
from .rate_grants import GrantedRate

if TYPE_CHECKING:
    from otacore.engine import OtaEngine

    from .link import AmqpLink
    from .worker import ClusterWorker

log = logging.getLogger("ota.cluster")

CLAIM_CACHE_SECONDS = 60.0  # a client id's owner confirmed this recently needs no round trip
RELEASE_SECONDS = 30.0  # at most this long to commit a released partition's changes
ID_BLOCK = 10_000  # job or push ids reserved at a time; a worker keeps one spare block
SHARED_POLL_SECONDS = 5.0  # the shared rows are read again this often even without a notification
CATALOG_WAIT_LOG_SECONDS = 10.0
# A wave is judged this long after its batch started or it opened: every worker has given
# the newly chosen devices their jobs by then (it acts within milliseconds of the notification).
WAVE_SETTLE_SECONDS = 3.0


class FleetShare:
    def __init__(self, settings: Settings, fatal: Callable[[str], None]) -> None:
        assert settings.cluster_postgres is not None
        self.settings = settings
        self.dsn = settings.cluster_postgres
        self._fatal = fatal
        self.pool: asyncpg.Pool | None = None  # login checks, views, rate grants, catalog reads
        self.beat_pool: asyncpg.Pool | None = None  # the heartbeat's own connection (membership.py)
        self.membership: Membership | None = None
        self.engine: OtaEngine | None = None
        self.worker: ClusterWorker | None = None
        self.link: AmqpLink | None = None
        self.rate: GrantedRate | None = None
        self.reading: fleet_sync.FleetReading | None = None
        self.catalog_version = 0  # the id of the ota_catalog row this worker applies
        self._published = ""  # sha256 of the catalog text this worker last published or applied
        self._listener: asyncpg.Connection | None = None
        self._shared_due = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.push_ids = IdBlocks("push ids")
        self.job_ids = IdBlocks("job ids")  # the journal's FleetState takes its ids from these
        self.journal: Journal | None = None  # opened here (open_journal), then handed to the engine
        self._claims: dict[str, tuple[DeviceId, float]] = {}  # client id -> owner, when this worker last saw it

    # -- the journal ----------------------------------------------------------------------------
    async def open_journal(self) -> tuple[PgStore, Journal]:
        backend = await PostgresBackend.open(self.dsn, self.settings.cluster_partitions)
        try:
            state = FleetState()
            await backend.load_shared(state)
            state.job_ids = self.job_ids  # from blocks reserved in PostgreSQL
            journal = Journal(backend, state, time.time)
            for _ in range(2):
                await self._reserve(backend, "job_ids", self.job_ids)
                await self._reserve(backend, "push_ids", self.push_ids)
            store = await PgStore.open(self.dsn)
            self.pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=6)
            self.beat_pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=1)
        except BaseException:
            await backend.close()
            raise
        self.journal = journal
        return store, journal

    # -- start: join, then the catalog -----------------------------------------------------------
    async def first_catalog(self, engine: "OtaEngine", url: str) -> LoadedCatalog:
        assert self.pool is not None
        self.engine = engine
        self.rate = GrantedRate(self.pool)
        self.reading = fleet_sync.FleetReading(self.pool)
        engine.share_fleet(rate=self.rate, push_ids=self._next_push_id, holds=self.holds,
                           reading=self.reading.fresh, before_tick=self._before_tick)
        engine.on_reload(self._publish_catalog)
        assert self.beat_pool is not None
        self.membership = await Membership.open(self.beat_pool, self.journal, url, self.settings.cluster_partitions,
                                                take=self._take, release=self._release,
                                                coordinate=self._become_coordinator, fatal=self._fatal)
        await self._listen()
        if await self.membership._lock(COORDINATOR_LOCK):
            self.membership.coordinator = True
            self._lead()
            loaded = await self._coordinator_catalog()
        else:
            loaded = await self._follow_catalog(wait=True)
            await self._follow_shared()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow_loop(), name="ota-follow"),
                       loop.create_task(self._ids_loop(), name="ota-ids")]
        return loaded

    def start(self, worker: "ClusterWorker", link: "AmqpLink") -> None:
        """Partitions are taken once the AMQP side exists (taking one starts consuming it)."""
        assert self.membership is not None
        self.worker, self.link = worker, link
        self.membership.start()

    async def stop(self) -> None:
        if self.membership is not None:
            await self.membership.stop()  # releases every partition: the others take them at once
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            await self._listener.close()
        for pool in (self.pool, self.beat_pool):
            if pool is not None:
                await pool.close()

    @property
    def coordinator(self) -> bool:
        return self.membership is not None and self.membership.coordinator

    # -- the catalog ---------------------------------------------------------------------------
    async def _coordinator_catalog(self) -> LoadedCatalog:
        """The coordinator at start: the version the cluster runs, or (the first start ever)
        the catalog file, applied and published."""
        assert self.engine is not None and self.pool is not None
        async with self.pool.acquire() as conn:
            version = await fleet_sync.latest_catalog(conn)
        if version is None:
            return await self.engine.reload()  # published by _publish_catalog
        self.catalog_version, self._published = version.id, version.sha256
        return await self.engine.reload(fleet_sync.catalog_file_for(version, self.settings.catalog_path))

    def _publish_catalog(self, catalog: Catalog) -> None:
        """The coordinator applied a catalog: its text goes to the other workers in the same
        transaction as the batch rows decided with it (a coordinator killed before that commit
        leaves neither)."""
        if not self.coordinator or self.engine is None:
            return
        text = catalog.path.read_text(encoding="utf-8")
        if fleet_sync.catalog_sha(text) == self._published:
            return  # the version the cluster runs already (a coordinator's start)
        self._published = fleet_sync.catalog_sha(text)
        self.engine.publish_catalog(text, str(catalog.path))
        log.info("cluster: catalog %s published with the changes it made", catalog.path)

    async def _follow_catalog(self, *, wait: bool = False) -> LoadedCatalog | None:
        """Apply the coordinator's latest catalog version if it is newer than this worker's."""
        assert self.engine is not None and self.pool is not None
        waited = 0.0
        while True:
            async with self.pool.acquire() as conn:
                version = await fleet_sync.latest_catalog(conn)
            if version is not None or not wait:
                break
            if waited % CATALOG_WAIT_LOG_SECONDS < 0.5 and waited:
                log.info("cluster: waiting for the coordinator's first catalog")
            await asyncio.sleep(0.5)
            waited += 0.5
        if version is None or version.id <= self.catalog_version:
            return None
        path = await asyncio.to_thread(fleet_sync.catalog_file_for, version, self.settings.catalog_path)
        try:
            loaded = await asyncio.to_thread(prepare_catalog, self.settings, path)
        except Exception as exc:
            reason = (f"cannot apply catalog version {version.id} that the coordinator applied ({exc}); this worker "
                      "stops rather than serve another version (check its package files and catalog path)")
            self._fatal(reason)
            raise
        self.catalog_version, self._published = version.id, version.sha256  # (not published again)
        self.engine.follow_catalog(loaded)
        log.info("cluster: follows catalog version %d", version.id)
        return loaded

    # -- the shared rows ----------------------------------------------------------------------
    async def _listen(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        for channel in (fleet_sync.SHARED_CHANNEL, fleet_sync.CATALOG_CHANNEL):
            await conn.add_listener(channel, lambda *_: self._shared_changed())
        await conn.add_listener(fleet_sync.FINAL_CHANNEL, lambda *_: self._final())
        self._listener = conn

    def _shared_changed(self) -> None:
        self._shared_due.set()
        if self.reading is not None:
            self.reading.stale()

    def _final(self) -> None:
        """A job ended somewhere: the coordinator looks at the batch rules now, not in a second."""
        if self.coordinator and self.engine is not None:
            self.engine.tick_soon()

    async def _follow_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._shared_due.wait(), SHARED_POLL_SECONDS)
            except TimeoutError:
                pass
            self._shared_due.clear()
            if self.coordinator:
                continue  # its memory is what the others follow
            try:
                await self._follow_catalog()
                await self._follow_shared()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001  (PostgreSQL away: the next round tries again)
                log.warning("cluster: cannot read the shared rows (%r); trying again", exc)
                await asyncio.sleep(1)
                self._shared_due.set()
            if self._listener is None or self._listener.is_closed():
                try:
                    await self._listen()
                except Exception as exc:  # noqa: BLE001
                    log.warning("cluster: cannot listen to PostgreSQL (%r); reading every %g s", exc,
                                SHARED_POLL_SECONDS)

    async def _follow_shared(self) -> None:
        assert self.pool is not None and self.engine is not None
        async with self.pool.acquire() as conn:
            rows = await fleet_sync.read_shared(conn)
        if self.coordinator:
            return  # became the coordinator meanwhile: its memory is newer
        self.engine.follow_shared(rows.batches, rows.package_status, rows.targets)

    # -- the coordinator -------------------------------------------------------------------------
    async def _become_coordinator(self) -> None:
        """Another coordinator went (or none was): take the rows and catalog as committed, then decide."""
        await self._follow_catalog()
        async with self.pool.acquire() as conn:  # type: ignore[union-attr]
            rows = await fleet_sync.read_shared(conn)
        assert self.engine is not None
        self.engine.follow_shared(rows.batches, rows.package_status, rows.targets)
        self._lead()

    def _lead(self) -> None:
        assert self.engine is not None
        self.engine.lead(fleet_sync.SharedFigures(), WAVE_SETTLE_SECONDS)

    async def _before_tick(self) -> None:
        """Before each rollout tick: the coordinator reads the fleet-wide figures its rules
        need; every worker asks for the starts its rate-limited batches need."""
        engine = self.engine
        assert engine is not None and self.pool is not None and self.rate is not None
        if self.coordinator:
            async with self.pool.acquire() as conn:
                engine.use_figures(await fleet_sync.read_figures(conn, engine.fleet_figures_wanted()))
        else:
            engine.use_figures(None)
        await self.rate.refill(engine.starts_wanted())

    # -- partitions ----------------------------------------------------------------------------
    def _holds(self, partition: int) -> Callable[[DeviceId], bool]:
        partitions = self.settings.cluster_partitions
        return lambda device: partition_of(device, partitions) == partition

    async def _take(self, partition: int) -> None:
        assert self.engine is not None and self.pool is not None and self.worker is not None
        loaded = FleetState()
        async with self.pool.acquire() as conn:
            await load_partitions(conn, loaded, {partition})
        if self.link is not None:
            self.link.presume(loaded.devices())
        self.engine.take_devices(loaded)
        await self.worker.consume(partition)

    async def _release(self, partition: int) -> None:
        assert self.engine is not None and self.worker is not None
        await self.worker.stop_consuming(partition)
        holds = self._holds(partition)
        engine = self.engine
        async with asyncio.timeout(RELEASE_SECONDS):  # a journal that cannot write: the stop goes on without
            await engine.settle_devices(holds)
        engine.drop_devices(holds)
        if self.link is not None:
            self.link.forget(holds)

    # -- ids -----------------------------------------------------------------------------------
    def _next_push_id(self) -> int:
        return (self.push_ids.take() - 1) % (2**31 - 1) + 1  # 1..2^31-1, as firmware keeps it

    @staticmethod
    async def _reserve(backend: PostgresBackend, sequence: str, ids: IdBlocks) -> None:
        first = await backend.reserve(sequence, ID_BLOCK)
        ids.add(range(first, first + ID_BLOCK))

    async def _ids_loop(self) -> None:
        """Keep a spare block of job ids and of push ids reserved."""
        while True:
            await asyncio.sleep(0.2)
            if self.journal is None:
                continue
            try:
                backend: Any = self.journal.backend
                if not self.job_ids.blocks:
                    await self._reserve(backend, "job_ids", self.job_ids)
                if not self.push_ids.blocks:
                    await self._reserve(backend, "push_ids", self.push_ids)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                log.warning("cluster: cannot reserve ids (%r); trying again", exc)
                await asyncio.sleep(1)

    # -- what other workers are asked --------------------------------------------------------------
    def holder_url(self, device: DeviceId) -> str | None:
        """The URL of the worker holding the device's partition (None: this one). Refused (503)
        while nobody holds it (it is moving): answered here, the device's state would be made
        in a worker that does not hold it."""
        membership = self.membership
        if membership is None:
            return None
        partition = partition_of(device, self.settings.cluster_partitions)
        if partition in membership.held:
            return None
        url = membership.holders.get(partition)
        if url is None or url == membership.url:
            raise partition_moving()
        return url

    async def refresh_routes(self) -> None:
        """Read the workers' rows now (a worker named by the routes did not answer)."""
        if self.membership is not None:
            await self.membership.refresh()

    def holds(self, device: DeviceId) -> bool:
        membership = self.membership
        return membership is not None and partition_of(device, self.settings.cluster_partitions) in membership.held

    def client_holder_url(self, client_id: str) -> str | None:
        """The URL of the worker answering for this client id (None: this one, or nobody now)."""
        membership = self.membership
        if membership is None:
            return None
        partition = zlib.crc32(client_id.encode()) % self.settings.cluster_partitions
        return None if partition in membership.held else membership.holders.get(partition)

    async def claim_client_id(self, client_id: str, device: DeviceId) -> bool:
        """The broker's login check, with client ids owned fleet-wide (one round trip per login;
        a login of the device that this worker saw own it within a minute costs none)."""
        now = time.monotonic()
        cached = self._claims.get(client_id)
        if cached is not None and cached[0] == device and now - cached[1] < CLAIM_CACHE_SECONDS:
            return True
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            claimed = await fleet_sync.claim_client_id(conn, client_id, device, CLIENT_ID_HELD_SECONDS)
        if claimed:
            self._claims[client_id] = (device, now)
            if len(self._claims) > 100_000:
                self._claims.pop(next(iter(self._claims)))
        return claimed

    def other_worker_urls(self) -> list[str]:
        membership = self.membership
        return [] if membership is None else [url for url in membership.worker_urls() if url != membership.url]

    def coordinator_url(self) -> str | None:
        membership = self.membership
        if membership is None or membership.coordinator:
            return None
        if membership.coordinator_url is None:
            raise Refused(503, "no coordinator right now (one is being chosen); try again in a few seconds")
        return membership.coordinator_url
