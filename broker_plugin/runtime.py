"""The OTA server's running parts inside one broker: settings, store, engine, HTTP sidecar."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from typing import Any

from aiohttp import web

from fileserver.app import create_app
from otacore.engine import OtaEngine
from otacore.secrets_store import admin_token, url_signing_key
from otacore.settings import Settings
from otacore.store import Store

from .amqtt_private import SessionDelivery, broker_of

log = logging.getLogger("ota.server")
DB_NAME = "ota.sqlite3"
SERVER_INFO = "server.json"


class OtaRuntime:
    def __init__(self, settings: Settings, delivery: SessionDelivery) -> None:
        self.settings = settings
        self.delivery = delivery
        self.store: Store | None = None
        self.engine: OtaEngine | None = None
        self.admin_token = ""
        self.http_url = ""
        self.startup_error: BaseException | None = None
        self._runner: web.AppRunner | None = None
        self._timeouts: asyncio.Task[None] | None = None

    async def start(self) -> None:
        settings = self.settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = await Store.open(settings.data_dir / DB_NAME)
        self.engine = OtaEngine(settings, self.store, self.delivery, url_signing_key(settings.data_dir))
        loaded = await self.engine.reload()
        self.admin_token = admin_token(settings.data_dir, settings.admin_token)
        self._runner = web.AppRunner(create_app(self.engine, self.admin_token), access_log=None)
        await self._runner.setup()
        tls = None
        if settings.tls_certfile is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(settings.tls_certfile, settings.tls_keyfile)
        separate_tls = tls is not None and settings.tls_port is not None
        # With http.tls.bind, plain HTTP stays on http.bind and HTTPS gets its own address.
        await web.TCPSite(self._runner, settings.http_host, settings.http_port,
                          ssl_context=None if separate_tls else tls).start()
        if separate_tls:
            await web.TCPSite(self._runner, settings.tls_host, settings.tls_port, ssl_context=tls).start()
        host, port = self._runner.addresses[0][:2]
        scheme = "https" if tls is not None and not separate_tls else "http"
        connect_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self.http_url = f"{scheme}://{connect_host if ':' not in connect_host else f'[{connect_host}]'}:{port}"
        for address in self._runner.addresses:
            log.info("OTA: file server listening on %s:%s", *address[:2])
        self._write_server_info()
        self._timeouts = asyncio.get_running_loop().create_task(self.engine.run_timeouts())
        catalog = loaded.catalog
        log.info("OTA: public URL %s; catalog %s: %d products, %d packages, %d batches",
                 settings.public_url, catalog.path, len(catalog.products), len(catalog.packages),
                 len(catalog.batches))

    def _write_server_info(self) -> None:
        """Tell `otactl` (same data_dir) where the admin API of this server listens."""
        info = {"http_url": self.http_url, "pid": os.getpid()}
        path = self.settings.data_dir / SERVER_INFO
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info), encoding="utf-8")
        os.replace(tmp, path)

    async def stop(self) -> None:
        if self._timeouts is not None:
            self._timeouts.cancel()
            self._timeouts = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.store is not None:
            await self.store.close()
            self.store = None
        (self.settings.data_dir / SERVER_INFO).unlink(missing_ok=True)


def find_runtime(context: Any) -> OtaRuntime | None:
    """The OtaRuntime of the broker this plugin context belongs to (None without an OtaPlugin)."""
    plugin = broker_of(context).plugins_manager.get_plugin("OtaPlugin")
    return getattr(plugin, "runtime", None)
