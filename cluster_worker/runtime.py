"""The OTA server's runtime (otaserver/runtime.py) as a cluster worker: its MQTT side is a
RabbitMQ cluster, reached over AMQP (worker.py, link.py), and its HTTP server also answers
RabbitMQ's login and topic checks (fileserver/broker_auth.py)."""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

import aiohttp

from aiohttp import web

from fileserver.broker_auth import BrokerAuth
from fileserver.metrics import BrokerFigures, ClusterFigures
from otacore.catalog.loading import LoadedCatalog
from otacore.config.settings import Settings
from otacore.errors import Refused
from otacore.messaging import DeviceLink, DeviceMessages
from otacore.protocol.credentials import DeviceId
from otacore.storage.journal import Journal
from otaserver.runtime import ServerRuntime

from .fleet_share import FleetShare
from .forwarding import FORWARDED, Forwarding
from .link import AmqpLink
from .sessions import SessionBindings
from .worker import ClusterWorker

log = logging.getLogger("ota.cluster")


class WorkerRuntime(ServerRuntime):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.link = AmqpLink(self.spawn)
        self.worker: ClusterWorker | None = None
        self.auth: BrokerAuth | None = None
        self.sessions = SessionBindings(self.link, lambda: self.worker.connection if self.worker else None)
        # With cluster.postgres: several workers share the fleet (fleet_share.py).
        self.share = FleetShare(settings, self.stop_serving) if settings.cluster_postgres is not None else None
        self.forwarding: Forwarding | None = None

    @property
    def advertised_url(self) -> str:
        """How the other workers reach this one's HTTP (cluster.advertise, or http.bind)."""
        settings = self.settings
        if settings.cluster_advertise:
            return settings.cluster_advertise.rstrip("/")
        host = settings.http_host if settings.http_host not in ("0.0.0.0", "::") else socket.gethostname()
        return f"http://{f'[{host}]' if ':' in host else host}:{settings.http_port}"

    async def open_journal(self) -> tuple[Any, Journal]:
        if self.share is None:
            return await super().open_journal()
        return await self.share.open_journal()

    async def first_catalog(self) -> LoadedCatalog:
        if self.share is None:
            return await super().first_catalog()
        assert self.engine is not None
        return await self.share.first_catalog(self.engine, self.advertised_url)

    async def reload_catalog(self) -> LoadedCatalog:
        """SIGHUP: on a worker that is not the coordinator, the coordinator reloads (and this
        worker follows the version it publishes)."""
        share, engine = self.share, self.engine
        assert engine is not None
        if share is None or share.coordinator:
            return await engine.reload()
        url = share.coordinator_url()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            async with session.post(f"{url}/admin/api/reload", headers={
                    "Authorization": f"Bearer {self.admin_token}", FORWARDED: "1"}) as answer:
                data = await answer.json(content_type=None)
        if answer.status != 200:
            errors = "; ".join(data.get("errors") or []) or data.get("message", "")
            raise Refused(answer.status, f"the coordinator refused the reload: {errors}")
        await asyncio.sleep(0.5)  # its version reaches this worker by notification
        loaded = engine.loaded_catalog
        assert loaded is not None
        return loaded

    def device_link(self) -> DeviceLink:
        return self.link

    def broker_figures(self, messages: DeviceMessages) -> BrokerFigures:
        return BrokerFigures(devices_online=self.link.online_devices, messages=messages.received,
                             tls_failures=self.tls_failures, cluster=self.cluster_figures)

    def cluster_figures(self) -> ClusterFigures:
        worker = self.worker
        return ClusterFigures(
            connected=worker is not None and worker.connected.is_set(), connects=worker.connects if worker else 0,
            rekeyed=worker.rekeyed if worker else 0, consumed=worker.consumed if worker else 0,
            ignored=worker.ignored if worker else 0, published=self.link.published, returned=self.link.returned,
            sessions_bound=self.sessions.bound,
            auth_answers=self.auth.answers if self.auth is not None else {},
            **self._share_figures())

    def _share_figures(self) -> dict[str, Any]:
        membership = self.share.membership if self.share is not None else None
        if membership is None:
            return {}
        return {"partitions_held": len(membership.held), "coordinator": membership.coordinator,
                "partition_moves": membership.moves,
                "forwarded": self.forwarding.forwarded if self.forwarding is not None else 0}

    def add_routes(self, app: web.Application) -> None:
        assert self.engine is not None
        self.auth = BrokerAuth(self.engine, self.settings.cluster_vhost, self.logged_in, self.sessions.subscribed,
                               token=self.settings.cluster_auth_token)
        if self.settings.cluster_auth_token is None:
            log.warning("cluster.auth_token is not set: anyone who reaches http.bind can ask the login endpoints "
                        "(/broker-auth/...); set it, and put it in RabbitMQ's auth_http URLs (docs/cluster.md)")
        self.auth.add_routes(app)
        if self.share is not None:
            self.auth.shared_claim = self.share.claim_client_id
            self.forwarding = Forwarding(self.share, self.engine)
            app.middlewares.append(self.forwarding.middleware)

    def logged_in(self, device: DeviceId, client_id: str) -> None:
        """RabbitMQ let the device in (the auth endpoint said so)."""
        self.seen(device)
        self.sessions.logged_in(client_id)

    def seen(self, device: DeviceId) -> None:
        """The device logged in or sent a message: present, and alive now."""
        self.link.seen(device)
        self.last_seen[f"{device.device_name}&{device.product_key}"] = time.time()

    def stop_serving(self, reason: str) -> None:
        """A cluster misconfiguration: said once, and ota-server stops (exit status 1)."""
        log.error("cluster: %s", reason)
        self.fatal_error = reason
        if self.on_fatal is not None:
            self.on_fatal()

    def admits(self, device: DeviceId) -> bool:
        """Is the device in the live catalog? A removed one keeps its open connection (the
        worker cannot close it), but what it sends is ignored."""
        catalog = self.engine.catalog if self.engine is not None else None
        product = catalog.products.get(device.product_key) if catalog is not None else None
        return product is not None and product.has_device(device.device_name)

    async def start(self) -> None:
        await super().start()
        assert self.messages is not None
        self.worker = ClusterWorker(self.settings, self.messages, self.link, self.seen, self.admits, self.stop_serving)
        self.worker.start()
        if self.share is not None:
            self.share.start(self.worker, self.link)

    async def stop(self) -> None:
        if self.share is not None:
            await self.share.stop()  # partitions released first: the other workers take them at once
        if self.forwarding is not None:
            await self.forwarding.close()
        await self.sessions.stop()
        if self.worker is not None:
            await self.worker.stop()  # no new messages; what was decided is written below
            self.worker = None
        await super().stop()
