"""The OTA plugin: starts the engine and the HTTP sidecar with the broker, and turns the
device OTA topics into engine calls (PROTOCOL.md 3). Thin: the engine decides."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from amqtt.plugins.base import BasePlugin
from amqtt.session import ApplicationMessage, Session

from otacore.codec import (PayloadError, decode_json, encode_block_reply, encode_json, message_id,
                           parse_block_request, parse_firmware_request, parse_progress, parse_version_report)
from otacore.credentials import DeviceId
from otacore.settings import settings_from_mapping
from otacore.topics import (FILE_DOWNLOAD, FIRMWARE_GET, INFORM, PROGRESS, download_reply_topic,
                            firmware_get_reply_topic, parse_upstream)

from .amqtt_private import SessionDelivery, broker_of, session_device
from .runtime import OtaRuntime

log = logging.getLogger("ota.mqtt")


class OtaPlugin(BasePlugin):
    """Configured in broker.yaml under `plugins: broker_plugin.ota.OtaPlugin:` (CONFIG.md)."""

    @dataclass
    class Config:
        catalog: str | None = None
        data_dir: str | None = None
        http: dict[str, Any] = field(default_factory=dict)
        url_ttl_seconds: int = 86400
        limits: dict[str, Any] = field(default_factory=dict)
        auth: dict[str, Any] = field(default_factory=dict)
        admin: dict[str, Any] = field(default_factory=dict)
        # Set by ota-server: the folder of broker.yaml, against which relative paths resolve.
        base_dir: str | None = None

    def __init__(self, context) -> None:  # type: ignore[no-untyped-def]
        super().__init__(context)
        config = self.config
        # settings_from_mapping validates the nested keys; base_dir is ours, not CONFIG.md's.
        options = {k: v for k, v in asdict(config).items() if k != "base_dir" and v not in (None, {})}
        base = Path(config.base_dir) if config.base_dir else Path.cwd()
        settings = settings_from_mapping(options, base / "broker.yaml")
        self.runtime = OtaRuntime(settings, SessionDelivery(broker_of(context)))
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

    async def on_broker_message_received(self, *, client_id: str, message: ApplicationMessage) -> None:
        ota_topic = parse_upstream(message.topic or "")
        engine = self.runtime.engine
        if ota_topic is None or engine is None or engine.catalog is None:
            return
        device = session_device(self.context.get_session(client_id))
        if device != ota_topic.device:
            log.warning("client %r (%s) published to %s, which is not its own topic; ignored",
                        client_id, device, message.topic)
            return
        try:
            await self._handle(ota_topic.kind, device, message)
        except Exception:  # a bad message must never take the plugin down
            log.exception("error handling %s from %s", message.topic, device)

    async def _handle(self, kind: str, device: DeviceId, message: ApplicationMessage) -> None:
        engine = self.runtime.engine
        assert engine is not None
        if kind == FILE_DOWNLOAD:
            await self._block(device, message.data)
            return
        try:
            payload = decode_json(message.data)
            if kind == INFORM:
                report = parse_version_report(payload)
                await engine.on_version(device, report.module, report.version)
            elif kind == PROGRESS:
                progress = parse_progress(payload)
                await engine.on_progress(device, progress.module, progress.step, progress.desc)
            elif kind == FIRMWARE_GET:
                request = parse_firmware_request(payload)
                data = await engine.offer(device, request.module)
                await self._reply_firmware(device, {"code": 200, "id": request.id, "message": "success",
                                                    "version": request.version or "1.0", "data": data})
        except PayloadError as exc:
            log.info("bad %s payload from %s on %s: %s", kind, device, message.topic, exc)
            if kind == FIRMWARE_GET:
                reply_id = ""
                try:
                    reply_id = message_id(decode_json(message.data))
                except PayloadError:
                    pass
                await self._reply_firmware(device, {"code": 400, "id": reply_id, "message": str(exc), "data": {}})

    async def _reply_firmware(self, device: DeviceId, reply: dict[str, Any]) -> None:
        await self.runtime.delivery.send(device, firmware_get_reply_topic(device), encode_json(reply), 1)

    async def _block(self, device: DeviceId, data: bytes | bytearray | None) -> None:
        engine = self.runtime.engine
        assert engine is not None
        try:
            payload = decode_json(data)
        except PayloadError as exc:
            frame = encode_block_reply({"id": "", "code": 400, "msg": str(exc)}, None)
        else:
            try:
                frame = await engine.downloads.block(device, parse_block_request(payload))
            except PayloadError as exc:
                frame = encode_block_reply({"id": message_id(payload), "code": 400, "msg": str(exc)}, None)
        await self.runtime.delivery.send(device, download_reply_topic(device), frame, 1)
