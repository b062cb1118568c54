"""broker_plugin/amqtt_patches, the CONNECT path: connect.py (authenticate first, one connect
of a client id at a time), connect_conformance.py (the whole CONNECT checked first),
identity.py (client ids scoped to the device), edge.py (connections before and after their
CONNECT), limits.py and session_limits.py. End to end: tests/test_broker_security.py and
tests/test_mqtt_edges.py."""
from __future__ import annotations

import asyncio
import dataclasses
import inspect

from amqtt.broker import Broker
from amqtt.mqtt.connack import IDENTIFIER_REJECTED, NOT_AUTHORIZED, UNACCEPTABLE_PROTOCOL_VERSION
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from support.harness import Device, OtaServer
from support.raw_mqtt import connack, connect, open_raw, raw_connect

from broker_plugin.amqtt_patches import (install, limits_of, mqtt_connections, session_device, set_limits,
                                         wire_client_id)
from broker_plugin.amqtt_patches.connect_conformance import _connect_problem, _conforming_connect
from broker_plugin.amqtt_patches.edge import _edge
from otacore.protocol.credentials import DeviceId
from support.harness import until as _until


def test_the_connect_path_replaces_what_amqtt_calls() -> None:
    source = inspect.getsource(Broker._client_connected)
    assert "self._initialize_client_session(" in source  # our hardened replacement is called here
    assert list(inspect.signature(Broker._initialize_client_session).parameters) == \
        ["self", "reader", "writer", "remote_address", "remote_port"]


def test_the_whole_connect_is_read_before_amqtts_parser_reads_it() -> None:
    install()
    # The whole CONNECT is read first and handed to amqtt's own parser (as a BufferReader),
    # which reads nothing else from the stream.
    parse = inspect.unwrap(BrokerProtocolHandler.init_from_connect.__func__)
    assert list(inspect.signature(parse).parameters) == ["cls", "reader", "writer", "plugins_manager", "loop"]
    assert inspect.getsource(parse).count("reader") == 2  # the parameter, and ConnectPacket.from_stream(reader)
    assert "ConnectPacket.from_stream(reader)" in inspect.getsource(parse)
    # Every broker hardens the shared classes once: the wrappers must not stack per broker.
    connect_ = BrokerProtocolHandler.init_from_connect
    assert _conforming_connect(connect_) is connect_


def test_connects_mqtt_3_1_1_refuses_and_the_answer_owed() -> None:
    def body(packet: bytes) -> bytes:
        assert packet[1] < 0x80  # a one-byte remaining length
        return packet[2:]

    good = body(raw_connect(b"dev", "dev&a1Test", "secret"))
    assert _connect_problem(good) is None
    assert _connect_problem(body(connect("dev", keep_alive=0))) is None
    for packet, code, reason in [
        (raw_connect(b"dev", "u", "p", level=5), UNACCEPTABLE_PROTOCOL_VERSION, "only MQTT 3.1.1"),
        (raw_connect(b"dev", "u", "p", name="MQIsdp", level=3), UNACCEPTABLE_PROTOCOL_VERSION, "only MQTT 3.1.1"),
        (raw_connect(b"dev", "u", "p", name="HTTP"), None, "is not MQTT"),
        (raw_connect(b"\xff", "u", "p"), IDENTIFIER_REJECTED, "client id is not UTF-8"),
        (raw_connect(b"a\x00b", "u", "p"), IDENTIFIER_REJECTED, "holds U+0000"),
        (raw_connect(b"dev", "u", "p", flags=0xC2 | 0x08), None, "without the will flag"),
    ]:
        problem = _connect_problem(body(packet))
        assert problem is not None and problem[0] == code and reason in problem[1], (packet, problem)
    assert _connect_problem(good[:-1]) == (None, "malformed CONNECT: shorter than its fields say")
    assert _connect_problem(good + b"x") == (None, "malformed CONNECT: 1 bytes after its last field")


async def test_a_client_id_is_scoped_to_its_device_inside_the_broker(server: OtaServer) -> None:
    assert server.broker is not None
    async with Device(server, "scope-1", client_id="same"), Device(server, "scope-2", client_id="same"):
        for name in ("scope-1", "scope-2"):
            session, _ = server.broker._sessions[f"a1Test/{name}/same"]
            assert wire_client_id(session) == "same"
            assert session_device(session) == DeviceId("a1Test", name)


async def test_a_refused_connect_is_answered_closed_and_leaves_the_edge_empty(server: OtaServer) -> None:
    assert server.broker is not None
    edge = _edge(server.broker)
    reader, writer = await open_raw(server.mqtt_port)
    writer.write(connect("edge-1", "edge-1&a1Test", "not-its-secret"))
    assert await connack(reader) == NOT_AUTHORIZED
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the server closed it (bug 10)
    writer.close()
    async with Device(server, "edge-2"):
        assert edge.live_connections(DeviceId("a1Test", "edge-2")) == 1
    assert await _until(lambda: mqtt_connections(server.broker) == 0)
    assert edge.live_connections(DeviceId("a1Test", "edge-2")) == 0 and edge.pending == 0


async def test_limits_reach_the_patches_and_amqtts_session_expiry(server: OtaServer) -> None:
    assert server.broker is not None
    limits = limits_of(server.broker)
    assert server.broker.config.session_expiry_interval == int(limits.session_expiry_seconds)
    set_limits(server.broker, dataclasses.replace(limits, session_expiry_seconds=90.0, connect_timeout=0.5))
    assert server.broker.config.session_expiry_interval == 90
    reader, writer = await open_raw(server.mqtt_port)  # sends nothing: closed at the new deadline
    assert await asyncio.wait_for(reader.read(), 3) == b""
    writer.close()
