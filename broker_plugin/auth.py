"""Device authentication for amqtt: `{dn}&{pk}` with the signed or plain password (docs/protocol.md 1)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from otacore.protocol.credentials import DeviceId
from otacore.protocol.topics import in_namespace, is_ota_topic

from .amqtt_patches import broker_of, refused_log, wire_client_id
from .assembly import runtime_of

log = logging.getLogger("ota.auth")


class DeviceAuthPlugin(BaseAuthPlugin):
    """Accepts only devices the catalog knows, with the right secret (the runtime's engine decides)."""

    @dataclass
    class Config:
        pass

    async def authenticate(self, *, session: Session) -> bool | None:
        runtime = runtime_of(broker_of(self.context))
        if runtime is None or runtime.engine is None or runtime.engine.catalog is None:
            log.warning("refusing %r: the OTA plugin is not running", session.username)
            return False
        device = runtime.engine.mqtt_login(wire_client_id(session), session.username, session.password)
        if device is None:  # the CONNECT's refusal is logged once, with the client id and username
            return False
        problem = _will_problem(device, session) if session.will_flag else None
        if problem:
            refused_log.warning("refused CONNECT of %s (client %r): its will %s", device, session.client_id, problem)
            return False
        return True


def _will_problem(device: DeviceId, session: Session) -> str | None:
    """Why a CONNECT's will must be refused, or None. amqtt publishes a will without the
    PUBLISH ACL and without checking its QoS, so it is checked here as a PUBLISH would be."""
    topic = session.will_topic or ""
    if session.will_qos not in (0, 1, 2):
        return f"has QoS {session.will_qos} (MQTT allows 0, 1, 2)"
    if not in_namespace(device, topic) or "+" in topic or "#" in topic:
        # On another device's topic it would be a forged message (e.g. an upgrade push).
        return f"topic {topic!r} is outside its own topics"
    if is_ota_topic(topic):
        # A will is not a report (it would arrive after the device is gone) nor a push.
        return f"topic {topic!r} is an OTA topic; report state with a PUBLISH instead"
    return None
