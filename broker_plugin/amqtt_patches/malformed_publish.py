"""A PUBLISH that breaks MQTT 3.1.1 closes its connection (bug 15).

amqtt discarded a PUBLISH whose topic has a wildcard or is not UTF-8 and read on from the
middle of it (the connection went silent for as long as the client held it), raised in a
task per PUBLISH with QoS 3 (an ERROR and a traceback each: 190 MB of log in 10 s), and
kept any number of QoS 2 PUBLISHes waiting for their PUBREL. `PublishVariableHeader.from_stream`
(process-wide) now raises MalformedPacket for an undecodable topic; `_publish_problem` is
what the packet path (upstream.py) checks of every PUBLISH before anything else.
"""
from __future__ import annotations

from typing import Any

from amqtt.errors import MQTTError
from amqtt.mqtt.publish import PublishVariableHeader
from amqtt.session import Session

from .fixed_header import MalformedPacket


def _fatal_when_malformed(from_stream: Any) -> Any:
    """amqtt discards a PUBLISH whose topic has a wildcard or is not UTF-8 and reads on from
    the middle of it: the connection went silent, answering nothing, for as long as the
    client held it. Such a packet now ends the connection."""
    if getattr(from_stream, "_ota_fatal", False):
        return from_stream

    async def checked(cls: Any, reader: Any, fixed_header: Any) -> Any:
        try:
            return await from_stream.__func__(cls, reader, fixed_header)
        except (MQTTError, UnicodeDecodeError, ValueError) as exc:
            raise MalformedPacket(f"malformed PUBLISH: {exc}") from None

    checked._ota_fatal = True  # type: ignore[attr-defined]
    return classmethod(checked)


MAX_QOS2_IN_FLIGHT = 64  # QoS 2 PUBLISHes of one connection waiting for their PUBREL


def _publish_problem(topic: str | None, qos: int | None, session: Session) -> str | None:
    """Why a PUBLISH breaks the protocol (MQTT 3.1.1 closes the connection for each)."""
    if qos not in (0, 1, 2):
        return f"PUBLISH with QoS {qos}"
    if not topic or "+" in topic or "#" in topic or "\0" in topic:
        return f"PUBLISH to an invalid topic name {topic!r}"
    if qos == 2 and len(session.inflight_in) >= MAX_QOS2_IN_FLIGHT:
        return f"over {MAX_QOS2_IN_FLIGHT} QoS 2 PUBLISHes without their PUBREL"
    return None


def patch_classes() -> None:
    """A PUBLISH with a malformed topic ends its connection (process-wide)."""
    PublishVariableHeader.from_stream = _fatal_when_malformed(  # type: ignore[method-assign]
        PublishVariableHeader.from_stream)
