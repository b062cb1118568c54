"""Hostile MQTT clients: what one can make the broker hold is bounded (connection slots,
sockets not yet logged in, subscriptions, retained messages, sessions, block replies, log
lines), and what it must not publish (OTA topics, odd wills) is refused."""
from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest
from support import raw_mqtt
from support.harness import UPGRADE_BATCH, Device, OtaServer, device_secret, write_catalog
from support.harness import until as _until
from support.raw_mqtt import connack, device_connect, open_raw, reset

from broker_plugin import amqtt_patches
from otacore.protocol.credentials import DeviceId

UPGRADE = UPGRADE_BATCH

MQTT_UPGRADE = """
- name: up-mqtt
  package: fw-1.1.0
  type: upgrade
  protocol: mqtt
  mode: dynamic
  push: true
"""


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[OtaServer]:
    """A server with small limits, so each is reached in a few packets."""
    write_catalog(tmp_path, UPGRADE)
    running = await OtaServer(tmp_path, listener={"max_connections": 20}, options={"limits": {
        "max_unauthenticated": 10, "max_subscriptions": 5, "max_retained_kb": 4, "log_field_max": 40,
        "connect_timeout_seconds": 2}}).start()
    yield running
    await running.stop()


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_refused_connects_reset_by_the_client_give_their_slot_back(limited: OtaServer) -> None:
    # amqtt answered the protocol-5 CONNECT, the write hit the reset and raised past its
    # handler: the slot under max_connections (20 here) was never released.
    for _ in range(60):
        reader, writer = await open_raw(limited.mqtt_port)
        writer.write(device_connect("dev-1", level=5))
        reset(writer)
    assert limited.broker is not None
    assert await _until(lambda: amqtt_patches.mqtt_connections(limited.broker) == 0), \
        f"{amqtt_patches.mqtt_connections(limited.broker)} slots still held"
    async with Device(limited, "dev-1") as device:
        await device.inform("1.0.0")
        assert (await device.next_push())["data"]["version"] == "1.1.0"


async def test_sockets_closed_before_or_during_connect_are_closed_here_too(limited: OtaServer) -> None:
    before = _open_descriptors()
    for i in range(150):
        reader, writer = await open_raw(limited.mqtt_port)
        if i % 3 == 1:
            writer.write(device_connect("dev-1")[:9])  # half a CONNECT
        elif i % 3 == 2:
            writer.write(b"\x10\xff\xff\xff\xff\x7f")  # a length no packet may have
        await writer.drain()
        writer.close()
    # No CLOSE-WAIT left: every server-side socket of those is closed within a moment.
    assert await _until(lambda: _open_descriptors() <= before + 2, 3.0), \
        f"{_open_descriptors() - before} descriptors still open"


async def test_idle_sockets_past_the_cap_drop_the_oldest_and_devices_still_connect(limited: OtaServer) -> None:
    idle = [await open_raw(limited.mqtt_port) for _ in range(15)]  # the cap is 10
    await asyncio.sleep(0.2)
    async with Device(limited, "dev-2") as device:  # the 16th: still gets in
        await device.inform("1.0.0")
        await device.next_push()
    closed = 0
    for reader, _ in idle[:6]:  # the oldest were dropped to make room
        if await asyncio.wait_for(reader.read(), 2) == b"":
            closed += 1
    assert closed == 6
    for _, writer in idle:
        writer.close()


