"""The OTA plugin: starts the engine and the HTTP sidecar with the broker, and turns the
device OTA topics into engine decisions (docs/protocol.md 3). Thin: the engine decides."""
from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from amqtt.plugins.base import BasePlugin
from amqtt.session import Session

from otacore import log_hygiene
from otacore.protocol.codec import (PayloadError, decode_json, encode_block_reply, encode_json, message_id,
                           parse_block_request, parse_firmware_request, parse_progress, parse_version_report)
from otacore.protocol.credentials import DeviceId
from otacore.decisions.core import Send
from otacore.engine import OtaEngine
from otacore.config.settings import settings_from_mapping
from otacore.protocol.topics import (FILE_DOWNLOAD, FIRMWARE_GET, INFORM, PROGRESS, download_reply_topic,
                            firmware_get_reply_topic, parse_upstream)

from . import tls
from .amqtt_private import (BrokerLimits, SessionDelivery, broker_of, session_device, set_limits, set_tls_contexts,
                            set_upstream_consumer)
from .runtime import OtaRuntime

log = logging.getLogger("ota.mqtt")
# Block requests of one device being answered at once. SDKs ask for one block at a time;
# a device asking for thousands without reading would have the server read them all.
MAX_BLOCKS_IN_FLIGHT = 4


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
        tls: dict[str, Any] = field(default_factory=dict)  # both TLS endpoints (broker_plugin/tls.py)
        # Set by ota-server: the folder of broker.yaml, against which relative paths resolve.
        base_dir: str | None = None

    def __init__(self, context) -> None:  # type: ignore[no-untyped-def]
        super().__init__(context)
        config = self.config
        # settings_from_mapping validates the nested keys; base_dir is handled here (docs/configuration.md).
        options = {k: v for k, v in asdict(config).items() if k != "base_dir" and v not in (None, {})}
        base = Path(config.base_dir) if config.base_dir else Path.cwd()
        settings = settings_from_mapping(options, base / "broker.yaml")
        broker = broker_of(context)
        set_limits(broker, BrokerLimits(
            connect_timeout=settings.connect_timeout_seconds, max_unauthenticated=settings.unauthenticated_cap,
            max_connections_per_device=settings.max_connections_per_device,
            max_subscriptions=settings.max_subscriptions, max_retained_bytes=settings.max_retained_kb * 1024,
            session_expiry_seconds=settings.session_expiry_hours * 3600, max_unsent=settings.max_unsent_kb * 1024,
            max_packet=settings.max_packet_kb * 1024))
        log_hygiene.install(settings.log_field_max)
        log_hygiene.limit_floods()
        self.runtime = OtaRuntime(settings, SessionDelivery(broker))
        tls.install()
        set_tls_contexts(broker, lambda listener: tls.server_context(
            settings, listener["certfile"], listener["keyfile"], cafile=listener.get("cafile"),
            capath=listener.get("capath"), cadata=listener.get("cadata"), endpoint="mqtt",
            failures=self.runtime.tls_failures))
        self._blocks_in_flight: dict[DeviceId, int] = {}
        self._last_seen = self.runtime.last_seen  # username -> its latest message or connect
        self._received = self.runtime.mqtt_received  # per topic kind, for GET /metrics
        set_upstream_consumer(broker, self.consume)
        # In someone's own broker the log is the only report; ota-server prints it itself.
        self.log_startup_error = True

    async def on_broker_pre_start(self) -> None:
        try:
            await self.runtime.start()
        except Exception as exc:  # the broker ignores hook errors: record it for ota-server
            self.runtime.startup_error = exc
            if self.log_startup_error:
                log.error("OTA plugin failed to start: %s", exc)

    async def on_broker_post_shutdown(self) -> None:
        await self.runtime.stop()

    async def on_broker_client_connected(self, *, client_id: str, client_session: Session) -> None:
        # Fired after CONNACK and before the first PUBLISH is read: replies find the session.
        device = session_device(client_session)
        if device is not None:
            self.runtime.delivery.remember(device, client_id)
            self._last_seen[client_session.username] = time.time()

    def consume(self, session: Session, topic: str, data: bytes) -> bool | Awaitable[None]:
        """The device OTA topics, from the packet path before their PUBACK (amqtt_private):
        decided now, in the order the device sent them; replies leave once committed, and a
        report that made a promise (a job, a final state) is acknowledged once it is on disk."""
        self._last_seen[session.username] = time.time()  # any PUBLISH: the device is alive
        ota_topic = parse_upstream(topic)
        if ota_topic is None:
            return False  # not ours: amqtt routes it (the ACL decides)
        engine = self.runtime.engine
        device = session_device(session)
        if engine is None or engine.catalog is None:
            log.warning("%s from %s dropped: the OTA plugin is not running", topic, device)
            return True
        if device != ota_topic.device:
            log.warning("client %r (%s) published to %s, which is not its own topic; ignored",
                        session.client_id, device, topic)
            return True
        promises = engine.state.promises
        try:
            self._handle(engine, ota_topic.kind, device, topic, data)
        except Exception:  # a bad message must never take the broker's reader down
            log.exception("error handling %s from %s", topic, device)
        return engine.settled() if engine.state.promises != promises else True

    def _handle(self, engine: OtaEngine, kind: str, device: DeviceId, topic: str, data: bytes) -> None:
        self._received[kind] += 1
        if kind == FILE_DOWNLOAD:
            in_flight = self._blocks_in_flight.get(device, 0)
            if in_flight >= MAX_BLOCKS_IN_FLIGHT:
                self.runtime.delivery.send(device, download_reply_topic(device), encode_block_reply(
                    {"id": "", "code": 429, "msg": f"over {MAX_BLOCKS_IN_FLIGHT} block requests unanswered; "
                                                   "wait for each reply before the next request"}, None), 0)
                return
            self._blocks_in_flight[device] = in_flight + 1
            self.runtime.spawn(self._block(engine, device, data))
            return
        try:
            payload = decode_json(data)
            if kind == INFORM:
                report = parse_version_report(payload)
                engine.decide_version(device, report.module, report.version)
            elif kind == PROGRESS:
                progress = parse_progress(payload)
                engine.decide_progress(device, progress.module, progress.step, progress.desc)
            elif kind == FIRMWARE_GET:
                request = parse_firmware_request(payload)
                data_out = engine.decide_offer(device, request.module)
                self._reply_firmware(engine, device, {"code": 200, "id": request.id, "message": "success",
                                                      "version": request.version or "1.0", "data": data_out})
        except PayloadError as exc:
            log.info("bad %s payload from %s on %s: %s", kind, device, topic, exc)
            if kind == FIRMWARE_GET:
                reply_id = ""
                try:
                    reply_id = message_id(decode_json(data))
                except PayloadError:
                    pass
                self._reply_firmware(engine, device, {"code": 400, "id": reply_id, "message": str(exc), "data": {}})

    def _reply_firmware(self, engine: OtaEngine, device: DeviceId, reply: dict[str, Any]) -> None:
        # Through the outbox: the reply may name a job or URL that must be committed first.
        engine.post([Send(device, firmware_get_reply_topic(device), encode_json(reply))])

    async def _block(self, engine: OtaEngine, device: DeviceId, data: bytes) -> None:
        try:
            await self._answer_block(engine, device, data)
        finally:
            left = self._blocks_in_flight.pop(device, 1) - 1
            if left > 0:
                self._blocks_in_flight[device] = left

    async def _answer_block(self, engine: OtaEngine, device: DeviceId, data: bytes) -> None:
        try:
            payload = decode_json(data)
        except PayloadError as exc:
            frame = encode_block_reply({"id": "", "code": 400, "msg": str(exc)}, None)
        else:
            try:
                frame = await engine.downloads.block(device, parse_block_request(payload))
            except PayloadError as exc:
                frame = encode_block_reply({"id": message_id(payload), "code": 400, "msg": str(exc)}, None)
        self.runtime.delivery.send(device, download_reply_topic(device), frame, 1)
