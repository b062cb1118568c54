"""A compact raw MQTT 3.1.1 device connection that knows exactly which PUBLISH got its
PUBACK (tests/test_crash.py, tests/test_report_order.py): packets from devicekit.mqtt_wire,
read on a StreamReader, each device's pushes in an inbox."""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import Callable
from typing import Any

from devicekit import mqtt_wire
from support.harness import PK, device_secret

IO_TIMEOUT = 10.0  # a CONNACK, SUBACK or PUBACK that takes longer: the link counts as lost


class Lost(Exception):
    """The connection is gone (the server died, or the device rebooted): connect again."""


class Link:
    """One MQTT connection of one device: its pushes in `inbox`, its PUBACKs awaited by id."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, generation: int,
                 on_message: Callable[["Link", str, bytes], None] | None) -> None:
        self.reader, self.writer = reader, writer
        self.generation = generation  # the server run that accepted it
        self.on_message = on_message  # called with each message as it arrives
        self.inbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.closed = asyncio.Event()
        self._acks: dict[int, asyncio.Future[bytes]] = {}
        self._last_id = 0
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, port: int, name: str, generation: Callable[[], int] = lambda: 0,
                   on_message: Callable[["Link", str, bytes], None] | None = None) -> "Link":
        """Connect and subscribe to the upgrade topic; raises Lost (or OSError) when it cannot."""
        async with asyncio.timeout(IO_TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # keep-alive 0: the test never idles long
                writer.write(mqtt_wire.connect(name, f"{name}&{PK}", device_secret(name), keep_alive=0))
                first, body = await mqtt_wire.read_packet(reader)
                if first >> 4 != 2 or body[1] != 0:
                    raise Lost(f"CONNACK {body.hex()}")
            except BaseException:
                writer.close()
                raise
        link = cls(reader, writer, generation(), on_message)
        try:
            await link._call(lambda pid: mqtt_wire.subscribe(f"/ota/device/upgrade/{PK}/{name}", pid, qos=1))
        except BaseException:
            link.abort()
            raise
        return link

    async def _read(self) -> None:
        try:
            while True:
                first, body = await mqtt_wire.read_packet(self.reader)
                kind = first >> 4
                if kind == 3:  # PUBLISH
                    topic, _, packet_id, payload = mqtt_wire.parse_publish(first, body)
                    if packet_id is not None:
                        self.writer.write(mqtt_wire.puback(packet_id))
                    self.inbox.put_nowait((topic, payload))
                    if self.on_message is not None:
                        self.on_message(self, topic, payload)
                elif kind in (4, 9):  # PUBACK, SUBACK
                    (packet_id,) = struct.unpack_from(">H", body)
                    waiter = self._acks.pop(packet_id, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(body[2:])
        except (OSError, asyncio.IncompleteReadError, struct.error, IndexError, ValueError):
            pass
        finally:
            self.closed.set()
            for waiter in self._acks.values():
                if not waiter.done():
                    waiter.set_exception(Lost("connection closed"))
            self._acks.clear()

    def _next_id(self) -> int:
        self._last_id = self._last_id % 65535 + 1
        return self._last_id

    async def _call(self, packet: Callable[[int], bytes]) -> bytes:
        """Send a packet that takes a packet id and wait for its acknowledgement."""
        if self.closed.is_set():
            raise Lost("connection closed")
        packet_id = self._next_id()
        waiter = asyncio.get_running_loop().create_future()
        self._acks[packet_id] = waiter
        self.writer.write(packet(packet_id))
        try:
            return await asyncio.wait_for(waiter, IO_TIMEOUT)
        except TimeoutError:
            raise Lost("no acknowledgement") from None

    async def publish(self, topic: str, payload: dict[str, Any]) -> None:
        """QoS 1; returns once the PUBACK arrived, raises Lost otherwise."""
        data = json.dumps(payload).encode()
        await self._call(lambda pid: mqtt_wire.publish(topic, data, qos=1, packet_id=pid))

    async def publish_many(self, messages: list[tuple[str, dict[str, Any], int]]) -> None:
        """(topic, payload, QoS 0 or 1) PUBLISHes in one write, back to back; returns once
        every QoS 1 one is acknowledged."""
        packets, waiters = [], []
        for topic, payload, qos in messages:
            data = json.dumps(payload).encode()
            if qos:
                packet_id = self._next_id()
                waiters.append(self._acks.setdefault(packet_id, asyncio.get_running_loop().create_future()))
                packets.append(mqtt_wire.publish(topic, data, qos=1, packet_id=packet_id))
            else:
                packets.append(mqtt_wire.publish(topic, data))
        self.writer.write(b"".join(packets))
        try:
            await asyncio.wait_for(asyncio.gather(*waiters), IO_TIMEOUT)
        except TimeoutError:
            raise Lost("no acknowledgement") from None

    async def next_message(self, timeout: float) -> tuple[str, bytes] | None:
        """The next message, None after `timeout`; raises Lost once the connection is gone
        and nothing is left to read."""
        if self.inbox.empty() and self.closed.is_set():
            raise Lost("connection closed")
        get = asyncio.ensure_future(self.inbox.get())
        closed = asyncio.ensure_future(self.closed.wait())
        try:
            await asyncio.wait((get, closed), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not get.done():
                get.cancel()
        if get.done() and not get.cancelled():
            return get.result()
        if self.closed.is_set():
            raise Lost("connection closed")
        return None

    async def close(self) -> None:
        """A clean DISCONNECT."""
        with contextlib.suppress(OSError):
            self.writer.write(mqtt_wire.DISCONNECT)
            await self.writer.drain()
        self.abort()

    def abort(self) -> None:
        self._task.cancel()
        self.writer.close()
        self.closed.set()
