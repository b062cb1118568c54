"""broker_plugin/amqtt_patches, packets on a live connection: fixed_header.py (size and
reserved bits of every fixed header), malformed_publish.py, pingresp.py,
disconnect_waiter.py and keep_alive.py. End to end: tests/test_mqtt_edges.py and
tests/test_broker_security.py."""
from __future__ import annotations

import asyncio
import gc
import inspect
import logging

import pytest
from amqtt.mqtt.packet import PINGREQ, PUBLISH, SUBSCRIBE, MQTTFixedHeader
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.publish import PublishVariableHeader
from amqtt.session import Session
from support.harness import Device, OtaServer
from support.raw_mqtt import connack, device_connect, open_raw, reset

from broker_plugin.amqtt_patches import install
from broker_plugin.amqtt_patches.disconnect_waiter import _start_with_waiter_first
from broker_plugin.amqtt_patches.fixed_header import _checked_fixed_header, _fixed_header_problem
from broker_plugin.amqtt_patches.keep_alive import _keep_alive_watch
from broker_plugin.amqtt_patches.malformed_publish import MAX_QOS2_IN_FLIGHT, _fatal_when_malformed, _publish_problem


def test_the_packet_checks_rely_on_what_they_wrap() -> None:
    install()
    # A malformed packet ends the reader loop through its catch-all (a warning line, then the
    # will); an MQTTError would only discard the packet and read on.
    loop_source = inspect.getsource(BrokerProtocolHandler._reader_loop)
    assert "except MQTTError:" in loop_source and "except Exception as e:" in loop_source
    # Every broker hardens the shared classes once: the wrappers must not stack per broker.
    header = MQTTFixedHeader.from_stream
    assert _checked_fixed_header(header) is header
    publish_header = PublishVariableHeader.from_stream
    assert _fatal_when_malformed(publish_header) is publish_header


def test_fixed_headers_mqtt_3_1_1_closes_the_connection_for() -> None:
    assert _fixed_header_problem(MQTTFixedHeader(SUBSCRIBE, 0b0010, 10)) is None
    assert _fixed_header_problem(MQTTFixedHeader(PINGREQ, 0, 0)) is None
    assert _fixed_header_problem(MQTTFixedHeader(PUBLISH, 0b1011, 10)) is None  # PUBLISH's flags are its own
    assert "fixed-header flags 0b0000" in (_fixed_header_problem(MQTTFixedHeader(SUBSCRIBE, 0, 10)) or "")
    assert "remaining length 2" in (_fixed_header_problem(MQTTFixedHeader(PINGREQ, 0, 2)) or "")


def test_publishes_mqtt_3_1_1_closes_the_connection_for() -> None:
    session = Session()
    assert _publish_problem("/a1Test/dev/t", 1, session) is None
    assert _publish_problem("/a1Test/dev/t", 3, session) == "PUBLISH with QoS 3"
    for topic in ("/a1Test/dev/+", "/a1Test/#", "", "/a\0b", None):
        assert (_publish_problem(topic, 0, session) or "").startswith("PUBLISH to an invalid topic name"), topic
    for packet_id in range(MAX_QOS2_IN_FLIGHT):
        session.inflight_in[packet_id] = None
    assert "without their PUBREL" in (_publish_problem("/a1Test/dev/t", 2, session) or "")


async def test_pingreq_is_answered_and_a_reset_right_after_it_leaves_no_error(
        server: OtaServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    reader, writer = await open_raw(server.mqtt_port)
    writer.write(device_connect("ping-1"))
    assert await connack(reader) == 0
    writer.write(b"\xc0\x00")  # PINGREQ
    assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\xd0\x00"  # PINGRESP
    writer.close()
    for i in range(20):  # amqtt's PINGRESP task failed on each reset, unretrieved
        reader, writer = await open_raw(server.mqtt_port)
        writer.write(device_connect("ping-1", client_id=f"ping-1-{i}") + b"\xc0\x00")
        await writer.drain()
        reset(writer)
    await asyncio.sleep(0.3)
    gc.collect()  # a task's unretrieved exception is logged when the task is collected
    assert not [r for r in caplog.records if r.exc_info or "never retrieved" in r.getMessage()]


async def test_a_connection_has_its_disconnect_waiter_before_its_reader_runs(server: OtaServer) -> None:
    assert server.broker is not None
    assert inspect.getattr_static(BrokerProtocolHandler, "start") is _start_with_waiter_first
    async with Device(server, "waiter-1"):
        _, handler = server.broker._sessions["a1Test/waiter-1/waiter-1"]
        waiter = handler._disconnect_waiter
        assert waiter is not None and not waiter.done()
    await asyncio.wait_for(waiter, 5)  # resolved when the client left


async def test_keep_alive_is_watched_by_the_sweep_not_amqtts_read_timeout(server: OtaServer) -> None:
    assert "self.handle_read_timeout()" in inspect.getsource(BrokerProtocolHandler._reader_loop)
    assert server.broker is not None
    async with Device(server, "ka-2", keepalive=30):
        session, handler = server.broker._sessions["a1Test/ka-2/ka-2"]
        assert session.keep_alive == 0  # amqtt's per-packet timeout is off...
        watched = _keep_alive_watch(server.broker)._watched
        assert watched[handler][:2] == (session, 45)  # ...and the sweep allows 1.5 x 30 s
