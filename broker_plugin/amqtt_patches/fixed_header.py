"""Every fixed header a client sends, checked before its packet is read (bugs 13 and 17).

amqtt reads a whole packet (up to 256 MB) into memory before anyone may refuse it, and
ignores the reserved flags of a packet and, for PINGREQ, DISCONNECT and the
acknowledgements, its length. `MQTTFixedHeader.from_stream` (process-wide) now closes the
connection for a packet over `limits.max_packet_kb` (PacketTooLarge) and for a fixed header
MQTT 3.1.1 forbids (MalformedPacket); amqtt's reader loop ends on either as on any
unexpected error, so the will is published. The limit is per broker: the CONNECT path sets
`_PACKET_LIMIT` in each connection's context.
"""
from __future__ import annotations

import contextvars
from typing import Any

from amqtt.mqtt.packet import (CONNECT, DISCONNECT, PINGREQ, PUBACK, PUBCOMP, PUBREC, PUBREL, SUBSCRIBE, UNSUBSCRIBE,
                               MQTTFixedHeader)


class PacketTooLarge(Exception):
    """A client announced a packet over limits.max_packet_kb: its connection is closed."""


_PACKET_LIMIT: contextvars.ContextVar[int] = contextvars.ContextVar("ota_max_packet", default=256 * 1024)


class MalformedPacket(Exception):
    """A packet that breaks the protocol: its connection is closed (MQTT 3.1.1, 4.8)."""


# What MQTT 3.1.1 fixes in the fixed header of each packet a client sends (2.2.2, 3.x.1): its
# name, its reserved flags and, for some, its remaining length. PUBLISH's flags are its own.
_CLIENT_PACKETS: dict[int, tuple[str, int, int | None]] = {
    CONNECT: ("CONNECT", 0b0000, None), PUBACK: ("PUBACK", 0b0000, 2), PUBREC: ("PUBREC", 0b0000, 2),
    PUBREL: ("PUBREL", 0b0010, 2), PUBCOMP: ("PUBCOMP", 0b0000, 2), SUBSCRIBE: ("SUBSCRIBE", 0b0010, None),
    UNSUBSCRIBE: ("UNSUBSCRIBE", 0b0010, None), PINGREQ: ("PINGREQ", 0b0000, 0), DISCONNECT: ("DISCONNECT", 0b0000, 0),
}


def _fixed_header_problem(header: MQTTFixedHeader) -> str | None:
    """Why this fixed header breaks MQTT 3.1.1 (the connection must close), or None."""
    rule = _CLIENT_PACKETS.get(header.packet_type)
    if rule is None:
        return None
    name, flags, length = rule
    if header.flags != flags:
        return f"malformed {name}: fixed-header flags {header.flags:#06b}, MQTT 3.1.1 requires {flags:#06b}"
    if length is not None and header.remaining_length != length:
        return f"malformed {name}: remaining length {header.remaining_length}, MQTT 3.1.1 requires {length}"
    return None


def _checked_fixed_header(from_stream: Any) -> Any:
    """Every fixed header a client sends, checked before its packet is read:
    - bug (13): a PUBLISH of 250 MB was read whole into memory (six connections of one
      device: 1.5 GB). A length over limits.max_packet_kb closes the connection.
    - bug (17): amqtt ignores the reserved flags of a packet and, for PINGREQ, DISCONNECT and
      the acknowledgements, its length: a SUBSCRIBE with flags 0 was answered, a PINGREQ with
      a payload answered and its payload read as the next packet, a DISCONNECT with one
      taken as a clean goodbye. MQTT 3.1.1 closes the connection (the will is published).
    One wrapper, so one coroutine frame per packet; marked, since harden() runs per broker."""
    if getattr(from_stream, "_ota_checked", False):
        return from_stream

    async def checked(cls: Any, reader: Any) -> Any:
        header = await from_stream.__func__(cls, reader)
        if header is None:
            return header
        limit = _PACKET_LIMIT.get()
        if header.remaining_length > limit:
            raise PacketTooLarge(f"a packet of {header.remaining_length} bytes is over limits.max_packet_kb "
                                 f"({limit // 1024} KiB); closing the connection")
        problem = _fixed_header_problem(header)
        if problem is not None:
            raise MalformedPacket(problem)
        return header

    checked._ota_checked = True  # type: ignore[attr-defined]
    return classmethod(checked)


def patch_classes() -> None:
    """Every fixed header read is checked (process-wide; the limit is per broker)."""
    # amqtt reads a whole packet (up to 256 MB) into memory before anyone may refuse it, and
    # reads on where MQTT 3.1.1 closes (bugs 13 and 17): one check of every fixed header.
    MQTTFixedHeader.from_stream = _checked_fixed_header(MQTTFixedHeader.from_stream)  # type: ignore[method-assign]
