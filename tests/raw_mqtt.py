"""MQTT 3.1.1 packets built by hand, for clients no library would be: half a CONNECT, a will
with QoS 3, a CONNECT of protocol level 5, a reset instead of a DISCONNECT."""
from __future__ import annotations

import asyncio
import socket
import struct

from harness import device_secret


def string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack(">H", len(raw)) + raw


def packet(first: int, body: bytes) -> bytes:
    length, encoded = len(body), b""
    while True:
        digit, length = length % 128, length // 128
        encoded += bytes([digit | (0x80 if length else 0)])
        if not length:
            return bytes([first]) + encoded + body


def connect(client_id: str, username: str | None = None, password: str | None = None, *, level: int = 4,
            clean: bool = True, keep_alive: int = 60, will: tuple[str, bytes, int, bool] | None = None) -> bytes:
    flags = (0x02 if clean else 0) | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    payload = string(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += string(topic) + string(message)
    if username is not None:
        payload += string(username)
    if password is not None:
        payload += string(password)
    return packet(0x10, string("MQTT") + bytes([level, flags]) + struct.pack(">H", keep_alive) + payload)


def device_connect(name: str, pk: str = "a1Test", **kwargs: object) -> bytes:
    return connect(kwargs.pop("client_id", name), f"{name}&{pk}", device_secret(name), **kwargs)  # type: ignore[arg-type]


def publish(topic: str, payload: bytes, *, qos: int = 0, retain: bool = False, packet_id: int = 1) -> bytes:
    body = string(topic) + (struct.pack(">H", packet_id) if qos else b"") + payload
    return packet(0x30 | (qos << 1) | (1 if retain else 0), body)


def subscribe(topic_filter: str, packet_id: int = 1, qos: int = 1) -> bytes:
    return packet(0x82, struct.pack(">H", packet_id) + string(topic_filter) + bytes([qos]))


async def open_raw(port: int, *, rcvbuf: int | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, like a device that lost power: SO_LINGER 0."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def connack(reader: asyncio.StreamReader, timeout: float = 5.0) -> int:
    """The CONNACK return code (0 accepted)."""
    head = await asyncio.wait_for(reader.readexactly(4), timeout)
    assert head[0] == 0x20, head
    return head[3]


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


def unsubscribe(topic_filter: str, packet_id: int = 1) -> bytes:
    return packet(0xA2, struct.pack(">H", packet_id) + string(topic_filter))
