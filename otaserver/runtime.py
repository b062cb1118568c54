"""The OTA server's runtime, whatever carries the device messages: at start the data_dir lock,
the store, the journal, the engine, the device messages and the HTTP server, in that order;
taken down in the reverse order.

An MQTT side subclasses it and says what only it knows: the engine's `DeviceLink` (where
pushes go), the broker figures for /metrics, the connections and listening sockets the
descriptor budget watches, and what a reload does to sessions whose credentials went.
The embedded broker's side is broker_plugin/runtime.py; the cluster worker's is
cluster_worker/runtime.py.

While it runs, it checks every second (a few stat() calls, in a worker thread) that data_dir
and the database are the ones it opened. If not (deleted, replaced) it writes nothing more,
logs the reason and calls `on_fatal` (ota-server then stops, exit status 1); it also puts a
deleted data_dir/admin-token back.
"""
from __future__ import annotations

import abc
import asyncio
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from fileserver.aiohttp_internals import http_listening_sockets
from fileserver.app import create_app
from fileserver.connection_guard import HttpSite
from fileserver.metrics import BrokerFigures
from otacore.catalog.loading import LoadedCatalog
from otacore.catalog.model import Catalog
from otacore.config.settings import Settings
from otacore.engine import OtaEngine
from otacore.messaging import DeviceLink, DeviceMessages
from otacore.protocol.credentials import DeviceId
from otacore.storage.data_dir import (DataDirLock, DataDirWatch, admin_token, database_path, remove_server_info,
                                      url_signing_key, write_server_info)
from otacore.storage.journal import Journal
from otacore.storage.store import Store, check_database

from . import tls as tls_contexts
from .connection_budget import ConnectionBudget

log = logging.getLogger("ota.server")

WATCH_SECONDS = 1.0


