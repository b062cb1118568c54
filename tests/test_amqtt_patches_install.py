"""broker_plugin/amqtt_patches: the install() contract (__init__.py) and the version guard
(internals.py). install() patches amqtt's shared classes exactly once per process, however
many brokers run in it; harden(broker) patches one broker and keeps its state on it."""
from __future__ import annotations

import inspect
from importlib.metadata import version
from pathlib import Path

import amqtt.mqtt.protocol.broker_handler as amqtt_broker_handler
import amqtt.session as amqtt_session
import pytest
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.publish import PublishVariableHeader
from amqtt.session import Session
from support.harness import UPGRADE_BATCH, Device, OtaServer, write_catalog

from broker_plugin import amqtt_patches
from broker_plugin.amqtt_patches import AmqttInternalsChanged, broker_of, check_internals
from otacore.protocol.credentials import DeviceId


def test_amqtt_is_the_pinned_series() -> None:
    assert version("amqtt").startswith("0.12."), "amqtt_patches was written against amqtt 0.12.x"


def test_private_details_we_use_exist() -> None:
    assert {"client_id", "username", "transitions", "keep_alive", "clean_session"} <= set(vars(Session()))


async def test_running_broker_passes_the_startup_check(server: OtaServer) -> None:
    assert server.broker is not None
    check_internals(server.broker)
    assert server.broker._initialize_client_session.__qualname__.startswith("_hardened_initializer")
    # Broker.start() clears the subscription table in place; our cheap-repr table must survive it.
    assert repr(server.broker._subscriptions).endswith("subscription filters>")


def test_what_is_not_an_amqtt_0_12_broker_fails_loudly() -> None:
    with pytest.raises(AmqttInternalsChanged, match="_broker_instance"):
        broker_of(object())
    with pytest.raises(AmqttInternalsChanged, match="_sessions"):
        check_internals(object())  # type: ignore[arg-type]


def _class_patches() -> tuple[object, ...]:
    """What install() puts on amqtt's classes and modules (the objects themselves)."""
    static = inspect.getattr_static
    return (static(Session, "_init_states"), static(BrokerProtocolHandler, "start"),
            static(BrokerProtocolHandler, "init_from_connect"), static(BrokerProtocolHandler, "mqtt_publish"),
            static(MQTTFixedHeader, "from_stream"), static(PublishVariableHeader, "from_stream"),
            amqtt_session.Queue, amqtt_broker_handler.Queue)


async def test_install_patches_the_classes_once_for_every_broker_in_the_process(tmp_path: Path) -> None:
    amqtt_patches.install()
    installed = _class_patches()
    amqtt_patches.install()
    assert _class_patches() == installed
    servers = []
    for name, options in (("a", {"limits": {"connect_timeout_seconds": 2}}), ("b", {})):
        write_catalog(tmp_path / name, UPGRADE_BATCH)
        servers.append(await OtaServer(tmp_path / name, options=options).start())
    first, second = servers
    try:
        assert _class_patches() == installed  # a second broker patched nothing again
        assert first.broker is not None and second.broker is not None
        initializer = first.broker._initialize_client_session
        amqtt_patches.harden(first.broker)  # per broker, idempotent too
        assert first.broker._initialize_client_session is initializer
        assert initializer is not second.broker._initialize_client_session
        # Each broker keeps its own state: its limits, its sessions.
        assert amqtt_patches.limits_of(first.broker).connect_timeout == 2
        assert amqtt_patches.limits_of(second.broker).connect_timeout == 10
        async with Device(first, "both-1"), Device(second, "both-2"):
            assert first.plugin.runtime.delivery.is_online(DeviceId("a1Test", "both-1"))
            assert not second.plugin.runtime.delivery.is_online(DeviceId("a1Test", "both-1"))
            assert second.plugin.runtime.delivery.is_online(DeviceId("a1Test", "both-2"))
    finally:
        for running in servers:
            await running.stop()
