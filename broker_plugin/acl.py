"""Topic ACL for amqtt: a device touches only its own namespace; upstream OTA topics are not routed."""
from __future__ import annotations

from dataclasses import dataclass

from amqtt.contexts import Action
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import Session

from otacore.topics import in_namespace, parse_upstream

from .amqtt_private import session_device


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
        # The server consumes these; denying the PUBLISH keeps them from other subscribers,
        # while the OTA plugin still sees them through on_broker_message_received.
        return not (action == Action.PUBLISH and parse_upstream(topic) is not None)
