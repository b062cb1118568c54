"""Every use of amqtt 0.12 private internals, one module per thing amqtt gets wrong
(docs/operations.md, "amqtt 0.12 and its bugs", numbers the bugs the docstrings cite).

Two kinds of change, applied two ways:

- `install()` changes amqtt's classes, for every broker in the process: amqtt's Session,
  its protocol handler and its packet readers are shared, so they are patched exactly once
  (a module-level guard; calling it again, from any number of brokers, does nothing).
  light_sessions, disconnect_waiter, fixed_header, malformed_publish, connect_conformance
  and unacknowledged each say what they replace.
- `harden(broker)` changes one Broker instance (connect, edge, retained, subscriptions)
  and keeps that broker's state on it (limits, edge, keep-alive watch, stored sessions,
  upstream consumer), so brokers in one process never share it. It calls `install()`
  first and is idempotent per broker; the composition root (broker_plugin/assembly.py) calls
  it as amqtt builds the OTA plugin.

The rest is per broker and called by the OTA plugin and the runtime: limits
(`set_limits`), the MQTT listeners' TLS contexts (`set_tls_contexts`), the OTA topics on
the packet path (`set_upstream_consumer`), direct delivery (`SessionDelivery`), and reads
of the broker's private state (`mqtt_connections`, `mqtt_listening_sockets`,
`connections_replaced`). `check_internals` and pyproject.toml's pin (amqtt <0.13) are the
version guard; tests/test_amqtt_patches_*.py fail loudly when a private detail moves.
"""
from __future__ import annotations

import threading

from amqtt.broker import Broker

from . import (connect, connect_conformance, disconnect_waiter, edge, fixed_header, light_sessions, malformed_publish,
               retained, subscriptions, unacknowledged)
from .delivery import SessionDelivery
from .edge import connections_replaced, refused_log
from .identity import session_device, wire_client_id
from .internals import AmqttInternalsChanged, broker_of, check_classes, check_internals
from .limits import BrokerLimits, limits_of, set_limits
from .listeners import mqtt_connections, mqtt_listening_sockets
from .session_limits import MAX_SESSIONS_PER_DEVICE
from .tls_contexts import set_tls_contexts
from .upstream import UpstreamConsumer, set_upstream_consumer

__all__ = [
    "MAX_SESSIONS_PER_DEVICE", "AmqttInternalsChanged", "BrokerLimits", "SessionDelivery", "UpstreamConsumer",
    "broker_of", "check_internals", "connections_replaced", "harden", "install", "limits_of", "mqtt_connections",
    "mqtt_listening_sockets", "refused_log", "session_device", "set_limits", "set_tls_contexts",
    "set_upstream_consumer", "wire_client_id",
]

_HARDENED = "_ota_hardened"
_install_lock = threading.Lock()
_installed = False


def install() -> None:
    """Patch amqtt's classes, once per process (idempotent, safe from several brokers)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        check_classes()
        light_sessions.patch_classes()
        disconnect_waiter.patch_classes()
        fixed_header.patch_classes()
        malformed_publish.patch_classes()
        connect_conformance.patch_classes()
        unacknowledged.patch_classes()
        _installed = True


def harden(broker: Broker) -> None:
    """Replace the broker's CONNECT handling with one that authenticates first, and the rest
    of its per-broker patches (idempotent); the class patches are installed first."""
    if getattr(broker, _HARDENED, False):
        return
    check_internals(broker)
    install()
    connect.patch_broker(broker)
    edge.patch_broker(broker)
    retained.patch_broker(broker)
    subscriptions.patch_broker(broker)
    setattr(broker, _HARDENED, True)
