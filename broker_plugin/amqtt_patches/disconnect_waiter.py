"""A connection's disconnect waiter made before its reader starts (bug 16).

amqtt started the reader, then made the waiter: a client that closed right after its
CONNECT ended the reader first, and the waiter made afterwards never resolved: a
"connected" session and its socket held for good (with keep-alive 0; 900 of them and the
listeners stopped). `BrokerProtocolHandler.start` (process-wide) makes the waiter first.
"""
from __future__ import annotations

import asyncio

from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler


async def _start_with_waiter_first(self: BrokerProtocolHandler) -> None:
    """Bug (16): amqtt started the reader, then made the disconnect waiter; a client that
    closed right after its CONNECT (before reading the CONNACK) ended the reader first, the
    waiter was made afterwards and never resolved: a "connected" session and its socket
    held for good (with keep-alive 0), 900 of them and the listeners stopped."""
    if self._disconnect_waiter is None or self._disconnect_waiter.done():
        self._disconnect_waiter = asyncio.get_running_loop().create_future()
    await super(BrokerProtocolHandler, self).start()


def patch_classes() -> None:
    """Every connection's disconnect waiter is made before its reader starts (process-wide)."""
    BrokerProtocolHandler.start = _start_with_waiter_first  # type: ignore[method-assign]
