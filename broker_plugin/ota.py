"""The OTA plugin: the broker's hooks for the OTA server. amqtt builds it from broker.yaml; it
reads its settings and receives the runtime the composition root (assembly.py) assembles for
its broker, which the broker's start and shutdown then start and stop."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from amqtt.plugins.base import BasePlugin
from amqtt.session import Session

from otacore.config.settings import settings_from_mapping

from .amqtt_patches import broker_of, session_device
from .assembly import assemble

log = logging.getLogger("ota.mqtt")


class OtaPlugin(BasePlugin):
    """Configured in broker.yaml under `plugins: broker_plugin.ota.OtaPlugin:` (docs/configuration.md)."""

    @dataclass
    class Config:
        catalog: str | None = None
        data_dir: str | None = None
        http: dict[str, Any] = field(default_factory=dict)
        url_ttl_seconds: int = 86400
        retention_days: float | None = None
        limits: dict[str, Any] = field(default_factory=dict)
        auth: dict[str, Any] = field(default_factory=dict)
        admin: dict[str, Any] = field(default_factory=dict)
        metrics: dict[str, Any] = field(default_factory=dict)
        tls: dict[str, Any] = field(default_factory=dict)  # both TLS endpoints (otaserver/tls.py)
        cluster: dict[str, Any] = field(default_factory=dict)  # cluster mode (docs/cluster.md): ota-server only
        # Set by ota-server: the folder of broker.yaml, against which relative paths resolve.
        base_dir: str | None = None

    def __init__(self, context) -> None:  # type: ignore[no-untyped-def]
        super().__init__(context)
        config = self.config
        # settings_from_mapping validates the nested keys; base_dir is handled here (docs/configuration.md).
        options = {k: v for k, v in asdict(config).items() if k != "base_dir" and v not in (None, {})}
        base = Path(config.base_dir) if config.base_dir else Path.cwd()
        settings = settings_from_mapping(options, base / "broker.yaml")
        self.runtime = assemble(broker_of(context), settings)

    async def on_broker_pre_start(self) -> None:
        # Every plugin is built by now. A session's device is its username: trusted only when
        # DeviceAuthPlugin checked it, so without it the OTA topics are the broker's to route.
        self.runtime.logins_checked = broker_of(self.context).plugins_manager.get_plugin("DeviceAuthPlugin") is not None
        if not self.runtime.logins_checked:
            log.warning("broker_plugin.auth.DeviceAuthPlugin is not in this broker's plugins: the OTA plugin "
                        "leaves device OTA topics alone (it acts only on logins it checked); add it")
        try:
            await self.runtime.start()
        except Exception as exc:  # the broker ignores hook errors: record it for ota-server
            self.runtime.startup_error = exc
            if self.runtime.log_startup_error:
                log.error("OTA plugin failed to start: %s", exc)

    async def on_broker_post_shutdown(self) -> None:
        await self.runtime.stop()

    async def on_broker_client_connected(self, *, client_id: str, client_session: Session) -> None:
        # Fired after CONNACK and before the first PUBLISH is read: replies find the session.
        device = session_device(client_session)
        if device is not None:
            self.runtime.delivery.remember(device, client_id)
            self.runtime.last_seen[client_session.username] = time.time()
