"""MQTT packets built by hand (devicekit.mqtt_wire, re-exported), plus the CONNECT of a test device."""
from __future__ import annotations

from devicekit.mqtt_wire import (DISCONNECT, PINGREQ, connack, connect, connect_v5, open_raw, packet, parse_publish,
                                 puback, publish, raw_connect, read_packet, reset, string, subscribe, unsubscribe)
from support.harness import PK, device_secret

__all__ = ["DISCONNECT", "PINGREQ", "connack", "connect", "connect_v5", "device_connect", "open_raw", "packet",
           "parse_publish", "puback", "publish", "raw_connect", "read_packet", "reset", "string", "subscribe",
           "unsubscribe"]


def device_connect(name: str, pk: str = PK, **kwargs: object) -> bytes:
    """The CONNECT of test device `name` with its secret as password (client id: its name,
    or `client_id=`); other keywords as for `connect`."""
    return connect(kwargs.pop("client_id", name), f"{name}&{pk}", device_secret(name), **kwargs)  # type: ignore[arg-type]
