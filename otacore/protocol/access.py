"""What a logged-in device may do with a topic (docs/protocol.md 2): the one rule behind the
embedded broker's topic ACL (broker_plugin/acl.py), written for any broker that asks.

A device touches only its own namespace (`topics.in_namespace`). It never publishes a
downstream OTA topic: its own upgrade push or reply would be a forgery. Where the server
takes the upstream OTA topics from the broker's packet path (the embedded broker), a
PUBLISH to them is consumed there and denied routing, so no other subscriber sees it;
where the server consumes them from the broker like any subscriber (a broker cluster), the
device must be allowed to publish them.
"""
from __future__ import annotations

from enum import StrEnum

from otacore.protocol.credentials import DeviceId
from otacore.protocol.topics import in_namespace, parse_downstream, parse_upstream


class Access(StrEnum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    RECEIVE = "receive"


def device_may(device: DeviceId, topic: str, access: Access, *, upstream_taken_in_broker: bool = True) -> bool:
    if not topic or not in_namespace(device, topic):
        return False
    if access == Access.PUBLISH:
        if parse_downstream(topic) is not None:
            return False
        if upstream_taken_in_broker and parse_upstream(topic) is not None:
            return False
    return True
