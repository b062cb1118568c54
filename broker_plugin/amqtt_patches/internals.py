"""The version guard: the amqtt 0.12 private details these patches rely on, checked at start.

amqtt keeps everything the patches change private (the Broker's `_sessions`,
`_subscriptions`, `_servers`, `_initialize_client_session`, ...; the protocol handler's
hooks; `Session._init_states`), and it moved such details between 0.11 and 0.12 without
notice. pyproject.toml pins amqtt to 0.12.x; `check_internals` fails at start, not quietly
under load, when a detail is gone, and tests/test_amqtt_patches_internals.py fails when one
changes shape.

Also here: `broker_of`, the Broker behind a plugin context (amqtt hands plugins a context
whose `_broker_instance` is private), and `_per_broker`, how a patch keeps its state on the
one broker it serves (several brokers in one process each have their own).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import amqtt.mqtt.protocol.broker_handler as amqtt_broker_handler
import amqtt.session as amqtt_session
from amqtt.broker import Broker
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.publish import PublishVariableHeader
from amqtt.session import Session

T = TypeVar("T")


class AmqttInternalsChanged(RuntimeError):
    """amqtt moved a private detail we rely on; pin amqtt to 0.12.x or update this module."""


def broker_of(context: Any) -> Broker:
    broker = getattr(context, "_broker_instance", None)
    if not isinstance(broker, Broker):
        raise AmqttInternalsChanged("BrokerContext._broker_instance is gone; this amqtt is not 0.12.x")
    return broker


def check_classes() -> None:
    """The amqtt classes and module attributes `install()` replaces or wraps, and the hooks
    the patches call, are there (raises AmqttInternalsChanged otherwise)."""
    session_hooks = ("_init_states", "_on_enter_connected", "_on_enter_disconnected")
    if not all(hasattr(Session, name) for name in session_hooks):
        raise AmqttInternalsChanged(f"amqtt Session lacks one of {session_hooks}; pin amqtt to 0.12.x")
    if not all(hasattr(BrokerProtocolHandler, name) for name in (
            "init_from_connect", "handle_read_timeout", "handle_publish", "mqtt_publish", "start")) \
            or not hasattr(Session, "next_packet_id"):
        raise AmqttInternalsChanged("amqtt Broker lacks handler hooks; pin amqtt to 0.12.x")
    if not hasattr(MQTTFixedHeader, "from_stream") or not hasattr(PublishVariableHeader, "from_stream") \
            or not hasattr(amqtt_session, "Queue") or not hasattr(amqtt_broker_handler, "Queue"):
        raise AmqttInternalsChanged("amqtt's packet readers or connection queues moved; pin amqtt to 0.12.x")


def check_internals(broker: Broker) -> None:
    """Fail loudly at start, not quietly under load, when amqtt's internals moved."""
    # plugins_manager is not set yet while plugins are built; it is looked up at call time.
    needed = ("_servers", "_sessions", "_subscriptions", "_retained_messages", "_authenticate", "_delete_session",
              "add_subscription", "_del_subscription", "_del_all_subscriptions",
              "_initialize_client_session", "_handle_client_session", "_publish_retained_messages_for_subscription",
              "_matches",
              "_topic_filtering", "_get_handler", "config", "retain_message", "_create_ssl_context")
    missing = [name for name in needed if not hasattr(broker, name)]
    check_classes()
    if missing:
        raise AmqttInternalsChanged(f"amqtt Broker lacks {missing}; pin amqtt to 0.12.x")


def _per_broker(broker: Broker, attribute: str, make: Callable[[Broker], T]) -> T:
    """The one `make(broker)` kept on this broker (made on first use)."""
    value = getattr(broker, attribute, None)
    if value is None:
        value = make(broker)
        setattr(broker, attribute, value)
    return value
