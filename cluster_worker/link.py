"""Where pushes go on a cluster: an AMQP publish to `amq.topic` under the device topic's routing
key, which RabbitMQ's MQTT plugin delivers to the device's subscription on whichever node it is
connected to (and keeps for a clean_session=0 device that is away).

A broker cluster does not tell a worker who is connected. The worker counts a device present
once it logged in (the auth endpoint saw it) or sent a message, and absent once a push to it
came back unroutable (published `mandatory`: no subscription of its own takes it). A device
the worker has not seen since its start gets its push at its next report, as in the embedded
server after a restart.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp.commands import Basic

from otacore.protocol.credentials import DeviceId
from otacore.protocol.routing_keys import routing_key, topic_of
from otacore.protocol.topics import parse_downstream

from .topology import TOPIC_EXCHANGE

log = logging.getLogger("ota.cluster")

RETRIED_HEADER = "x-ota-retried"  # a returned push sent once more carries it
RETRY_RETURNED_SECONDS = 1.5  # longer than a session binding takes (sessions.py BIND_DELAYS)


class AmqpLink:
    """The engine's DeviceLink over one AMQP channel, replaced on each reconnect."""

    def __init__(self, spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self._spawn = spawn
        self._channel: AbstractChannel | None = None
        self._present: set[DeviceId] = set()
        # Devices whose session queue is being bound (worker.bind_session): what came back
        # unroutable meanwhile is sent again once the binding is there.
        self._binding: dict[DeviceId, list[tuple[str, bytes, Basic.Properties]]] = {}
        self.published = 0
        self.returned = 0  # pushes and replies no subscription took

    def attach(self, channel: AbstractChannel | None) -> None:
        """Publish on `channel` from now on (None: disconnected; sends fail until the next)."""
        self._channel = channel
        if channel is not None:
            channel.on_return_callbacks.add(self._returned)

    # -- presence ------------------------------------------------------------------------------
    def seen(self, device: DeviceId) -> None:
        self._present.add(device)

    def presume(self, devices: set[DeviceId]) -> None:
        """Devices whose partition came to this worker: present until a push comes back (the
        worker that held them knew; a push to one away costs a returned message)."""
        self._present |= devices

    def forget(self, holds: Callable[[DeviceId], bool]) -> None:
        """Devices whose partition went to another worker."""
        self._present = {device for device in self._present if not holds(device)}

    def online_devices(self) -> int:
        return len(self._present)

    def is_online(self, device: DeviceId) -> bool:
        return device in self._present

    def _returned(self, message: DeliveredMessage) -> None:
        key = message.routing_key or ""
        device = parse_downstream(topic_of(key))
        if device is None:
            return
        waiting = self._binding.get(device)
        if waiting is not None:  # its session's queue is being bound: again once it is
            waiting.append((key, message.body, message.header.properties))
            return
        properties = message.header.properties
        headers = dict(properties.headers or {})
        channel = self._channel
        if not headers.get(RETRIED_HEADER) and channel is not None and not channel.is_closed:
            # With several workers another one may be binding the device's session queue
            # right now (it answered the device's topic check): once more, a moment later.
            headers[RETRIED_HEADER] = 1
            retry = Basic.Properties(delivery_mode=properties.delivery_mode, headers=headers)
            self._spawn(self._publish_later(channel, key, message.body, retry))
            return
        self.returned += 1
        self._present.discard(device)

    async def _publish_later(self, channel: AbstractChannel, key: str, payload: bytes,
                             properties: Basic.Properties) -> None:
        await asyncio.sleep(RETRY_RETURNED_SECONDS)
        if not channel.is_closed:
            await self._publish(channel, key, payload, properties)

    def binding(self, device: DeviceId) -> None:
        """The device's session queue is about to be bound to its OTA topics."""
        self._binding.setdefault(device, [])

    def bound(self, device: DeviceId, ok: bool) -> None:
        """Done binding: what came back meanwhile goes out again, in order (or counts as returned)."""
        waiting = self._binding.pop(device, [])
        channel = self._channel
        for key, payload, properties in waiting:
            if ok and channel is not None and not channel.is_closed:
                self._spawn(self._publish(channel, key, payload, properties))
            else:
                self.returned += 1
                self._present.discard(device)

    # -- sending -------------------------------------------------------------------------------
    def send(self, device: DeviceId, topic: str, payload: bytes, qos: int) -> bool:
        channel = self._channel
        if channel is None or channel.is_closed:
            return False
        properties = Basic.Properties(delivery_mode=2 if qos else 1, headers={"x-mqtt-publish-qos": qos})
        # A task per message, created in send order: aiormq writes frames in that order.
        self._spawn(self._publish(channel, routing_key(topic), payload, properties))
        self.published += 1
        return True

    @staticmethod
    async def _publish(channel: AbstractChannel, key: str, payload: bytes, properties: Basic.Properties) -> None:
        try:
            await channel.basic_publish(payload, exchange=TOPIC_EXCHANGE, routing_key=key, mandatory=True,
                                        properties=properties)
        except Exception as exc:  # the connection went: the device asks again
            log.info("publish to %s not sent: %r", key, exc)
