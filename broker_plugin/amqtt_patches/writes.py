"""Writes to a client: one whole packet at once, with a cap on what waits unsent.

amqtt writes each packet through its own task, lock and drain; a device that stops reading
then makes every push, PUBACK and block reply for it wait in memory, without bound. `_write`
writes a packet's bytes at once (they never interleave with another's) and disconnects a
client with `limits.max_unsent_kb` waiting unsent. `_abort` closes a connection at once
(RST). Both reach the asyncio transport under amqtt's writer adapter (its `_writer`).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

log = logging.getLogger("ota.broker")


def _abort(writer: Any) -> None:
    """Close a connection at once (RST): nothing more is owed to a client refused or gone."""
    transport = getattr(getattr(writer, "_writer", None), "transport", None)
    if transport is not None and not transport.is_closing():
        transport.abort()


def _transport(handler: BrokerProtocolHandler) -> asyncio.WriteTransport | None:
    return _writer_transport(handler.writer)


def _writer_transport(writer: Any) -> asyncio.WriteTransport | None:
    """The transport of an amqtt writer adapter, or None once it is closed or closing."""
    stream = getattr(writer, "_writer", None) if writer is not None and not writer.is_closed else None
    transport = getattr(stream, "transport", None)
    return None if transport is None or transport.is_closing() else transport


def _write(handler: BrokerProtocolHandler, data: bytes, max_unsent: int) -> bool:
    """Write one packet's bytes now; False when the connection is gone.

    One write of the whole packet, so it never interleaves with another; no task, lock or
    drain per message. A device that stops reading gets `max_unsent` bytes buffered for it
    and is then disconnected: otherwise each push, PUBACK or block for it would wait in memory.
    """
    transport = _transport(handler)
    if transport is None:
        return False
    if transport.get_write_buffer_size() > max_unsent:
        session = handler.session
        log.warning("client %r does not read what it is sent (%d bytes waiting); disconnecting it",
                    session.client_id if session else None, transport.get_write_buffer_size())
        transport.abort()  # the reader sees the connection end; the will fires
        return False
    transport.write(data)
    return True
