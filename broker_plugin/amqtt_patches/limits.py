"""What one client can make the broker hold: the limits the patches enforce.

amqtt 0.12 bounds almost nothing per client (no CONNECT deadline, no cap on packet size,
unsent bytes, subscriptions, retained bytes or connections per device). `set_limits` keeps
one BrokerLimits (broker.yaml `limits.*`, see otacore.config.settings) on its broker; each
patch reads it when it needs it (`limits_of`), so a broker never given one has the defaults.
"""
from __future__ import annotations

from dataclasses import dataclass

from amqtt.broker import Broker

from .session_limits import _expire_stored_sessions

_LIMITS = "_ota_limits"


@dataclass(frozen=True)
class BrokerLimits:
    """What one client can make the broker hold (broker.yaml `limits.*`, see otacore.config.settings)."""

    connect_timeout: float = 10.0  # seconds from accepting a connection to its CONNECT
    max_unauthenticated: int = 1000  # connections without an accepted CONNECT; the oldest is dropped past it
    max_connections_per_device: int = 4  # live connections of one device's credentials; the oldest closes past it
    max_subscriptions: int = 100  # filters per device, over all its client ids
    max_retained_bytes: int = 64 * 1024  # retained topic+payload bytes per device
    session_expiry_seconds: float = 86400.0  # a disconnected clean_session=0 session is kept this long
    max_unsent: int = 1024 * 1024  # bytes unsent to a connection before it counts as not reading
    max_packet: int = 256 * 1024  # largest packet a client may send


def set_limits(broker: Broker, limits: BrokerLimits) -> None:
    setattr(broker, _LIMITS, limits)
    _expire_stored_sessions(broker, limits.session_expiry_seconds)


def limits_of(broker: Broker) -> BrokerLimits:
    return getattr(broker, _LIMITS, None) or BrokerLimits()
