"""Device auth, topic ACL, and the amqtt bugs we must defend against (docs/operations.md)."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiomqtt
import pytest
from support import raw_mqtt

from broker_plugin.amqtt_patches import connections_replaced, mqtt_connections
from devicekit.signing import signed_login
from otacore.protocol.credentials import DeviceId

from support.harness import UPGRADE_BATCH, Device, OtaServer, device_secret, write_catalog


def linkkit_login(name: str, method: str, timestamp: str | None = "1795728922") -> tuple[str, str]:
    """(client id, password) as aliyun-iot-linkkit 1.2.13 signs them (client id `a1Test&{name}`)."""
    return signed_login(device_secret(name), name, "a1Test", timestamp, method=method, client_id=f"a1Test&{name}",
                        extra=("ext=1", "_ss=1", "lan=Python", "_v=1.2.13"))


@pytest.mark.parametrize("method", ["hmacsha1", "hmacmd5", "hmacsha256"])
async def test_signed_passwords_of_aliyun_sdks_are_accepted(server: OtaServer, method: str) -> None:
    client_id, password = linkkit_login("signed-1", method)
    async with aiomqtt.Client("127.0.0.1", server.mqtt_port, identifier=client_id,
                              username="signed-1&a1Test", password=password):
        pass


@pytest.mark.parametrize("username,password", [
    ("dev-x&a1Test", "wrong-secret"),
    ("dev-x&a1Unknown", "whatever"),
    ("no-ampersand", "x"),
    ("dev-x&a1Test", ""),
])
async def test_bad_credentials_get_not_authorized(server: OtaServer, username: str, password: str) -> None:
    with pytest.raises(aiomqtt.MqttError, match="[Nn]ot authorized|Bad user"):
        async with aiomqtt.Client("127.0.0.1", server.mqtt_port, identifier="x", username=username,
                                  password=password):
            pass


async def test_plain_secret_can_be_switched_off(tmp_path: Path) -> None:
    write_catalog(tmp_path, UPGRADE_BATCH)
    server = await OtaServer(tmp_path, options={"auth": {"allow_plain_secret": False}}).start()
    try:
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", server.mqtt_port, identifier="p", username="p-1&a1Test",
                                      password=device_secret("p-1")):
                pass
        client_id, password = linkkit_login("p-1", "hmacsha256")
        async with aiomqtt.Client("127.0.0.1", server.mqtt_port, identifier=client_id,
                                  username="p-1&a1Test", password=password):
            pass
    finally:
        await server.stop()


async def test_device_cannot_subscribe_outside_its_namespace(server: OtaServer) -> None:
    async with Device(server, "acl-1") as device:
        client = device._client
        assert client is not None
        for topic in ("/ota/device/upgrade/a1Test/acl-2", "#", "/sys/a1Test/+/thing/#", "/a1Test/acl-2/x"):
            granted = await client.subscribe(topic, qos=1)
            assert [getattr(code, "value", code) for code in granted] == [128], topic
        granted = await client.subscribe("/a1Test/acl-1/#", qos=1)
        assert [getattr(code, "value", code) for code in granted] == [1]


async def test_reports_on_another_devices_topic_are_ignored(server: OtaServer) -> None:
    async with Device(server, "acl-3") as attacker:
        await attacker.publish("/ota/device/inform/a1Test/acl-4", {"id": "1", "params": {"version": "1.0.0"}})
        await asyncio.sleep(0.3)
    assert await server.job_state("acl-4") is None


async def test_upstream_ota_topics_are_not_routed(server: OtaServer) -> None:
    async with Device(server, "acl-5") as device, \
            Device(server, "acl-5", client_id="acl-5-monitor") as monitor:
        await monitor.subscribe("/ota/device/+/a1Test/acl-5")
        await monitor.subscribe("/a1Test/acl-5/#")
        await device.progress("5", "not routed")
        await device.publish("/a1Test/acl-5/telemetry", {"t": 1})
        assert (await monitor.receive("/telemetry")) == b'{"t": 1}'
        assert monitor.inbox.empty()


async def test_wrong_password_with_a_live_client_id_changes_nothing(server: OtaServer) -> None:
    # amqtt bug (1): this CONNECT used to wipe the real client's subscriptions first.
    async with Device(server, "victim") as victim:
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", server.mqtt_port, identifier="victim",
                                      username="victim&a1Test", password="guess"):
                pass
        await victim.inform("1.0.0")
        assert (await victim.next_push())["data"]["version"] == "1.1.0"


async def test_second_connect_with_same_client_id_closes_the_first(server: OtaServer) -> None:
    # amqtt bug (2): the first connection used to stay open beside the second.
    async with Device(server, "twin") as first:
        assert first._reader is not None
        async with Device(server, "twin") as second:
            await asyncio.wait([first._reader], timeout=3)
            assert first.disconnected
            await second.inform("1.0.0")
            assert (await second.next_push())["data"]["version"] == "1.1.0"


async def test_silent_client_is_dropped_after_keepalive_and_its_will_fires(server: OtaServer) -> None:
    # amqtt bug (3): keep-alive was never enforced, so dead devices stayed online.
    will_topic = "/a1Test/ka-1/status"
    async with Device(server, "ka-1", client_id="ka-1-watch") as watcher:
        await watcher.subscribe(will_topic)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.mqtt_port)
        # keep-alive 1 s, a will of QoS 0
        writer.write(raw_mqtt.device_connect("ka-1", keep_alive=1, will=(will_topic, b"gone", 0, False)))
        await writer.drain()
        assert (await reader.readexactly(4))[3] == 0  # CONNACK accepted
        closed = await asyncio.wait_for(reader.read(), 6)  # silent: the server must hang up
        assert closed == b""
        assert await watcher.receive("/status", timeout=3) == b"gone"
        writer.close()


async def test_retained_messages_do_not_leak_to_other_devices_on_connect(server: OtaServer) -> None:
    # amqtt 0.12 sends a connecting client the retained messages of *every* filter on the
    # broker, past the ACL; a device must only get retained messages of its own filters.
    async with Device(server, "ret-x", client_id="ret-x-watch") as watcher:
        await watcher.subscribe("/a1Test/ret-x/#")
        async with Device(server, "ret-x") as owner:
            await owner._client.publish("/a1Test/ret-x/state", b"secret-state", qos=1, retain=True)  # type: ignore[union-attr]
            assert await watcher.receive("/state") == b"secret-state"
        async with Device(server, "ret-y") as other:
            await other.expect_nothing(0.5)
        async with Device(server, "ret-x", client_id="ret-x-late") as late:
            await late.subscribe("/a1Test/ret-x/#")
            assert await late.receive("/state") == b"secret-state"  # its own filter: still delivered


async def test_will_outside_the_device_namespace_is_refused(server: OtaServer) -> None:
    # amqtt publishes wills without the PUBLISH ACL: this would be a forged push to victim-1.
    forged = json.dumps({"code": "1000", "id": 1, "data": {"url": "http://evil.example/fw.bin"}})
    will = aiomqtt.Will(topic="/ota/device/upgrade/a1Test/victim-1", payload=forged, qos=1, retain=True)
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", server.mqtt_port, identifier="attacker-1",
                                  username="attacker-1&a1Test", password=device_secret("attacker-1"), will=will):
            pass
    own = aiomqtt.Will(topic="/a1Test/attacker-1/status", payload=b"offline")
    async with aiomqtt.Client("127.0.0.1", server.mqtt_port, identifier="attacker-1",
                              username="attacker-1&a1Test", password=device_secret("attacker-1"), will=own):
        pass


async def test_another_device_can_neither_take_over_nor_squat_a_client_id(server: OtaServer) -> None:
    # amqtt keys sessions by client id alone: cam-b with valid credentials of its own used
    # this client id to close cam-a's connection, or (connected first, clean_session=0)
    # to lock cam-a out. Inside the broker each device's client ids are its own.
    async with Device(server, "cam-a", client_id="a1Test&cam-a") as victim:
        async with Device(server, "cam-b", client_id="a1Test&cam-a") as squatter:
            await victim.inform("1.0.0")
            assert (await victim.next_push())["data"]["version"] == "1.1.0" and not victim.disconnected
            await squatter.inform("1.0.0")
            assert (await squatter.next_push())["data"]["version"] == "1.1.0"
    reader, writer = await raw_mqtt.open_raw(server.mqtt_port)
    writer.write(raw_mqtt.device_connect("cam-c", client_id="cam-d", clean=False))
    assert await raw_mqtt.connack(reader) == 0
    raw_mqtt.reset(writer)  # cam-c leaves a stored session under cam-d's client id
    async with Device(server, "cam-d") as owner:
        await owner.inform("1.0.0")
        assert (await owner.next_push())["data"]["version"] == "1.1.0"


async def test_reload_disconnects_devices_whose_secret_changed(server: OtaServer) -> None:
    async with Device(server, "rot-1") as device:
        catalog = server.root / "ota.yaml"
        catalog.write_text(catalog.read_text().replace("secret: test-product-secret", "secret: rotated-secret"))
        await server.engine.reload()
        assert device._reader is not None
        await asyncio.wait([device._reader], timeout=3)
        assert device.disconnected


async def test_a_second_connection_of_the_device_does_not_steal_its_messages(server: OtaServer) -> None:
    async with Device(server, "two-conn") as device:
        async with Device(server, "two-conn", client_id="two-conn-debug", subscribe=False):
            pass  # e.g. mosquitto_sub with the device's secret, then gone
        await device.inform("1.0.0")
        assert (await device.next_push())["data"]["version"] == "1.1.0"
        assert (await device.firmware_get())["code"] == 200


async def test_one_devices_credentials_hold_at_most_max_connections_per_device(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A leaked secret used to hold unlimited connections: with the listener's
    # max_connections, one device took every slot and honest devices waited.
    write_catalog(tmp_path, UPGRADE_BATCH)
    server = await OtaServer(tmp_path, options={"limits": {"max_connections_per_device": 3}},
                             listener={"max_connections": 12}).start()
    try:
        clones = []
        for index in range(10):  # more than the listener's free slots, one at a time
            clone = Device(server, "leaked", client_id=f"clone-{index}", subscribe=False)
            await clone.__aenter__()
            clones.append(clone)
        await asyncio.sleep(0.2)
        closed = [clone.disconnected for clone in clones]
        assert closed == [True] * 7 + [False] * 3, "the oldest connections give way, the newest three stay"
        edge = server.plugin.runtime.delivery.broker._ota_edge
        assert edge.live_connections(DeviceId("a1Test", "leaked")) == 3
        assert connections_replaced(server.plugin.runtime.delivery.broker) == 7  # ota_mqtt_connections_replaced
        # Other devices connect at once and upgrade; the listener is not full.
        async with Device(server, "honest-1") as honest, Device(server, "honest-2") as other:
            await honest.inform("1.0.0")
            assert (await honest.next_push())["data"]["version"] == "1.1.0"
            await other.inform("1.0.0")
            assert (await other.next_push())["data"]["version"] == "1.1.0"
        # The newest connection of the leaked device still gets its messages.
        await clones[-1].inform("1.0.0")
        assert (await clones[-1].next_push(timeout=5))["data"]["version"] == "1.1.0"
        warnings = [r.getMessage() for r in caplog.records if r.name == "ota.broker.crowded"]
        assert warnings and all("over limits.max_connections_per_device (3)" in w for w in warnings)
        assert len(warnings) <= 6, "logged in bursts"
        for clone in clones:
            await clone.__aexit__(None, None, None)
        await asyncio.sleep(0.2)
        assert edge.live_connections(DeviceId("a1Test", "leaked")) == 0
    finally:
        await server.stop()


@pytest.mark.parametrize("clean", [True, False])
async def test_connects_of_one_client_id_at_once_leave_one_live_connection_and_no_open_socket(
        server: OtaServer, clean: bool, caplog: pytest.LogCaptureFixture) -> None:
    # Ten CONNECTs of one client id at once all saw the same old connection and went on:
    # with clean_session=0 they shared one Session (sockets in CLOSE-WAIT for good, a
    # traceback each at shutdown); with clean_session=1, four lived side by side.
    broker = server.plugin.runtime.delivery.broker
    before = mqtt_connections(broker)
    for _ in range(3):
        connections = await asyncio.gather(*(raw_mqtt.open_raw(server.mqtt_port) for _ in range(10)))
        for _, writer in connections:
            writer.write(raw_mqtt.device_connect("twin", client_id="same", clean=clean))
        codes = await asyncio.gather(*(raw_mqtt.connack(reader, timeout=10) for reader, _ in connections))
        assert codes == [0] * 10
        await asyncio.sleep(0.3)
        open_ones = []
        for reader, writer in connections:  # all but the last are closed by the server
            writer.write(b"\xc0\x00")  # PINGREQ
            try:
                answer = await asyncio.wait_for(reader.read(2), 2)
            except (ConnectionError, TimeoutError):
                answer = b""
            if answer == b"\xd0\x00":
                open_ones.append(writer)
        assert len(open_ones) == 1, f"{len(open_ones)} connections of one client id answer PINGREQ"
        assert mqtt_connections(broker) == before + 1
        for _, writer in connections:
            writer.close()
        await asyncio.sleep(0.2)
    assert mqtt_connections(broker) == before
    assert not [r for r in caplog.records if r.exc_info or "performing take-over" in r.getMessage()]
