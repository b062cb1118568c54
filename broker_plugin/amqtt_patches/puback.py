"""The server's QoS 1 pushes register their PUBACK waiter before the PUBLISH is written (bug 7).

amqtt registers it after writing, so a fast device's PUBACK arrived first: "Received PUBACK
for unknown pending message Id" and a 5 s timeout. `_expect_puback` registers a waiter in
the handler's private `_puback_waiters` (where amqtt's PUBACK handling looks), keeps at most
MAX_UNACKED of them per connection, and drops each when its PUBACK comes.
"""
from __future__ import annotations

import asyncio
from typing import Any

from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

MAX_UNACKED = 64  # QoS 1 pushes per connection whose PUBACK we still match


def _expect_puback(handler: BrokerProtocolHandler, session: Session) -> int:
    """A packet id for a QoS 1 PUBLISH, with a waiter amqtt's PUBACK handling will find
    (registered before the PUBLISH is written: see the module docstring). The server does
    not resend, so nobody awaits it; it is dropped when the PUBACK comes, or as the oldest
    of too many that never came."""
    packet_id = session.next_packet_id
    waiters = handler._puback_waiters
    waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    waiter.add_done_callback(lambda done: waiters.get(packet_id) is done and waiters.pop(packet_id))
    waiters[packet_id] = waiter
    while len(waiters) > MAX_UNACKED:
        waiters.pop(next(iter(waiters))).cancel()
    return packet_id
