"""A compact MQTT 3.1.1 client on an asyncio protocol, for thousands of devices and their
round trips in one process (scripts/bench/anchor_lib.py, anchors.py).

It speaks just what a device needs (CONNECT, SUBSCRIBE, PUBLISH QoS 0/1, PUBACK, PINGREQ),
with TCP_NODELAY, packets from `devicekit.mqtt_wire`. Loopback only.
"""
from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from devicekit import mqtt_wire
from devicekit.signing import derive_device_secret

HOST = "127.0.0.1"  # loopback only, always


class MqttError(Exception):
    pass


class MqttClient(asyncio.Protocol):
    """One MQTT 3.1.1 connection. `on_message(topic, payload)` gets every PUBLISH (QoS 1 is
    acknowledged before the callback runs)."""

    def __init__(self, on_message: Callable[[str, bytes], None] | None) -> None:
        loop = asyncio.get_running_loop()
        self.on_message = on_message
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.connack: asyncio.Future[int] = loop.create_future()
        self.waiters: dict[int, asyncio.Future[int]] = {}
        self.pid = 0

    @classmethod
    async def open(cls, port: int, client_id: str, username: str | None = None, password: str | None = None,
                   keepalive: int = 600, on_message: Callable[[str, bytes], None] | None = None,
                   timeout: float = 60.0) -> MqttClient:
        """Connect and wait for CONNACK; MqttError if refused."""
        loop = asyncio.get_running_loop()
        _, client = await asyncio.wait_for(loop.create_connection(lambda: cls(on_message), HOST, port), timeout)
        client.transport.write(mqtt_wire.connect(client_id, username, password, keep_alive=keepalive))
        code = await asyncio.wait_for(client.connack, timeout)
        if code != 0:
            client.close()
            raise MqttError(f"CONNACK return code {code}")
        return client

    # asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        error = MqttError(f"connection lost: {exc or 'closed by peer'}")
        for future in [self.connack, *self.waiters.values()]:
            if not future.done():
                future.set_exception(error)
        self.waiters.clear()

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        pos, end = 0, len(buf)
        while (header := mqtt_wire.fixed_header(buf, pos, end)) is not None:
            start, length = header
            if start + length > end:
                break
            self._dispatch(buf[pos], bytes(buf[start:start + length]))
            pos = start + length
        if pos:
            del buf[:pos]

    def _dispatch(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == 3:
            topic, qos, pid, payload = mqtt_wire.parse_publish(first, body)
            if pid is not None:
                self.transport.write(mqtt_wire.puback(pid))
            if self.on_message is not None:
                self.on_message(topic, payload)
        elif kind in (4, 9):  # PUBACK, SUBACK
            pid = int.from_bytes(body[:2], "big")
            future = self.waiters.pop(pid, None)
            if future is not None and not future.done():
                future.set_result(body[2] if kind == 9 else 0)
        elif kind == 2 and not self.connack.done():
            self.connack.set_result(body[1])

    # requests ---------------------------------------------------------------------------
    def _next_pid(self) -> int:
        self.pid = self.pid % 65535 + 1
        return self.pid

    def _expect(self, pid: int) -> asyncio.Future[int]:
        future = asyncio.get_running_loop().create_future()
        self.waiters[pid] = future
        return future

    async def subscribe(self, topic: str, qos: int = 1) -> int:
        """The granted QoS (0x80: refused)."""
        pid = self._next_pid()
        future = self._expect(pid)
        self.transport.write(mqtt_wire.subscribe(topic, pid, qos))
        return await future

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> asyncio.Future[int] | None:
        """Send now; for QoS 1 returns the future of its PUBACK."""
        if qos == 0:
            self.transport.write(mqtt_wire.publish(topic, payload))
            return None
        pid = self._next_pid()
        future = self._expect(pid)
        self.transport.write(mqtt_wire.publish(topic, payload, qos=1, packet_id=pid))
        return future

    def ping(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(mqtt_wire.PINGREQ)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(mqtt_wire.DISCONNECT)
            self.transport.close()


async def open_device(port: int, pk: str, dn: str, product_secret: str, keepalive: int,
                      on_message: Callable[[str, bytes], None] | None = None) -> MqttClient:
    """Connect as device `dn` with its derived secret as password (which the OTA server
    accepts) and subscribe to its upgrade topic at QoS 1."""
    client = await MqttClient.open(port, dn, f"{dn}&{pk}", derive_device_secret(product_secret, dn), keepalive,
                                   on_message)
    granted = await asyncio.wait_for(client.subscribe(f"/ota/device/upgrade/{pk}/{dn}", 1), 60)
    if granted >= 0x80:
        client.close()
        raise MqttError(f"SUBSCRIBE refused ({granted:#x})")
    return client
