"""The composition root: the one place the OTA server is put together, in this order.

1. Process-wide patches, once: amqtt's classes (amqtt_patches.install), the TLS alert flush
   (tls.install), log hygiene.
2. The broker amqtt built from broker.yaml: its own hardening (CONNECT, edge, retained,
   subscriptions) and limits, its MQTT listeners' TLS contexts.
3. The runtime (runtime.py), which at the broker's start opens, in order, the store, the
   journal (its backend: SQLite), the engine, the device messages, and the HTTP server.
4. The two seams wired: the broker's sessions are the engine's DeviceLink (where pushes go);
   amqtt's packet path hands the OTA topics to the runtime's DeviceMessages (where device
   messages come from), before their PUBACK.
5. Start and stop follow the broker: its pre-start hook starts the runtime, its
   post-shutdown hook stops it (OtaPlugin).

`ota-server` calls `build_broker`; in someone's own broker.yaml, the OTA plugin calls
`assemble` for its broker as amqtt builds it. Either way the plugins receive the runtime;
none of them assembles anything.
"""
from __future__ import annotations

from typing import Any

from amqtt.broker import Broker

from otacore import log_hygiene
from otacore.config.settings import Settings

from otaserver import tls

from . import amqtt_patches
from .amqtt_patches import BrokerLimits, SessionDelivery, set_limits, set_tls_contexts, set_upstream_consumer
from .runtime import OtaRuntime

_RUNTIME = "_ota_runtime"


def install_process_patches(settings: Settings) -> None:
    """Step 1: what changes for the whole process (each idempotent)."""
    amqtt_patches.install()
    tls.install()
    log_hygiene.install(settings.log_field_max)
    log_hygiene.limit_floods()


def assemble(broker: Broker, settings: Settings) -> OtaRuntime:
    """Steps 1-4 for one broker (once: a second call returns the same runtime)."""
    runtime: OtaRuntime | None = getattr(broker, _RUNTIME, None)
    if runtime is not None:
        return runtime
    install_process_patches(settings)
    amqtt_patches.harden(broker)
    set_limits(broker, BrokerLimits(
        connect_timeout=settings.connect_timeout_seconds, max_unauthenticated=settings.unauthenticated_cap,
        max_connections_per_device=settings.max_connections_per_device,
        max_subscriptions=settings.max_subscriptions, max_retained_bytes=settings.max_retained_kb * 1024,
        session_expiry_seconds=settings.session_expiry_hours * 3600, max_unsent=settings.max_unsent_kb * 1024,
        max_packet=settings.max_packet_kb * 1024))
    runtime = OtaRuntime(settings, SessionDelivery(broker))
    set_tls_contexts(broker, lambda listener: tls.server_context(
        settings, listener["certfile"], listener["keyfile"], cafile=listener.get("cafile"),
        capath=listener.get("capath"), cadata=listener.get("cadata"), endpoint="mqtt",
        failures=runtime.tls_failures))
    set_upstream_consumer(broker, runtime.consume)
    setattr(broker, _RUNTIME, runtime)
    return runtime


def runtime_of(broker: Broker) -> OtaRuntime | None:
    """The runtime assembled for this broker (None: no OTA plugin in its config)."""
    return getattr(broker, _RUNTIME, None)


def build_broker(broker_config: dict[str, Any], settings: Settings) -> tuple[Broker, OtaRuntime | None]:
    """`ota-server`'s whole process: patches first, then the broker amqtt builds from its
    config (whose OTA plugin assembles the rest for it), and the runtime it got."""
    install_process_patches(settings)
    broker = Broker(broker_config)
    return broker, runtime_of(broker)
