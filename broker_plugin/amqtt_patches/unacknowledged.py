"""A QoS 1/2 message nobody acknowledges ends quietly, not with an ERROR (bug 19).

A message amqtt publishes itself (a will, a message between devices, a retained one) to a
subscriber that never acknowledges it raised TimeoutError in its task after 5 s, or
CancelledError when the connection closed first: an ERROR with a traceback at the next
broadcast or at shutdown. Nothing resends it (MQTT 3.1.1 resends only on reconnect).
`BrokerProtocolHandler.mqtt_publish` (process-wide) now ends such a delivery with a debug
line, and does not write to (and wait 5 s on) a connection already gone.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

log = logging.getLogger("ota.broker")


def _quiet_when_unacknowledged(mqtt_publish: Any) -> Any:
    """Bug (19): a QoS 1 or 2 message amqtt publishes itself (a will, a broadcast, a retained
    message) to a subscriber that never acknowledges it raised TimeoutError in its task after
    5 s, or CancelledError when the connection closed first; each was logged as an ERROR with
    a traceback, at the next broadcast or at shutdown. Nothing resends it (MQTT 3.1.1 resends
    only on reconnect), so a delivery that ends unacknowledged ends quietly; a connection
    already gone is not written to and waited on for 5 s."""
    if getattr(mqtt_publish, "_ota_quiet", False):
        return mqtt_publish

    @functools.wraps(mqtt_publish)
    async def publish(self: BrokerProtocolHandler, topic: str, data: bytes | bytearray, qos: int | None,
                      retain: bool, ack_timeout: int | None = None) -> Any:
        if qos in (1, 2) and _connection_gone(self):
            log.debug("client %r is gone; QoS %s message on %r not sent", _client_of(self), qos, topic)
            return None
        try:
            return await mqtt_publish(self, topic, data, qos, retain, ack_timeout)
        except TimeoutError:
            if ack_timeout is not None:  # a caller that set its own deadline wants to know
                raise
            log.debug("client %r did not acknowledge a QoS %s message on %r", _client_of(self), qos, topic)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this task was cancelled, not just amqtt's waiter for the acknowledgement
            log.debug("client %r left before acknowledging a QoS %s message on %r", _client_of(self), qos, topic)
        return None

    publish._ota_quiet = True  # type: ignore[attr-defined]
    return publish


def _client_of(handler: BrokerProtocolHandler) -> str | None:
    return handler.session.client_id if handler.session is not None else None


def _connection_gone(handler: BrokerProtocolHandler) -> bool:
    writer = handler.writer
    if writer is None or getattr(writer, "is_closed", False):
        return True
    transport = getattr(getattr(writer, "_writer", None), "transport", None)
    return transport is not None and transport.is_closing()


def patch_classes() -> None:
    """Deliveries nobody acknowledges end quietly (process-wide)."""
    BrokerProtocolHandler.mqtt_publish = _quiet_when_unacknowledged(  # type: ignore[method-assign]
        BrokerProtocolHandler.mqtt_publish)
