"""Topic ACL for amqtt: a device touches only its own namespace; upstream OTA topics are not routed."""
from __future__ import annotations

from dataclasses import dataclass

from amqtt.contexts import Action
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import Session

from otacore.protocol.access import Access, device_may

from .amqtt_patches import session_device


class DeviceTopicPlugin(BaseTopicPlugin):
    """PUBLISH/SUBSCRIBE/RECEIVE only inside `/ota/device/*/{pk}/{dn}`, `/sys/{pk}/{dn}/#`, `/{pk}/{dn}/#`."""

    @dataclass
    class Config:
        pass

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool | None:
        device = session_device(session)
        if device is None or not topic:
            return False
        # The OTA plugin takes the upstream OTA topics from the packet path (amqtt_patches/upstream.py).
        access = Access.PUBLISH if action == Action.PUBLISH else Access.RECEIVE if action == Action.RECEIVE \
            else Access.SUBSCRIBE
        return device_may(device, topic, access, upstream_taken_in_broker=True)

