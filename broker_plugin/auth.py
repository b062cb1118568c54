"""Device authentication for amqtt: `{dn}&{pk}` with the signed or plain password (PROTOCOL.md 1)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from otacore.credentials import check_mqtt_login
from otacore.topics import in_namespace

from .amqtt_private import broker_of, harden
from .runtime import find_runtime

log = logging.getLogger("ota.auth")


class DeviceAuthPlugin(BaseAuthPlugin):
    """Accepts only devices the catalog knows, with the right secret; installs the CONNECT hardening."""

    @dataclass
    class Config:
        pass

    def __init__(self, context) -> None:  # type: ignore[no-untyped-def]
        super().__init__(context)
        harden(broker_of(context))

    async def authenticate(self, *, session: Session) -> bool | None:
        runtime = find_runtime(self.context)
        if runtime is None or runtime.engine is None or runtime.engine.catalog is None:
            log.warning("refusing %r: the OTA plugin is not running", session.username)
            return False
        device = check_mqtt_login(runtime.engine.catalog, session.client_id, session.username, session.password,
                                  runtime.settings.allow_plain_secret)
        if device is None:
            log.info("refused client %r username %r: unknown device, malformed username or wrong secret",
                     session.client_id, session.username)
            return False
        if session.will_flag and not in_namespace(device, session.will_topic or ""):
            # amqtt publishes a will without the PUBLISH ACL: a will on another device's
            # topic would be a forged message (e.g. an upgrade push) delivered for us.
            log.warning("refused %s (client %r): its will topic %r is outside its own topics",
                        device, session.client_id, session.will_topic)
            return False
        return True
