"""TLS contexts of the MQTT listeners made by the caller, not by amqtt.

amqtt builds a listener's `ssl: on` context itself (`Broker._create_ssl_context`), with
default TLS 1.2 suites no RSA-only device stack shares, and no say in versions or ciphers.
`set_tls_contexts` replaces that method on one broker with otaserver/tls.py's contexts.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from amqtt.broker import Broker, BrokerError


def set_tls_contexts(broker: Broker, make: Callable[[dict[str, Any]], Any]) -> None:
    """Listeners with `ssl: on` get their context from `make(listener)` (otaserver/tls.py)
    instead of amqtt's default server context, whose TLS 1.2 suites no RSA-only device
    stack shares. A missing or unreadable file stays amqtt's BrokerError, which says so."""
    def create(listener: Any) -> Any:
        try:
            return make(listener)
        except KeyError as exc:
            raise BrokerError(f"listener 'ssl: on' needs certfile and keyfile: {exc} is missing") from exc
        except (OSError, ValueError) as exc:
            raise BrokerError(f"cannot use the listener's certfile {listener.get('certfile')!r} or keyfile "
                              f"{listener.get('keyfile')!r}: {exc}") from exc
    broker._create_ssl_context = create  # type: ignore[method-assign]
