"""MQTT 3.1.1 packets built and read by hand: for clients no library would be (half a
CONNECT, a will with QoS 3, a CONNECT of protocol level 5, a reset instead of a DISCONNECT)
and for compact clients that know exactly which PUBLISH got its PUBACK.

Builders return the bytes of one packet; `read_packet` and `fixed_header` split what a
server sends; `open_raw`, `connack` and `reset` handle the socket. Loopback by default.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Sequence

PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"
Will = tuple[str, bytes, int, bool]  # topic, message, QoS, retain


# ---------------------------------------------------------------------------- building


def string(text: str | bytes) -> bytes:
    """A UTF-8 string (or raw bytes) with its two-byte length."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack(">H", len(raw)) + raw


def remaining_length(length: int) -> bytes:
    """The fixed header's variable-length integer."""
    encoded = bytearray()
    while True:
        length, digit = divmod(length, 128)
        encoded.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(encoded)


def packet(first: int, body: bytes) -> bytes:
    """A whole packet: first byte (type and flags), remaining length, body."""
    return bytes([first]) + remaining_length(len(body)) + body


def connect(client_id: str | bytes, username: str | bytes | None = None, password: str | bytes | None = None, *,
            level: int = 4, clean: bool = True, keep_alive: int = 60, will: Will | None = None) -> bytes:
    """CONNECT; `will` is (topic, message, QoS, retain), any QoS 0..3 (3 is what no client may send)."""
    flags = (0x02 if clean else 0) | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    payload = string(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | ((qos & 3) << 3) | (0x20 if retain else 0)
        payload += string(topic) + string(message)
    if username is not None:
        payload += string(username)
    if password is not None:
        payload += string(password)
    return packet(0x10, string("MQTT") + bytes([level, flags]) + struct.pack(">H", keep_alive) + payload)


def connect_v5(client_id: str, username: str, password: str, keep_alive: int = 60) -> bytes:
    """An MQTT 5 CONNECT as paho's MQTTv5 client sends it: properties after the keep-alive
    (here a session expiry interval of 0 and a receive maximum of 20)."""
    properties = b"\x11" + struct.pack(">I", 0) + b"\x21" + struct.pack(">H", 20)
    payload = string(client_id) + string(username) + string(password)
    return packet(0x10, string("MQTT") + bytes([5, 0xC2]) + struct.pack(">H", keep_alive)
                  + bytes([len(properties)]) + properties + payload)


def raw_connect(client_id: bytes, username: str, password: str, *, name: str = "MQTT", level: int = 4,
                flags: int = 0xC2) -> bytes:
    """A CONNECT with a client id of any bytes (not UTF-8, U+0000) and flags as given, so
    that bits no library would set (a will QoS without a will) can be sent."""
    payload = string(client_id) + string(username) + string(password)
    return packet(0x10, string(name) + bytes([level, flags]) + struct.pack(">H", 60) + payload)


def publish(topic: str, payload: bytes, *, qos: int = 0, retain: bool = False, packet_id: int = 1) -> bytes:
    """PUBLISH; the packet id is sent only at QoS 1 and 2."""
    body = string(topic) + (struct.pack(">H", packet_id) if qos else b"") + payload
    return packet(0x30 | (qos << 1) | (1 if retain else 0), body)


def subscribe(filters: str | Sequence[tuple[str, int]], packet_id: int = 1, qos: int = 1) -> bytes:
    """SUBSCRIBE to one filter at `qos`, or to several (filter, QoS) pairs in one packet."""
    pairs = [(filters, qos)] if isinstance(filters, str) else filters
    return packet(0x82, struct.pack(">H", packet_id) + b"".join(string(f) + bytes([q]) for f, q in pairs))


def unsubscribe(topic_filter: str, packet_id: int = 1) -> bytes:
    return packet(0xA2, struct.pack(">H", packet_id) + string(topic_filter))


def puback(packet_id: int) -> bytes:
    """The answer to a QoS 1 PUBLISH."""
    return packet(0x40, struct.pack(">H", packet_id))


def pubrec(packet_id: int) -> bytes:
    """The first answer to a QoS 2 PUBLISH."""
    return packet(0x50, struct.pack(">H", packet_id))


# ---------------------------------------------------------------------------- reading


def fixed_header(buf: bytes | bytearray, pos: int, end: int) -> tuple[int, int] | None:
    """(body start, body length) of the packet at `pos`, or None while its header is incomplete."""
    length, shift, i = 0, 0, pos + 1
    while i < end:
        byte = buf[i]
        i += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return i, length
        shift += 7
    return None


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(first byte, body) of the next packet; ValueError on a remaining length over 4 bytes."""
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        digit = (await reader.readexactly(1))[0]
        length |= (digit & 0x7F) << shift
        shift += 7
        if not digit & 0x80:
            break
        if shift > 21:
            raise ValueError("malformed remaining length from the server")
    return first, await reader.readexactly(length)


def parse_publish(first: int, body: bytes) -> tuple[str, int, int | None, bytes]:
    """(topic, QoS, packet id or None at QoS 0, payload) of a PUBLISH."""
    (topic_length,) = struct.unpack_from(">H", body)
    topic = body[2:2 + topic_length].decode("utf-8", "replace")
    rest = body[2 + topic_length:]
    qos = (first >> 1) & 3
    if not qos:
        return topic, 0, None, rest
    (packet_id,) = struct.unpack_from(">H", rest)
    return topic, qos, packet_id, rest[2:]


async def connack(reader: asyncio.StreamReader, timeout: float = 5.0) -> int:
    """The CONNACK return code (0 accepted); ValueError when the next packet is no CONNACK."""
    first, body = await asyncio.wait_for(read_packet(reader), timeout)
    if first >> 4 != 2 or len(body) != 2:
        raise ValueError(f"expected CONNACK, got packet type {first >> 4}")
    return body[1]


# ---------------------------------------------------------------------------- sockets


async def open_raw(port: int, *, host: str = "127.0.0.1", rcvbuf: int | None = None, nodelay: bool = False,
                   limit: int = 2 ** 16) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to `host` (127.0.0.1 or ::1); `rcvbuf` sets SO_RCVBUF before connecting
    (a device that reads slowly), `nodelay` turns Nagle off."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock, limit=limit)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of a DISCONNECT, like a device that lost power."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
