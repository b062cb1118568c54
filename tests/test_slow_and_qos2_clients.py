"""Clients the packet path must cope with: OTA reports at QoS 2, and a device that stops
reading what it is sent (the server must not buffer for it without bound)."""
from __future__ import annotations

import asyncio
import json
import socket
import struct

from support.harness import Device, OtaServer, device_secret
from support.raw_mqtt import packet, string
from otacore.protocol.credentials import DeviceId


async def test_reports_at_qos_2_are_handled(server: OtaServer) -> None:
    async with Device(server, "q2-1") as device:
        await device.publish("/ota/device/inform/a1Test/q2-1", {"id": "1", "params": {"version": "1.0.0"}}, qos=2)
        push = await device.next_push()
        await device.publish("/ota/device/progress/a1Test/q2-1", {"id": "2", "params": {"step": -2}}, qos=2)
        await server.wait_state("q2-1", "failed")
        assert push["data"]["version"] == "1.1.0"




async def test_a_device_that_stops_reading_is_disconnected_not_buffered_for(server: OtaServer) -> None:
    # Each version report of a device with an open job gets the push again; a device that
    # floods reports and never reads would otherwise make the server hold every push.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.mqtt_port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    connect = string("MQTT") + bytes([4, 0xC2]) + struct.pack(">H", 600)
    writer.write(packet(0x10, connect + string("slow-1") + string("slow-1&a1Test") + string(device_secret("slow-1"))))
    assert (await reader.readexactly(4))[3] == 0
    report = packet(0x30, string("/ota/device/inform/a1Test/slow-1") +
                     json.dumps({"id": "1", "params": {"version": "1.0.0"}}).encode())
    closed = False
    try:
        for _ in range(400):  # up to 40,000 reports (each answered with a ~400-byte push)
            writer.write(report * 100)
            await writer.drain()
            await asyncio.sleep(0)
    except ConnectionError:
        closed = True
    for _ in range(100):
        if closed or server.plugin.runtime.delivery.live_session(DeviceId("a1Test", "slow-1")) is None:
            closed = True
            break
        await asyncio.sleep(0.05)
    writer.close()
    assert closed, "the server kept buffering for a device that does not read"


async def test_a_socket_that_never_sends_connect_is_closed(server: OtaServer) -> None:
    import dataclasses

    from broker_plugin import amqtt_patches
    assert server.broker is not None
    limits = amqtt_patches.limits_of(server.broker)
    amqtt_patches.set_limits(server.broker, dataclasses.replace(limits, connect_timeout=0.5))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.mqtt_port)
    writer.write(b"\x10")  # half a CONNECT, then silence
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_unsubscribed_filters_leave_nothing_behind(server: OtaServer) -> None:
    assert server.broker is not None
    table = server.broker._subscriptions
    async with Device(server, "uns-1") as device:
        for i in range(20):
            await device.subscribe(f"/a1Test/uns-1/f{i}")
        assert len(table) == 23
        for i in range(20):
            await device._client.unsubscribe(f"/a1Test/uns-1/f{i}")  # type: ignore[union-attr]
        assert len(table) == 3 and len(table.held["a1Test/uns-1/uns-1"]) == 3