class ServerRuntime(abc.ABC):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store: Store | None = None
        self.journal: Journal | None = None
        self.engine: OtaEngine | None = None
        self.admin_token = ""
        self.http_url = ""
        self.startup_error: BaseException | None = None
        # In someone's own broker the log is the only report; ota-server prints it itself.
        self.log_startup_error = True
        self.fatal_error: str | None = None  # why it stopped writing while running
        self.on_fatal: Callable[[], None] | None = None  # ota-server: stop the process
        # Username `{dn}&{pk}` -> when that device last sent an MQTT message or connected
        # (epoch seconds): the MQTT side writes it, the admin API reads it through the engine.
        self.last_seen: dict[str, float] = {}
        self._runner: web.AppRunner | None = None
        # Workers sharing a PostgreSQL journal may share one data_dir (its catalog copies,
        # diffs, URL key and admin token); an embedded server never shares it.
        self._lock = DataDirLock(settings.data_dir, shared=settings.cluster_postgres is not None)
        self._tasks: set[asyncio.Task[None]] = set()
        self._budget: ConnectionBudget | None = None
        self._watch: asyncio.Task[None] | None = None
        self.messages: DeviceMessages | None = None  # the device OTA topics in (the MQTT side feeds it)
        self.tls_failures: Counter[tuple[str, str]] = Counter()  # (endpoint, reason): failed TLS handshakes

    # -- what the MQTT side says -------------------------------------------------------------
    @abc.abstractmethod
    def device_link(self) -> DeviceLink:
        """How the engine reaches devices: the embedded broker's sessions, or the cluster's AMQP link."""

    def broker_figures(self, messages: DeviceMessages) -> BrokerFigures:
        return BrokerFigures(messages=messages.received, tls_failures=self.tls_failures)

    def mqtt_connections(self) -> int:
        """Connections the MQTT side holds in this process (the descriptor budget counts them)."""
        return 0

    def mqtt_listening_sockets(self) -> list[socket.socket]:
        return []

    def drop_revoked_sessions(self, catalog: Catalog) -> None:
        """After a reload: sessions of devices removed or whose secret changed (credentials are
        otherwise only checked at CONNECT)."""

    def add_routes(self, app: web.Application) -> None:
        """HTTP endpoints only this MQTT side serves."""

    async def open_journal(self) -> tuple[Any, Journal]:
        """The store (reads) and the journal (writes, with the state they hold): SQLite in data_dir."""
        database = database_path(self.settings.data_dir)
        await asyncio.to_thread(check_database, database)  # a damaged one: refused with what to do
        store = await Store.open(database)  # makes or migrates the schema first
        try:
            return store, await asyncio.to_thread(Journal.open, database, time.time)
        except BaseException:
            await store.close()  # its worker thread would keep the process alive
            raise

    async def first_catalog(self) -> LoadedCatalog:
        """The catalog at start: validated and applied (ConfigError: the server does not start)."""
        assert self.engine is not None
        return await self.engine.reload()

    async def reload_catalog(self) -> LoadedCatalog:
        """SIGHUP: validate and apply the catalog again."""
        assert self.engine is not None
        return await self.engine.reload()

    # -- start and stop ------------------------------------------------------------------------
    async def start(self) -> None:
        settings = self.settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()  # before touching the database another server may be using
        self.store, self.journal = await self.open_journal()
        self.engine = OtaEngine(settings, self.store, self.journal, self.device_link(),
                                url_signing_key(settings.data_dir), last_seen=self.seen_at)
        self.engine.start()
        self.engine.on_reload(self.drop_revoked_sessions)
        loaded = await self.first_catalog()
        self.messages = DeviceMessages(self.engine, self.device_link(), self.spawn)
        self.admin_token = admin_token(settings.data_dir, settings.admin_token)
        app = create_app(self.engine, self.admin_token, crowded=self._crowded,
                         broker=self.broker_figures(self.messages))
        self.add_routes(app)
        # keepalive 15 s: an idle download connection holds a descriptor a large fleet needs.
        self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=15)
        await self._runner.setup()
        tls = None
        if settings.tls_certfile is not None:
            tls_contexts.install()
            tls = tls_contexts.server_context(settings, settings.tls_certfile, settings.tls_keyfile, endpoint="https",
                                              failures=self.tls_failures)
        separate_tls = tls is not None and settings.tls_port is not None
        # With http.tls.bind, plain HTTP stays on http.bind and HTTPS gets its own address.
        # HttpSite: a TCPSite whose connections the header deadline and the cap on waiting
        # connections see from their accept (fileserver/connection_guard.py).
        await HttpSite(self._runner, settings.http_host, settings.http_port,
                       ssl_context=None if separate_tls else tls).start()
        if separate_tls:
            await HttpSite(self._runner, settings.tls_host, settings.tls_port, ssl_context=tls).start()
        host, port = self._runner.addresses[0][:2]
        scheme = "https" if tls is not None and not separate_tls else "http"
        connect_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self.http_url = f"{scheme}://{connect_host if ':' not in connect_host else f'[{connect_host}]'}:{port}"
        for address in self._runner.addresses:
            log.info("OTA: file server listening on %s:%s", *address[:2])
        self._write_server_info()
        self._budget = ConnectionBudget(self._connections, self._listening_sockets)
        self._budget.start()
        watch = DataDirWatch(settings.data_dir, self._lock.identity,
                             None if settings.admin_token else self.admin_token)
        self._watch = asyncio.get_running_loop().create_task(self._watch_data_dir(watch), name="ota-data-dir")
        self._watch.add_done_callback(self._done)  # a failure is logged
        catalog = loaded.catalog
        log.info("OTA: public URL %s; catalog %s: %d products, %d packages, %d batches",
                 settings.public_url, catalog.path, len(catalog.products), len(catalog.packages),
                 len(catalog.batches))

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        if self._budget is not None:
            await self._budget.stop()
            self._budget = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.engine is not None:
            await self.engine.stop()  # writes what is left
        if self.store is not None:
            await self.store.close()
            self.store = None
        remove_server_info(self.settings.data_dir, os.getpid())
        self._lock.release()

    # -- while running -------------------------------------------------------------------------
    async def _watch_data_dir(self, watch: DataDirWatch) -> None:
        assert self.engine is not None
        journal, last_error = self.journal, ""
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            try:
                reason = await asyncio.to_thread(self._check_data_dir, watch, journal)
            except OSError as exc:  # e.g. data_dir made unreadable: not a replacement; said once
                if str(exc) != last_error:
                    log.warning("OTA: cannot check data_dir %s: %s", watch.data_dir, exc)
                    last_error = str(exc)
                continue
            if reason is not None:
                self._stop_writing(reason)
                return

    @staticmethod
    def _check_data_dir(watch: DataDirWatch, journal: Journal) -> str | None:
        """Why the server must stop writing, or None (blocking: a few stat() calls)."""
        reason = watch.moved() or journal.abandoned or journal.moved()
        if reason is None:
            watch.restore_token()
        return reason

    def _stop_writing(self, reason: str) -> None:
        self.fatal_error = reason
        if self.journal is not None:
            self.journal.abandon(reason)
        log.error("OTA: %s; stopping without writing to it again: start ota-server again to use what is there "
                  "now", reason)
        if self.on_fatal is not None:
            self.on_fatal()

    def _crowded(self) -> bool:
        return self._budget is not None and self._budget.paused

    def seen_at(self, device: DeviceId) -> float | None:
        """When the device last sent an MQTT message or connected; None: not since the start."""
        return self.last_seen.get(f"{device.device_name}&{device.product_key}")

    def _connections(self) -> int:
        http = len(self._runner.server.connections) if self._runner is not None and self._runner.server else 0
        return self.mqtt_connections() + http

    def _listening_sockets(self) -> list[Any]:
        http = http_listening_sockets(self._runner) if self._runner is not None else []
        return [*self.mqtt_listening_sockets(), *http]

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` on its own; kept referenced until done, its failure logged."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("OTA task failed", exc_info=task.exception())

    def _write_server_info(self) -> None:
        """Tell `otactl` (same data_dir) where this server's admin API is and what it serves."""
        write_server_info(self.settings.data_dir, {"http_url": self.http_url, "pid": os.getpid(),
                                                   "catalog": str(self.settings.catalog_path)})
