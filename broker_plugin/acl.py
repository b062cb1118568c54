"""Topic ACL for amqtt: a device touches only its own namespace; upstream OTA topics are not routed."""
from __future__ import annotations

from dataclasses import dataclass

from amqtt.contexts import Action
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import Session

from otacore.protocol.topics import in_namespace, is_ota_topic

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
        if not in_namespace(device, topic):
            return False
        # Upstream OTA topics are the server's to consume (it takes them from the packet path,
        # so denying the PUBLISH keeps them from other subscribers); downstream ones are the
        # server's to send: a device publishing its own upgrade push could forge one.
        return not (action == Action.PUBLISH and is_ota_topic(topic))
