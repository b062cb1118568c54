"""The OTA server inside an amqtt broker: the runtime (otaserver/runtime.py) with the embedded
broker as its MQTT side. Its sessions are where pushes go; it takes the device OTA topics from
amqtt's packet path (assembly.py says where it fits); a reload disconnects the sessions whose
credentials went.
"""
from __future__ import annotations

import logging
import socket
import time
from collections.abc import Awaitable

from amqtt.session import Session

from fileserver.metrics import BrokerFigures
from otacore.catalog.model import Catalog
from otacore.config.settings import Settings
from otacore.messaging import DeviceLink, DeviceMessages
from otacore.protocol.topics import parse_upstream
from otaserver.runtime import ServerRuntime

from .amqtt_patches import (SessionDelivery, connections_replaced, mqtt_connections, mqtt_listening_sockets,
                            session_device, wire_client_id)

log = logging.getLogger("ota.server")
mqtt_log = logging.getLogger("ota.mqtt")  # lines a device can cause per message: burst-limited (log_hygiene)


class OtaRuntime(ServerRuntime):
    def __init__(self, settings: Settings, delivery: SessionDelivery) -> None:
        super().__init__(settings)
        self.delivery = delivery
        # The OTA topics are taken only where DeviceAuthPlugin checked who each session is
        # (OtaPlugin finds out as the broker starts); elsewhere the broker routes them.
        self.logins_checked = False

    def device_link(self) -> DeviceLink:
        return self.delivery

    def broker_figures(self, messages: DeviceMessages) -> BrokerFigures:
        broker = self.delivery.broker
        return BrokerFigures(lambda: mqtt_connections(broker), self.delivery.online_devices, messages.received,
                             self.tls_failures, lambda: connections_replaced(broker))

    def mqtt_connections(self) -> int:
        return mqtt_connections(self.delivery.broker)

    def mqtt_listening_sockets(self) -> list[socket.socket]:
        return list(mqtt_listening_sockets(self.delivery.broker))

    def drop_revoked_sessions(self, catalog: Catalog) -> None:
        engine = self.engine
        assert engine is not None

        def still_valid(session: Session) -> bool:
            return engine.mqtt_login(wire_client_id(session), session.username, session.password, catalog) is not None

        dropped = self.delivery.drop_sessions(still_valid)
        if dropped:
            log.info("reload: disconnected %d session(s) whose credentials are no longer valid", dropped)

    def consume(self, session: Session, topic: str, data: bytes) -> bool | Awaitable[None]:
        """A PUBLISH from amqtt's packet path, before its PUBACK (amqtt_patches/upstream.py).
        False: not an OTA topic, amqtt routes it (the ACL decides). Else decided now, in the
        order the device sent them (otacore/messaging.py): replies leave once committed, and a
        report that made a promise is acknowledged once it is on disk."""
        self.last_seen[session.username] = time.time()  # any PUBLISH: the device is alive
        ota_topic = parse_upstream(topic)
        if ota_topic is None or not self.logins_checked:
            return False
        device = session_device(session)
        messages = self.messages
        if messages is None:
            mqtt_log.warning("%s from %s dropped: the OTA plugin is not running", topic, device)
            return True
        if device != ota_topic.device:
            mqtt_log.warning("client %r (%s) published to %s, which is not its own topic; ignored",
                             session.client_id, device, topic)
            return True
        return messages.receive(device, ota_topic.kind, topic, data)