async def test_huge_client_ids_and_control_characters_stay_out_of_the_log(limited: OtaServer,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    for _ in range(30):
        reader, writer = await open_raw(limited.mqtt_port)
        writer.write(raw_mqtt.connect("x" * 65000, "y" * 65000 + "&a1Test", "wrong"))
        assert await connack(reader) == 5  # not authorized
        writer.close()
    async with Device(limited, "dev-3") as device:
        await device.inform("1.0.0")
        await device.next_push()
        await device.progress(-2, "disk\nFAKE 00:00 INFO ota: all is well\x1b[2J")
        await limited.wait_state("dev-3", "failed")
    lines = [record.getMessage() for record in caplog.records]
    assert sum(len(line) for line in lines) < 40_000, "the log took what it was given"
    assert all("\n" not in line and "\x1b" not in line for line in lines)
    assert any("FAKE 00:00" in line for line in lines)  # kept, escaped: one line
    refused = [line for line in lines if line.startswith("refused CONNECT")]
    assert len(refused) <= 6, refused  # a burst, then held back (the window may be in use already)


async def test_wills_are_checked_like_a_publish(limited: OtaServer) -> None:
    cases = [("/a1Test/dev-4/status", b"gone", 3, False),  # QoS 3 does not exist
             ("/ota/device/progress/a1Test/dev-4", b'{"params":{"step":-1}}', 1, False),  # not a report
             ("/ota/device/upgrade/a1Test/dev-4", b'{"data":{"url":"http://evil/"}}', 1, True),  # a forged push
             ("/a1Test/dev-5/status", b"gone", 0, False)]  # another device's topic
    for will in cases:
        reader, writer = await open_raw(limited.mqtt_port)
        writer.write(device_connect("dev-4", will=will))
        assert await connack(reader) == 5, will
        writer.close()
    reader, writer = await open_raw(limited.mqtt_port)
    writer.write(device_connect("dev-4", will=("/a1Test/dev-4/status", b"gone", 1, False)))
    assert await connack(reader) == 0
    writer.close()


async def test_devices_cannot_publish_or_retain_on_ota_topics(limited: OtaServer) -> None:
    async with Device(limited, "dev-6") as listener:
        reader, writer = await open_raw(limited.mqtt_port)
        writer.write(device_connect("dev-6", client_id="dev-6-second"))
        assert await connack(reader) == 0
        fake = json.dumps({"data": {"url": "http://evil/", "version": "9.9.9"}}).encode()
        writer.write(raw_mqtt.publish("/ota/device/upgrade/a1Test/dev-6", fake, retain=True))
        writer.write(raw_mqtt.publish("/sys/a1Test/dev-6/thing/ota/firmware/get_reply", fake, retain=True))
        await writer.drain()
        await listener.expect_nothing(0.5)
        writer.close()
    assert limited.broker is not None
    assert not limited.broker._retained_messages


async def test_retained_messages_are_bounded_per_device(limited: OtaServer) -> None:
    assert limited.broker is not None
    reader, writer = await open_raw(limited.mqtt_port)
    writer.write(device_connect("dev-7"))
    assert await connack(reader) == 0
    for i in range(30):
        writer.write(raw_mqtt.publish(f"/a1Test/dev-7/r{i}", b"z" * 1000, retain=True))
    await writer.drain()
    reset(writer)
    retained = limited.broker._retained_messages
    assert await _until(lambda: len(retained) > 0)
    await asyncio.sleep(0.2)
    assert sum(len(topic) + len(message.data) for topic, message in retained.items()) <= 4 * 1024
    # Clearing one (an empty retained payload) makes room for another.
    reader, writer = await open_raw(limited.mqtt_port)
    writer.write(device_connect("dev-7"))
    assert await connack(reader) == 0
    writer.write(raw_mqtt.publish("/a1Test/dev-7/r0", b"", retain=True))
    writer.write(raw_mqtt.publish("/a1Test/dev-7/new", b"n" * 500, retain=True))
    await writer.drain()
    assert await _until(lambda: "/a1Test/dev-7/new" in retained and "/a1Test/dev-7/r0" not in retained)
    writer.close()


async def test_subscriptions_are_capped_per_device_over_its_client_ids(limited: OtaServer) -> None:
    codes = []
    for client in ("dev-8", "dev-8-b"):
        reader, writer = await open_raw(limited.mqtt_port)
        writer.write(device_connect("dev-8", client_id=client))
        assert await connack(reader) == 0
        for i in range(4):
            writer.write(raw_mqtt.subscribe(f"/a1Test/dev-8/{client}/{i}", packet_id=i + 1))
            suback = await asyncio.wait_for(reader.readexactly(5), 5)
            codes.append(suback[4])
        writer.close()
        assert limited.broker is not None
        table = limited.broker._subscriptions
        # A clean session's filters go with it (amqtt's session monitor, within a second)...
        assert await _until(lambda: not table.per_device.get(DeviceId("a1Test", "dev-8")))
    assert codes == [1] * 8  # ...so each connection had its 4
    reader, writer = await open_raw(limited.mqtt_port)
    writer.write(device_connect("dev-8", client_id="dev-8-c"))
    assert await connack(reader) == 0
    codes = []
    for i in range(7):
        writer.write(raw_mqtt.subscribe(f"/a1Test/dev-8/c/{i}", packet_id=i + 1))
        codes.append((await asyncio.wait_for(reader.readexactly(5), 5))[4])
    assert codes == [1] * 5 + [0x80] * 2
    writer.close()


async def test_stored_sessions_are_capped_per_device_and_expire(tmp_path: Path) -> None:
    write_catalog(tmp_path, UPGRADE)
    server = await OtaServer(tmp_path, options={"limits": {"session_expiry_hours": 1 / 3600}}).start()
    try:
        assert server.broker is not None
        sessions = server.broker._sessions
        for i in range(20):  # Aliyun-style: a new client id per connect, clean_session=0
            reader, writer = await open_raw(server.mqtt_port)
            writer.write(device_connect("dev-9", client_id=f"dev-9|ts={i}|", clean=False))
            assert await connack(reader) == 0
            writer.write(raw_mqtt.subscribe("/a1Test/dev-9/cmd"))
            await asyncio.wait_for(reader.readexactly(5), 5)
            reset(writer)
            await _until(lambda: sessions[f"a1Test/dev-9/dev-9|ts={i}|"][0].transitions.state == "disconnected")
        assert len(sessions) <= amqtt_patches.MAX_SESSIONS_PER_DEVICE
        # amqtt's monitor runs once a second; the expiry here is one second.
        assert await _until(lambda: not sessions, 5.0), list(sessions)
        assert not server.broker._subscriptions.held and not server.broker._subscriptions.per_device
    finally:
        await server.stop()


async def test_block_requests_from_a_device_that_does_not_read_are_bounded(tmp_path: Path) -> None:
    write_catalog(tmp_path, MQTT_UPGRADE)
    server = await OtaServer(tmp_path).start()
    try:
        async with Device(server, "dev-10") as device:
            await device.inform("1.0.0")
            push = await device.next_push()
        stream = push["data"]["streamId"] if "streamId" in push["data"] else None
        reader, writer = await open_raw(server.mqtt_port, rcvbuf=4096)
        writer.write(device_connect("dev-10", client_id="dev-10-greedy"))
        assert await connack(reader) == 0
        request = json.dumps({"id": "1", "params": {"fileToken": push["data"].get("fileToken", ""),
                              "fileInfo": {"streamId": stream, "fileId": 1},
                              "fileBlock": {"size": 131072, "offset": 0}}}).encode()
        block = raw_mqtt.publish("/sys/a1Test/dev-10/thing/file/download", request)
        plugin = server.plugin
        most = 0
        try:
            for _ in range(200):  # 2,000 requests of 128 KiB, never reading a reply
                writer.write(block * 10)
                await writer.drain()
                most = max(most, plugin.runtime.messages._blocks_in_flight.get(DeviceId("a1Test", "dev-10"), 0))
                await asyncio.sleep(0)
        except ConnectionError:
            pass
        assert most <= 4
        # It is disconnected once it leaves too much unread, and nothing stays in flight.
        assert await _until(lambda: not plugin.runtime.messages._blocks_in_flight)
        assert await _until(lambda: server.plugin.runtime.delivery.live_session(DeviceId("a1Test", "dev-10")) is None)
        writer.close()
    finally:
        await server.stop()


async def test_a_take_over_publishes_no_will(limited: OtaServer) -> None:
    reader, watcher = await open_raw(limited.mqtt_port)
    watcher.write(device_connect("dev-11", client_id="dev-11-watch"))
    assert await connack(reader) == 0
    watcher.write(raw_mqtt.subscribe("/a1Test/dev-11/status"))
    await asyncio.wait_for(reader.readexactly(5), 5)
    for clean in (True, False):
        first_reader, first = await open_raw(limited.mqtt_port)
        first.write(device_connect("dev-11", clean=clean, will=("/a1Test/dev-11/status", b"offline-1", 0, False)))
        assert await connack(first_reader) == 0
        second_reader, second = await open_raw(limited.mqtt_port)
        second.write(device_connect("dev-11", clean=clean, will=("/a1Test/dev-11/status", b"offline-2", 0, False)))
        assert await connack(second_reader) == 0
        try:  # the device is online: no will of either connection
            early = await asyncio.wait_for(reader.read(100), 0.5)
        except TimeoutError:
            early = b""
        assert early == b"", (clean, early)
        # ...and the session is the new connection's (the old loop did not mark it disconnected).
        assert limited.plugin.runtime.delivery.is_online(DeviceId("a1Test", "dev-11")), clean
        reset(second)  # now it is gone: its own will, once
        will = await asyncio.wait_for(reader.read(100), 5)
        assert will.endswith(b"offline-2"), will
        first.close()
    watcher.close()


def test_signed_url_numbers_are_ascii_digits_only() -> None:
    from otacore.downloads.signed_urls import UrlRejected, _signature, verify_url
    key, path, device, expires = b"k" * 32, "/files/x/y.bin", DeviceId("a1Test", "d"), 9_999_999_999
    query = {"pk": "a1Test", "dn": "d", "exp": str(expires), "sig": _signature(key, path, device, 3, expires)}
    assert verify_url(key, path, {**query, "job": "3"}) == (device, 3)
    for job in ("٣", "+3", "0_3", " 3"):  # int() takes each as 3; the URL the server signed said "3"
        with pytest.raises(UrlRejected):
            verify_url(key, path, {**query, "job": job})


async def test_a_packet_over_max_packet_kb_closes_the_connection_before_it_is_read(tmp_path: Path) -> None:
    write_catalog(tmp_path, UPGRADE)
    server = await OtaServer(tmp_path, options={"limits": {"max_packet_kb": 100}}).start()
    try:
        reader, writer = await open_raw(server.mqtt_port)
        writer.write(device_connect("dev-12"))
        assert await connack(reader) == 0
        topic = raw_mqtt.string("/a1Test/dev-12/big")
        header = raw_mqtt.packet(0x30, topic + b"x" * (250 * 1024 * 1024 - len(topic)))[:8]  # claims 250 MB
        writer.write(header + b"x" * 65536)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after the fixed header
        writer.close()
        async with Device(server, "dev-12") as device:  # a packet within the limit is fine
            await device.publish("/a1Test/dev-12/ok", b"y" * 90_000)
            await device.inform("1.0.0")
            await device.next_push()
    finally:
        await server.stop()


async def test_broadcasts_reach_every_subscriber_while_other_clients_come_and_go(server: OtaServer) -> None:
    limited = server  # default limits: three clients of one device hold 3 OTA filters each
    async with Device(limited, "dev-13", client_id="dev-13-a") as a, Device(limited, "dev-13", client_id="dev-13-b") as b:
        await a.subscribe("/a1Test/dev-13/t")
        await b.subscribe("/a1Test/dev-13/#")
        stop = asyncio.Event()

        async def churn(i: int) -> None:
            while not stop.is_set():
                reader, writer = await open_raw(limited.mqtt_port)
                writer.write(device_connect(f"churn-{i}"))
                await connack(reader)
                for j in range(3):
                    writer.write(raw_mqtt.subscribe(f"/a1Test/churn-{i}/{j}", packet_id=j + 1))
                await asyncio.sleep(0.005)
                reset(writer)

        churners = [asyncio.ensure_future(churn(i)) for i in range(8)]
        async with Device(limited, "dev-13", client_id="dev-13-pub") as publisher:
            for n in range(300):
                await publisher.publish("/a1Test/dev-13/t", str(n), qos=0)
                await asyncio.sleep(0)
        stop.set()
        await asyncio.gather(*churners, return_exceptions=True)
        for device in (a, b):
            got = 0
            while got < 300:
                await device.receive("/t", timeout=5)
                got += 1


async def test_a_client_that_closes_right_after_its_connect_leaves_nothing_behind(limited: OtaServer) -> None:
    # amqtt made the disconnect waiter after starting the reader: a FIN right behind the
    # CONNECT ended the reader first, and the session stayed "connected" with its socket.
    assert limited.broker is not None
    for i in range(30):
        reader, writer = await open_raw(limited.mqtt_port)
        writer.write(device_connect("dev-14", client_id=f"dev-14-{i}", keep_alive=0))
        writer.write_eof()  # FIN before reading the CONNACK
        await writer.drain()
        writer.close()
    assert await _until(lambda: amqtt_patches.mqtt_connections(limited.broker) == 0), \
        f"{amqtt_patches.mqtt_connections(limited.broker)} connections still held"
    sessions = limited.broker._sessions
    assert await _until(lambda: not any(s.transitions.is_connected() for s, _ in sessions.values()))


@pytest.mark.parametrize("name, packet", [
    ("qos 3", raw_mqtt.packet(0x36, raw_mqtt.string("/a1Test/dev-15/t") + b"\x00\x01x")),
    ("wildcard", raw_mqtt.publish("/a1Test/dev-15/+", b"x")),
    ("empty topic", raw_mqtt.publish("", b"x")),
])
async def test_a_publish_that_breaks_the_protocol_closes_the_connection(
        limited: OtaServer, caplog: pytest.LogCaptureFixture, name: str, packet: bytes) -> None:
    caplog.set_level(logging.INFO)
    reader, writer = await open_raw(limited.mqtt_port)
    writer.write(device_connect("dev-15"))
    assert await connack(reader) == 0
    writer.write(packet * 50)
    assert await asyncio.wait_for(reader.read(), 5) == b"", name
    writer.close()
    assert not [r for r in caplog.records if r.exc_info or "never retrieved" in r.getMessage()]


async def test_half_finished_qos_2_flows_are_capped(limited: OtaServer) -> None:
    reader, writer = await open_raw(limited.mqtt_port)
    writer.write(device_connect("dev-16"))
    assert await connack(reader) == 0
    closed = False
    for packet_id in range(1, 400):  # PUBLISH QoS 2, never a PUBREL
        writer.write(raw_mqtt.publish("/a1Test/dev-16/q2", b"x" * 100, qos=2, packet_id=packet_id))
    try:
        while await asyncio.wait_for(reader.read(65536), 5):
            pass
        closed = True
    except ConnectionError:
        closed = True
    writer.close()
    assert closed


async def test_acks_for_unknown_packets_are_logged_in_bursts(limited: OtaServer,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    reader, writer = await open_raw(limited.mqtt_port)
    writer.write(device_connect("dev-17"))
    assert await connack(reader) == 0
    for packet_id in range(1, 3000):
        writer.write(raw_mqtt.packet(0x40, packet_id.to_bytes(2, "big")) + raw_mqtt.packet(0x62, packet_id.to_bytes(2, "big")))
    writer.write(raw_mqtt.packet(0xC0, b""))  # PINGREQ: answered once the rest is read
    assert (await asyncio.wait_for(reader.readexactly(2), 10)) == b"\xd0\x00"
    writer.close()
    lines = [r for r in caplog.records if r.getMessage().startswith("Received PUB")]
    assert len(lines) <= 21, len(lines)


@pytest.mark.parametrize("name, connect, code", [
    ("U+0000 in the client id", raw_mqtt.raw_connect(b"dev-19\x00x", "dev-19&a1Test", device_secret("dev-19")), 2),
    ("client id not UTF-8", raw_mqtt.raw_connect(b"dev-19\xff", "dev-19&a1Test", device_secret("dev-19")), 2),
    ("a surrogate in the client id",
     raw_mqtt.raw_connect(b"dev-19\xed\xa0\x80", "dev-19&a1Test", device_secret("dev-19")), 2),
    ("will QoS without a will",
     raw_mqtt.raw_connect(b"dev-19", "dev-19&a1Test", device_secret("dev-19"), flags=0xC2 | 0x08), None),
    ("will retain without a will",
     raw_mqtt.raw_connect(b"dev-19", "dev-19&a1Test", device_secret("dev-19"), flags=0xC2 | 0x20), None),
    ("MQTT 5", raw_mqtt.connect_v5("dev-19", "dev-19&a1Test", device_secret("dev-19")), 1),
    ("MQTT 3.1", raw_mqtt.raw_connect(b"dev-19", "dev-19&a1Test", device_secret("dev-19"), name="MQIsdp", level=3), 1),
    ("level 3 named MQTT", raw_mqtt.raw_connect(b"dev-19", "dev-19&a1Test", device_secret("dev-19"), level=3), 1),
])
async def test_connects_mqtt_3_1_1_refuses_are_answered_or_closed(
        limited: OtaServer, caplog: pytest.LogCaptureFixture, name: str, connect: bytes, code: int | None) -> None:
    # amqtt accepted the first five (a client id of U+0000, or "b'\\xff'" for bytes not UTF-8),
    # and read an MQTT 5 CONNECT's properties as the client id's length: no CONNACK, closed
    # at the connect deadline. MQTT 3.1 ("MQIsdp") was closed without the CONNACK 1 it asks for.
    caplog.set_level(logging.INFO)
    reader, writer = await open_raw(limited.mqtt_port)
    writer.write(connect)
    if code is not None:
        assert await connack(reader, timeout=1.5) == code, name  # within limited's 2 s deadline
    assert await asyncio.wait_for(reader.read(), 5) == b"", name  # ...and closed
    writer.close()
    assert limited.broker is not None
    assert await _until(lambda: amqtt_patches.mqtt_connections(limited.broker) == 0)
    assert not limited.broker._sessions, name  # refused before any session was made
    assert not [r for r in caplog.records if r.exc_info], name
    async with Device(limited, "dev-19") as device:  # the device itself, well-formed, gets in
        await device.inform("1.0.0")
        await device.next_push()


@pytest.mark.parametrize("protocol", [aiomqtt.ProtocolVersion.V5, aiomqtt.ProtocolVersion.V31])
async def test_paho_speaking_mqtt_5_or_3_1_is_told_the_version_is_unsupported(
        limited: OtaServer, protocol: aiomqtt.ProtocolVersion) -> None:
    client = aiomqtt.Client("127.0.0.1", limited.mqtt_port, identifier="dev-20", username="dev-20&a1Test",
                            password=device_secret("dev-20"), protocol=protocol, timeout=1.5)
    with pytest.raises(aiomqtt.MqttCodeError) as refused:
        async with client:
            pass
    assert str(refused.value.rc) == "Unsupported protocol version"


async def subscribed_watcher(port: int, device: str, topic: str, qos: int
                             ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A second connection of `device`, subscribed to `topic` (its SUBACK read)."""
    reader, writer = await open_raw(port)
    writer.write(device_connect(device, client_id=f"{device}-watch"))
    assert await connack(reader) == 0
    writer.write(raw_mqtt.subscribe(topic, qos=qos))
    await asyncio.wait_for(reader.readexactly(5), 5)
    return reader, writer


@pytest.mark.parametrize("name, packet", [
    ("SUBSCRIBE with flags 0", b"\x80" + raw_mqtt.subscribe("/a1Test/dev-21/user/x")[1:]),
    ("UNSUBSCRIBE with flags 0", b"\xa0" + raw_mqtt.unsubscribe("/a1Test/dev-21/user/x")[1:]),
    ("PUBREL with flags 0", raw_mqtt.packet(0x60, b"\x00\x01")),
    ("PINGREQ with a payload", raw_mqtt.packet(0xC0, b"\xc0\x00")),  # the payload: another PINGREQ
    ("DISCONNECT with a payload", raw_mqtt.packet(0xE0, b"\xc0\x00")),
])
async def test_a_malformed_fixed_header_closes_the_connection_and_publishes_the_will(
        limited: OtaServer, caplog: pytest.LogCaptureFixture, name: str, packet: bytes) -> None:
    # amqtt answered each (SUBACK, UNSUBACK, two PINGRESPs: the payload read as a packet), or
    # took the DISCONNECT as a clean goodbye and published no will. MQTT 3.1.1 closes.
    caplog.set_level(logging.INFO)
    status = "/a1Test/dev-21/user/status"
    watch_reader, watcher = await subscribed_watcher(limited.mqtt_port, "dev-21", status, qos=0)
    reader, writer = await open_raw(limited.mqtt_port)
    writer.write(device_connect("dev-21", will=(status, b"gone", 0, False)))
    assert await connack(reader) == 0
    writer.write(packet)
    assert await asyncio.wait_for(reader.read(), 5) == b"", name  # closed, nothing answered
    will = await asyncio.wait_for(watch_reader.read(100), 5)
    assert will.endswith(b"gone"), (name, will)
    writer.close()
    watcher.close()
    assert not [r for r in caplog.records if r.exc_info or "never retrieved" in r.getMessage()], name


async def test_a_will_its_subscriber_never_acknowledges_leaves_no_error_at_shutdown(
        server: OtaServer, caplog: pytest.LogCaptureFixture) -> None:
    # amqtt's task for a QoS 1 will failed after 5 s without a PUBACK (or was cancelled with
    # the connection): an ERROR with a traceback at the next broadcast or at shutdown.
    caplog.set_level(logging.INFO)
    status = "/a1Test/dev-22/user/status"
    reader, subscriber = await subscribed_watcher(server.mqtt_port, "dev-22", status, qos=1)  # never PUBACKs
    _, device = await open_raw(server.mqtt_port)
    device.write(device_connect("dev-22", will=(status, b"offline", 1, False)))
    reset(device)
    assert (await asyncio.wait_for(reader.read(100), 5)).endswith(b"offline")  # the will, QoS 1
    assert await _until(lambda: any("Timeout waiting for PUBACK" in r.getMessage() for r in caplog.records), 10)
    _, again = await open_raw(server.mqtt_port)  # the next broadcast, and one left unacknowledged
    again.write(device_connect("dev-22", client_id="dev-22-pub"))
    again.write(raw_mqtt.publish(status, b"back", qos=0))
    assert (await asyncio.wait_for(reader.read(100), 5)).endswith(b"back")
    await server.stop()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], \
        [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    subscriber.close()
    again.close()
