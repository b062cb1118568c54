"""PINGRESP written like any reply, not from a task (docs/operations.md, bug 14).

amqtt answers PINGREQ in a task that awaits the write: a client that pings and resets left
an unretrieved task exception (an ERROR with a traceback) per ping. Each connection's
`handle_pingreq` is replaced (per handler, by the CONNECT path) by a synchronous write.
"""
from __future__ import annotations

from typing import Any

from amqtt.broker import Broker
from amqtt.mqtt.pingresp import PingRespPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

from .limits import limits_of
from .writes import _write


def _pingresp(broker: Broker, handler: BrokerProtocolHandler) -> Any:
    """amqtt answers PINGREQ in a task that awaits the write: a client that pings and resets
    left an unretrieved task exception (an ERROR with a traceback) per ping."""
    async def handle_pingreq(_packet: Any) -> None:
        _write(handler, PingRespPacket.build().to_bytes(), limits_of(broker).max_unsent)

    return handle_pingreq
