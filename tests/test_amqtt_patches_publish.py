"""broker_plugin/amqtt_patches, messages in and out: upstream.py (OTA topics before their
PUBACK), puback.py (a push's waiter before its PUBLISH), unacknowledged.py, writes.py and
delivery.py. End to end: tests/test_report_order.py, tests/test_slow_and_qos2_clients.py and
tests/test_mqtt_edges.py."""
from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from support.harness import Device, OtaServer
from support.raw_mqtt import connack, device_connect, open_raw, parse_publish, puback, publish, read_packet

from broker_plugin.amqtt_patches import set_upstream_consumer
from broker_plugin.amqtt_patches.writes import _write
from otacore.protocol.credentials import DeviceId
from support.harness import until as _until


async def test_direct_delivery_reaches_a_live_session_subscribed_or_not(server: OtaServer) -> None:
    # Like Aliyun, which subscribes devices to their OTA topics itself (linkkit never does).
    delivery = server.plugin.runtime.delivery
    device = DeviceId("a1Test", "direct-1")
    assert not delivery.send(device, "/ota/device/upgrade/a1Test/direct-1", b"offline", 1)
    async with Device(server, "direct-1", subscribe=False) as client:
        assert delivery.send(device, "/ota/device/upgrade/a1Test/direct-1", b"unsolicited", 1)
        assert await client.receive("/upgrade/a1Test/direct-1") == b"unsolicited"


async def test_a_push_registers_its_puback_waiter_before_it_is_written(
        server: OtaServer, caplog: pytest.LogCaptureFixture) -> None:
    assert server.broker is not None
    caplog.set_level(logging.DEBUG, logger="amqtt")
    reader, writer = await open_raw(server.mqtt_port)
    writer.write(device_connect("ack-1"))
    assert await connack(reader) == 0
    _, handler = server.broker._sessions["a1Test/ack-1/ack-1"]
    assert server.plugin.runtime.delivery.send(DeviceId("a1Test", "ack-1"), "/ota/device/upgrade/a1Test/ack-1",
                                               b"push", 1)
    assert len(handler._puback_waiters) == 1  # before the device could answer
    topic, qos, packet_id, payload = parse_publish(*await asyncio.wait_for(read_packet(reader), 5))
    assert (topic, qos, payload) == ("/ota/device/upgrade/a1Test/ack-1", 1, b"push")
    assert packet_id in handler._puback_waiters
    writer.write(puback(packet_id))
    assert await _until(lambda: not handler._puback_waiters)
    assert not [r for r in caplog.records if "unknown pending message" in r.getMessage()]
    writer.close()


async def test_an_upstream_message_is_acknowledged_once_its_consumer_has_it(server: OtaServer) -> None:
    assert server.broker is not None
    kept: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    seen: list[tuple[str, bytes]] = []

    def consume(session: Session, topic: str, payload: bytes) -> Any:
        seen.append((topic, payload))
        return kept if topic.endswith("/kept") else topic.endswith("/taken")

    set_upstream_consumer(server.broker, consume)
    reader, writer = await open_raw(server.mqtt_port)
    writer.write(device_connect("up-1"))
    assert await connack(reader) == 0
    writer.write(publish("/a1Test/up-1/user/taken", b"1", qos=1, packet_id=1))
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"\x40\x02\x00\x01"
    writer.write(publish("/a1Test/up-1/user/kept", b"2", qos=1, packet_id=2))
    with pytest.raises(TimeoutError):  # no PUBACK while the consumer still writes it down
        await asyncio.wait_for(reader.readexactly(4), 0.3)
    kept.set_result(None)
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"\x40\x02\x00\x02"
    writer.write(publish("/a1Test/up-1/user/routed", b"3", qos=1, packet_id=3))  # not the consumer's
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"\x40\x02\x00\x03"
    assert seen == [("/a1Test/up-1/user/taken", b"1"), ("/a1Test/up-1/user/kept", b"2"),
                    ("/a1Test/up-1/user/routed", b"3")]
    writer.close()


@pytest.fixture
async def gone(server: OtaServer) -> AsyncIterator[BrokerProtocolHandler]:
    """The handler of a connection that has ended."""
    assert server.broker is not None
    async with Device(server, "gone-1"):
        session, handler = server.broker._sessions["a1Test/gone-1/gone-1"]
    assert await _until(lambda: session.transitions.is_disconnected())
    yield handler


async def test_a_qos_1_message_to_a_connection_already_gone_ends_at_once(gone: BrokerProtocolHandler) -> None:
    assert list(inspect.signature(inspect.unwrap(BrokerProtocolHandler.mqtt_publish)).parameters) == \
        ["self", "topic", "data", "qos", "retain", "ack_timeout"]
    assert "mqtt_publish" in dir(BrokerProtocolHandler)
    assert await asyncio.wait_for(gone.mqtt_publish("/a1Test/gone-1/user/x", b"x", 1, False), 1) is None


async def test_nothing_is_written_to_a_connection_already_gone(server: OtaServer,
                                                               gone: BrokerProtocolHandler) -> None:
    assert not _write(gone, b"\xd0\x00", 1024)
    assert not server.plugin.runtime.delivery.send(DeviceId("a1Test", "gone-1"), "/ota/device/upgrade/a1Test/gone-1",
                                                   b"push", 1)
