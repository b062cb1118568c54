"""Device OTA topics taken from the packet path, in order, before their PUBACK (bug 9).

amqtt's plugin hook for a received message runs as a detached task after the PUBACK, in
no set order: a report acknowledged was not yet a report counted. Each connection's
`handle_publish` is replaced (per handler, by the CONNECT path) by `_consuming_publish`,
which checks the PUBLISH (malformed_publish.py) and offers it to the broker's upstream
consumer (`set_upstream_consumer`, the OTA plugin) synchronously, before the PUBACK.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import Session

from .limits import limits_of
from .malformed_publish import _publish_problem
from .writes import _abort, _write

log = logging.getLogger("ota.broker")
_CONSUMER = "_ota_upstream_consumer"

# Called with (session, topic, payload) for each QoS 0/1 PUBLISH before it is acknowledged:
# False when the message is not the consumer's (amqtt routes it); True when it consumed it;
# or an awaitable when it consumed it and the PUBACK must wait for it (a promise being written).
UpstreamConsumer = Callable[[Session, str, bytes], bool | Awaitable[Any]]


def set_upstream_consumer(broker: Broker, consumer: UpstreamConsumer | None) -> None:
    setattr(broker, _CONSUMER, consumer)


def _consuming_publish(broker: Broker, handler: BrokerProtocolHandler, session: Session) -> Any:
    """The handler's PUBLISH entry, offering each message to the upstream consumer first.
    amqtt starts one task per packet in arrival order and this runs before its first await,
    so the consumer sees a device's messages in order, and before their PUBACK is sent."""
    routed = handler.handle_publish

    async def handle_publish(packet: PublishPacket) -> None:
        consumer: UpstreamConsumer | None = getattr(broker, _CONSUMER, None)
        topic, data, qos = packet.topic_name, packet.data, packet.qos
        problem = _publish_problem(topic, qos, session)
        if problem is not None:
            # Bug (15): amqtt raised in a task per such packet (an ERROR and a traceback
            # each: 190 MB of log in 10 s), or left the connection open and silent.
            log.info("client %r: %s; closing the connection", session.client_id, problem)
            _abort(handler.writer)
            return
        consumed = consumer is not None and topic is not None and data is not None \
            and consumer(session, topic, bytes(data))
        if consumed is False:
            await routed(packet)
            return
        if consumed is not True:
            await consumed  # e.g. a final state on its way to disk: acknowledged once kept
        if qos == 2:
            # amqtt's PUBREC/PUBREL/PUBCOMP exchange; the message it then hands the broker is
            # an upstream OTA topic, which the ACL keeps from everyone.
            await routed(packet)
        elif qos == 1 and packet.variable_header is not None:
            _write(handler, PubackPacket.build(packet.variable_header.packet_id).to_bytes(),
                   limits_of(broker).max_unsent)

    return handle_publish
