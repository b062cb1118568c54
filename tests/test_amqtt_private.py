"""The amqtt internals broker_plugin/amqtt_private.py relies on: fail loudly if they move."""
from __future__ import annotations

import asyncio
import inspect
from importlib.metadata import version

from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from broker_plugin.amqtt_private import check_internals
from harness import Device, OtaServer


def test_amqtt_is_the_pinned_series() -> None:
    assert version("amqtt").startswith("0.12."), "amqtt_private.py was written against amqtt 0.12.x"


def test_private_details_we_use_exist() -> None:
    source = inspect.getsource(Broker._client_connected)
    assert "self._initialize_client_session(" in source  # our hardened replacement is called here
    assert list(inspect.signature(Broker._initialize_client_session).parameters) == \
        ["self", "reader", "writer", "remote_address", "remote_port"]
    assert "self.handle_read_timeout()" in inspect.getsource(BrokerProtocolHandler._reader_loop)
    assert "mqtt_publish" in dir(BrokerProtocolHandler)
    assert {"client_id", "username", "transitions", "keep_alive", "clean_session"} <= set(vars(Session()))


async def test_running_broker_passes_the_startup_check(server: OtaServer) -> None:
    assert server.broker is not None
    check_internals(server.broker)
    assert server.broker._initialize_client_session.__qualname__.startswith("_hardened_initializer")
    # Broker.start() clears the subscription table in place; our cheap-repr table must survive it.
    assert repr(server.broker._subscriptions).endswith("subscription filters>")


async def test_direct_delivery_reaches_a_live_session_subscribed_or_not(server: OtaServer) -> None:
    # Like Aliyun, which subscribes devices to their OTA topics itself (linkkit never does).
    from otacore.protocol.credentials import DeviceId
    delivery = server.plugin.runtime.delivery
    device = DeviceId("a1Test", "direct-1")
    assert not delivery.send(device, "/ota/device/upgrade/a1Test/direct-1", b"offline", 1)
    async with Device(server, "direct-1", subscribe=False) as client:
        assert delivery.send(device, "/ota/device/upgrade/a1Test/direct-1", b"unsolicited", 1)
        assert await client.receive("/upgrade/a1Test/direct-1") == b"unsolicited"


async def test_a_session_is_removed_through_its_own_filters_only(server: OtaServer) -> None:
    # amqtt walks the whole filter table per deleted session; the index makes it visit only
    # the session's own filters, and must leave no filter or index entry behind.
    assert server.broker is not None
    table = server.broker._subscriptions
    async with Device(server, "idx-1") as first, Device(server, "idx-2"):
        await first.subscribe("/a1Test/idx-1/user/#")
        assert table.held["a1Test/idx-1/idx-1"] >= {"/a1Test/idx-1/user/#", "/ota/device/upgrade/a1Test/idx-1"}
        assert len(table) == 7  # three downstream OTA topics each, and one more
    for _ in range(100):
        if not table and not table.held:
            break
        await asyncio.sleep(0.02)
    assert dict(table) == {} and table.held == {}


async def test_light_queue_keeps_order_and_hands_items_on_when_a_getter_is_cancelled() -> None:
    from broker_plugin.amqtt_private import LightQueue
    queue: LightQueue[int] = LightQueue()
    first, second = asyncio.ensure_future(queue.get()), asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait(1)
    first.cancel()  # woken for item 1, but canceled before it ran: item 1 goes to the next getter
    assert await second == 1
    for item in (2, 3, 4):
        await queue.put(item)
    assert queue.qsize() == 3 and [queue.get_nowait(), await queue.get(), queue.get_nowait()] == [2, 3, 4]
    assert queue.empty()


async def test_the_packet_checks_rely_on_what_they_wrap(server: OtaServer) -> None:
    from amqtt.mqtt.packet import MQTTFixedHeader

    from broker_plugin.amqtt_private import _checked_fixed_header, _conforming_connect
    # The whole CONNECT is read first and handed to amqtt's own parser (as a BufferReader),
    # which reads nothing else from the stream.
    parse = _original(BrokerProtocolHandler.init_from_connect)
    assert list(inspect.signature(parse).parameters) == ["cls", "reader", "writer", "plugins_manager", "loop"]
    assert inspect.getsource(parse).count("reader") == 2  # the parameter, and ConnectPacket.from_stream(reader)
    assert "ConnectPacket.from_stream(reader)" in inspect.getsource(parse)
    # A malformed packet ends the reader loop through its catch-all (a warning line, then the
    # will); an MQTTError would only discard the packet and read on.
    loop_source = inspect.getsource(BrokerProtocolHandler._reader_loop)
    assert "except MQTTError:" in loop_source and "except Exception as e:" in loop_source
    assert list(inspect.signature(_original(BrokerProtocolHandler.mqtt_publish)).parameters) == \
        ["self", "topic", "data", "qos", "retain", "ack_timeout"]
    # Every broker hardens the shared classes once: the wrappers must not stack per broker.
    header = MQTTFixedHeader.from_stream
    assert _checked_fixed_header(header) is header
    connect = BrokerProtocolHandler.init_from_connect
    assert _conforming_connect(connect) is connect


def _original(function: object) -> object:
    """The amqtt function under our wrapper."""
    function = getattr(function, "__func__", function)
    while hasattr(function, "__wrapped__"):
        function = function.__wrapped__  # type: ignore[attr-defined]
    return function
