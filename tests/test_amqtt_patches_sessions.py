"""broker_plugin/amqtt_patches, what the broker holds per session: light_sessions.py (state
and queues), subscriptions.py (the indexed table) and retained.py. End to end:
tests/test_broker_security.py and tests/test_mqtt_edges.py."""
from __future__ import annotations

import asyncio
from pathlib import Path

import amqtt.mqtt.protocol.broker_handler as amqtt_broker_handler
import amqtt.session as amqtt_session
from amqtt.session import Session
from support.harness import UPGRADE_BATCH, Device, OtaServer, write_catalog
from support.raw_mqtt import connack, device_connect, open_raw, publish

from broker_plugin.amqtt_patches.light_sessions import LightQueue, SessionStates
from support.harness import until as _until


async def test_light_queue_keeps_order_and_hands_items_on_when_a_getter_is_cancelled() -> None:
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


async def test_sessions_go_through_their_states_without_a_state_machine(server: OtaServer) -> None:
    assert server.broker is not None
    assert amqtt_session.Queue is LightQueue and amqtt_broker_handler.Queue is LightQueue
    assert Session().transitions.is_new()
    async with Device(server, "light-1"):
        session, _ = server.broker._sessions["a1Test/light-1/light-1"]
        assert isinstance(session.transitions, SessionStates) and session.transitions.is_connected()
    assert await _until(lambda: session.transitions.is_disconnected())


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


async def test_a_retained_topic_set_again_counts_once_against_its_device(tmp_path: Path) -> None:
    write_catalog(tmp_path, UPGRADE_BATCH)
    server = await OtaServer(tmp_path, options={"limits": {"max_retained_kb": 4}}).start()
    try:
        assert server.broker is not None
        reader, writer = await open_raw(server.mqtt_port)
        writer.write(device_connect("ret-9"))
        assert await connack(reader) == 0
        for value in range(10):  # 10 x 1 KB on one topic: each replaces the last
            writer.write(publish("/a1Test/ret-9/user/state", bytes([value]) * 1000, qos=1, retain=True,
                                 packet_id=value + 1))
            assert (await asyncio.wait_for(reader.readexactly(4), 5))[0] == 0x40  # PUBACK
        retained = server.broker._retained_messages
        last = b"\x09" * 1000  # over max_retained_kb if each value had counted again
        assert await _until(lambda: getattr(retained.get("/a1Test/ret-9/user/state"), "data", None) == last)
        writer.close()
    finally:
        await server.stop()
