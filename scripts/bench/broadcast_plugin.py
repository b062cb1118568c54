"""For scripts/bench/reply_path.py only: runs ota-server with replies sent through amqtt's
`broadcast_message` instead of straight to the device's session, to compare the two.

    python scripts/bench/broadcast_plugin.py --config ...   (same flags as ota-server)
"""
from __future__ import annotations

import sys
from typing import Any

from broker_plugin import ota, server
from otacore.protocol.credentials import DeviceId


class BroadcastOtaPlugin(ota.OtaPlugin):
    def __init__(self, context: Any) -> None:
        super().__init__(context)

        def broadcast(device: DeviceId, topic: str, payload: bytes, qos: int) -> bool:
            self.runtime.spawn(context.broadcast_message(topic, payload, None))  # None: each subscriber's QoS
            return True

        self.runtime.delivery.send = broadcast  # type: ignore[method-assign]


if __name__ == "__main__":
    BroadcastOtaPlugin.__name__ = "OtaPlugin"  # the auth plugin finds the OTA plugin by this name
    ota.OtaPlugin = BroadcastOtaPlugin  # type: ignore[misc]  # what broker.yaml's dotted path resolves to
    sys.exit(server.main())
