"""Pushes written straight to one device's live session (`SessionDelivery`).

amqtt's `broadcast_message` walks every subscription filter on the broker per message (its
cost grows with the fleet), and leaves delivery to a task. SessionDelivery finds the
device's newest live connection in the broker's private `_sessions`, writes the PUBLISH at
once (writes.py), registering a QoS 1 publish's PUBACK waiter first (puback.py), and
delivers the device's downstream OTA topics whether or not it subscribed to them, as
Aliyun's broker does (a subscription only lowers the QoS).
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from amqtt.broker import Broker
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import Session

from otacore.protocol.credentials import DeviceId
from otacore.protocol.topics import filters_matching

from .identity import session_device
from .limits import limits_of
from .puback import _expect_puback
from .writes import _write


class SessionDelivery:
    """Publishes the server's OTA messages straight to one device's live session."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        # Client ids each device connected with, latest last: a second connection with the
        # same credentials (a debugging mosquitto_sub) must not steal the device's messages.
        self._client_ids: dict[DeviceId, dict[str, None]] = {}

    def remember(self, device: DeviceId, client_id: str) -> None:
        """Call once a connection of `device` was accepted."""
        ids = self._client_ids.setdefault(device, {})
        ids.pop(client_id, None)
        ids[client_id] = None
        while len(ids) > 8:
            del ids[next(iter(ids))]

    def live_session(self, device: DeviceId) -> tuple[Session, Any] | None:
        """The device's most recent connection that is still up."""
        ids = self._client_ids.get(device, {})
        for client_id in reversed(list(ids)):
            entry = self.broker._sessions.get(client_id)
            if entry is None:
                del ids[client_id]
            elif entry[0].transitions.state == "connected" and session_device(entry[0]) == device:
                return entry
        return None

    def subscribed_qos(self, session: Session, device: DeviceId, topic: str) -> int | None:
        best = None
        subscriptions = self.broker._subscriptions
        for topic_filter in filters_matching(device, topic):
            for subscriber, qos in subscriptions.get(topic_filter, ()):
                if subscriber.client_id == session.client_id:
                    best = qos if best is None else max(best, qos)
        return best

    def is_online(self, device: DeviceId) -> bool:
        return self.live_session(device) is not None

    def online_devices(self) -> int:
        """Devices with at least one connected session now: a walk over the session table,
        for a metrics scrape, not for hot paths."""
        return len({device for session, _ in list(self.broker._sessions.values())
                    if session.transitions.state == "connected" and (device := session_device(session)) is not None})

    def send(self, device: DeviceId, topic: str, payload: bytes, qos: int) -> bool:
        """Publish one of the device's downstream OTA topics to its live session; False when
        it is not connected. Aliyun's broker subscribes every device to these topics itself,
        and SDKs such as linkkit rely on it (they never SUBSCRIBE to them): so without a
        subscription we deliver at `qos`, with one at the lower of the two."""
        entry = self.live_session(device)
        if entry is None:
            return False
        session, handler = entry
        sub_qos = self.subscribed_qos(session, device, topic)
        if sub_qos is not None:
            qos = min(qos, sub_qos)
        packet_id = _expect_puback(handler, session) if qos >= 1 else None
        return _write(handler, PublishPacket.build(topic, payload, packet_id, False, min(qos, 1), False).to_bytes(),
                      limits_of(self.broker).max_unsent)

    def drop_sessions(self, keep: Callable[[Session], bool]) -> int:
        """Disconnect every connected session that `keep` rejects; returns how many."""
        dropped = 0
        for session, handler in list(self.broker._sessions.values()):
            if session.transitions.state == "connected" and not keep(session):
                asyncio.ensure_future(handler.handle_connection_closed())
                dropped += 1
        return dropped
