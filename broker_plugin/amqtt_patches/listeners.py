"""What the broker's listeners hold: connections and listening sockets, for /metrics and the
connection budget. amqtt keeps its listeners private (`Broker._servers`, each a Server
with `conn_count` and the asyncio server as `instance`).
"""
from __future__ import annotations

from typing import Any

from amqtt.broker import Broker


def mqtt_connections(broker: Broker) -> int:
    """Connections the broker's listeners hold now."""
    return sum(getattr(server, "conn_count", 0) for server in broker._servers.values())


def mqtt_listening_sockets(broker: Broker) -> list[Any]:
    return [sock for server in broker._servers.values()
            for sock in (getattr(getattr(server, "instance", None), "sockets", None) or ())]
