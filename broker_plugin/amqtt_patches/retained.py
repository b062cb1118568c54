"""Retained messages: sent past the ACL no more (bug 4), and bounded per device (bug 12).

On connect amqtt offered a client the retained messages of every filter on the broker
(anyone's filters, past the ACL), and kept any number of retained messages of any size for
good, a cleared one as an empty entry. Per broker, `_publish_retained_messages_for_subscription`
now sends only those of a filter the session holds, ACL-checked, and `retain_message` keeps
none on an OTA topic and at most `limits.max_retained_bytes` per device.
"""
from __future__ import annotations

import logging
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.session import Session

from otacore.protocol.credentials import DeviceId
from otacore.protocol.topics import is_ota_topic

from .identity import session_device
from .limits import limits_of

log = logging.getLogger("ota.broker")


def _retained_for_own_filters(broker: Broker) -> Any:
    """Retained messages for a filter the session itself holds, allowed by the ACL.

    amqtt calls this on connect for every filter on the broker (with anyone's filters) and
    after each SUBSCRIBE; skipping filters the session does not hold closes the leak and
    makes a connect O(filters) dictionary lookups instead of O(filters x retained) matches.
    """
    async def publish_retained(subscription: tuple[str, int], session: Session) -> None:
        if not broker._retained_messages:
            return
        topic_filter = subscription[0]
        held = [qos for holder, qos in broker._subscriptions.get(topic_filter, ()) if holder.client_id == session.client_id]
        handler = broker._get_handler(session)
        if not held or handler is None:
            return
        for topic, retained in list(broker._retained_messages.items()):
            if broker._matches(topic, topic_filter) and \
                    await broker._topic_filtering(session, topic=topic, action=Action.RECEIVE):
                qos = min(held[0], retained.qos if retained.qos is not None else held[0])
                await handler.mqtt_publish(retained.topic, retained.data, qos, retain=True)

    return publish_retained


def _bounded_retain(broker: Broker) -> Any:
    """Retained messages from devices, bounded: never on an OTA topic (a retained fake push
    would be replayed to every later subscriber, a retained report would be stale), and at
    most max_retained_bytes (topic + payload) per device. amqtt kept any number of any size,
    for good, after the device left; a cleared topic also stayed as an empty entry."""
    retain = broker.retain_message
    sizes: dict[str, tuple[DeviceId, int]] = {}  # retained topic -> (device, bytes)
    per_device: dict[DeviceId, int] = {}

    def forget(topic: str) -> None:
        owner = sizes.pop(topic, None)
        if owner is not None:
            left = per_device.get(owner[0], 0) - owner[1]
            if left > 0:
                per_device[owner[0]] = left
            else:
                per_device.pop(owner[0], None)

    async def retain_message(source: Session | None, topic: str | None, data: Any, qos: int | None = None) -> None:
        device = session_device(source)
        if device is None or topic is None:  # the broker's own messages
            await retain(source, topic, data, qos)
            return
        if is_ota_topic(topic):
            log.info("retained message of %s on OTA topic %r not kept (OTA topics are never retained)", device, topic)
            return
        if not data:
            forget(topic)
            broker._retained_messages.pop(topic, None)
            return
        size = len(topic) + len(data)
        limit = limits_of(broker).max_retained_bytes
        held = per_device.get(device, 0) - (sizes[topic][1] if topic in sizes else 0)
        if held + size > limit:
            log.info("retained message of %s on %r not kept: over limits.max_retained_kb (%d bytes)",
                     device, topic, limit)
            return
        forget(topic)
        sizes[topic] = (device, size)
        per_device[device] = held + size
        await retain(source, topic, data, qos)

    return retain_message


def patch_broker(broker: Broker) -> None:
    """This broker's retained messages: only for the session's own filters, and bounded."""
    broker._publish_retained_messages_for_subscription = _retained_for_own_filters(broker)  # type: ignore[method-assign]
    broker.retain_message = _bounded_retain(broker)  # type: ignore[method-assign]
