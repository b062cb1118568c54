"""Where device messages come from and where pushes go: the seam between the engine and a broker.

`DeviceLink` is what the engine needs from a broker: is a device connected, and hand a
message to its session. `DeviceMessages` takes an upstream OTA message (docs/protocol.md 3),
already known to come from the device it names, and turns it into a decision: a version
report, a progress report, a firmware/get (answered through the outbox, once what the reply
names is committed) or an MQTT block request (answered at once, a few per device at a time).

The embedded broker (broker_plugin/ota.py) feeds it from amqtt's packet path before the
PUBACK; a worker on an external broker cluster feeds it from the queues it consumes. Either
acknowledges the message once `receive`'s answer says so: at once, or when the awaitable it
returns completes (a report that made a promise is acknowledged once it is on disk).
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from otacore.decisions.live import Send
from otacore.protocol.codec import (PayloadError, decode_json, encode_block_reply, encode_json, message_id,
                                    parse_block_request, parse_firmware_request, parse_progress, parse_version_report)
from otacore.protocol.credentials import DeviceId
from otacore.protocol.topics import (FILE_DOWNLOAD, FIRMWARE_GET, INFORM, PROGRESS, download_reply_topic,
                                     firmware_get_reply_topic)

if TYPE_CHECKING:
    from otacore.engine import OtaEngine

log = logging.getLogger("ota.mqtt")

# Block requests of one device being answered at once. SDKs ask for one block at a time;
# a device asking for thousands without reading would have the server read them all.
MAX_BLOCKS_IN_FLIGHT = 4


class DeviceLink(Protocol):
    def is_online(self, device: DeviceId) -> bool:
        """Has the device a live session now?"""

    def send(self, device: DeviceId, topic: str, payload: bytes, qos: int) -> bool:
        """Hand a message to the device's live session; False when it is not connected."""


class DeviceMessages:
    """Upstream OTA messages in, decisions and replies out."""

    def __init__(self, engine: "OtaEngine", link: DeviceLink,
                 spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self._engine = engine
        self._link = link
        self._spawn = spawn  # runs a block answer on its own, its failure logged
        self._blocks_in_flight: dict[DeviceId, int] = {}
        # Device OTA messages received per topic kind (GET /metrics).
        self.received: dict[str, int] = dict.fromkeys((INFORM, PROGRESS, FIRMWARE_GET, FILE_DOWNLOAD), 0)

    def receive(self, device: DeviceId, kind: str, topic: str, data: bytes) -> bool | Awaitable[None]:
        """Decide on one message now, in the order the device sent them. True: acknowledge it
        now; an awaitable: acknowledge it once that completes (its promises are on disk)."""
        engine = self._engine
        promises = engine.promises_made()
        try:
            self._handle(kind, device, topic, data)
        except Exception:  # a bad message must never take the broker's reader down
            log.exception("error handling %s from %s", topic, device)
        return engine.settled() if engine.promises_made() != promises else True

    def _handle(self, kind: str, device: DeviceId, topic: str, data: bytes) -> None:
        self.received[kind] += 1
        engine = self._engine
        if kind == FILE_DOWNLOAD:
            in_flight = self._blocks_in_flight.get(device, 0)
            if in_flight >= MAX_BLOCKS_IN_FLIGHT:
                self._link.send(device, download_reply_topic(device), encode_block_reply(
                    {"id": "", "code": 429, "msg": f"over {MAX_BLOCKS_IN_FLIGHT} block requests unanswered; "
                                                   "wait for each reply before the next request"}, None), 0)
                return
            self._blocks_in_flight[device] = in_flight + 1
            self._spawn(self._block(device, data))
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
                self._reply_firmware(device, {"code": 200, "id": request.id, "message": "success",
                                              "version": request.version or "1.0", "data": data_out})
        except PayloadError as exc:
            log.info("bad %s payload from %s on %s: %s", kind, device, topic, exc)
            if kind == FIRMWARE_GET:
                reply_id = ""
                try:
                    reply_id = message_id(decode_json(data))
                except PayloadError:
                    pass
                self._reply_firmware(device, {"code": 400, "id": reply_id, "message": str(exc), "data": {}})

    def _reply_firmware(self, device: DeviceId, reply: dict[str, Any]) -> None:
        # Through the outbox: the reply may name a job or URL that must be committed first.
        self._engine.post([Send(device, firmware_get_reply_topic(device), encode_json(reply))])

    async def _block(self, device: DeviceId, data: bytes) -> None:
        try:
            await self._answer_block(device, data)
        finally:
            left = self._blocks_in_flight.pop(device, 1) - 1
            if left > 0:
                self._blocks_in_flight[device] = left

    async def _answer_block(self, device: DeviceId, data: bytes) -> None:
        try:
            payload = decode_json(data)
        except PayloadError as exc:
            frame = encode_block_reply({"id": "", "code": 400, "msg": str(exc)}, None)
        else:
            try:
                frame = await self._engine.mqtt_block(device, parse_block_request(payload))
            except PayloadError as exc:
                frame = encode_block_reply({"id": message_id(payload), "code": 400, "msg": str(exc)}, None)
        self._link.send(device, download_reply_topic(device), frame, 1)
