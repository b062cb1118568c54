"""A CONNECT is read whole and checked against MQTT 3.1.1 before amqtt parses it (bug 18).

amqtt parses a CONNECT field by field, not by its length, and takes what it finds: an MQTT 5
CONNECT (its properties read as the client id's length) waited for bytes that never came
and was closed at the connect deadline without the CONNACK 1 MQTT 3.1.1 asks for; a client
id with U+0000 or not UTF-8 was accepted (as the text "b'\\xff'"), and so were will QoS and
retain bits without a will. `BrokerProtocolHandler.init_from_connect` (a classmethod, so
process-wide) now reads the whole CONNECT (within `limits.max_packet_kb`), refuses it with
CONNACK 1 (MQTT 5, MQTT 3.1), CONNACK 2 (a bad client id) or no answer (other malformed
CONNECTs), and hands amqtt's own parser the checked copy.
"""
from __future__ import annotations

import functools
from typing import Any

from amqtt.adapters import BufferReader
from amqtt.codecs_amqtt import read_or_raise
from amqtt.errors import MQTTError, NoDataError
from amqtt.mqtt.connack import IDENTIFIER_REJECTED, UNACCEPTABLE_PROTOCOL_VERSION, ConnackPacket
from amqtt.mqtt.packet import CONNECT, MQTTFixedHeader
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

from otacore.log_hygiene import clean_field


class _Truncated(Exception):
    """A CONNECT shorter than its own fields say."""


class _Fields:
    """Reads a CONNECT's fields from its bytes, as MQTT 3.1.1 lays them out."""

    def __init__(self, data: bytes) -> None:
        self._data, self._at = data, 0

    def take(self, size: int) -> bytes:
        if self._at + size > len(self._data):
            raise _Truncated
        self._at += size
        return self._data[self._at - size:self._at]

    def field(self) -> bytes:
        """A two-byte length and that many bytes (a string or binary data)."""
        return self.take(int.from_bytes(self.take(2), "big"))

    @property
    def left(self) -> int:
        return len(self._data) - self._at


def _bad_string(raw: bytes) -> bool:
    """Not an MQTT UTF-8 string: undecodable (surrogates and overlong forms too) or with U+0000."""
    try:
        return "\0" in raw.decode("utf-8")
    except UnicodeDecodeError:
        return True


def _connect_problem(body: bytes) -> tuple[int | None, str] | None:
    """Why MQTT 3.1.1 refuses a CONNECT (its bytes after the fixed header): the CONNACK code to
    answer before closing (None: close without one) and the reason; None when it may go on."""
    fields = _Fields(body)
    try:
        name = fields.field()
        if name not in (b"MQTT", b"MQIsdp"):  # MQTT-3.1.2-1: may close without a CONNACK
            return None, f"protocol name {clean_field(repr(name))} is not MQTT"
        level = fields.take(1)[0]
        if name != b"MQTT" or level != 4:  # MQTT 3.1 ("MQIsdp", 3) and MQTT 5 are not spoken
            return UNACCEPTABLE_PROTOCOL_VERSION, (f"protocol level {level} ({name.decode()}): only MQTT 3.1.1 "
                                                   "(level 4) is spoken; answered CONNACK 1")
        flags = fields.take(1)[0]
        fields.take(2)  # keep-alive
        will = bool(flags & 0x04)
        if not will and flags & 0x38:  # MQTT-3.1.2-13, -15
            return None, "will QoS or will retain set without the will flag"
        if _bad_string(fields.field()):  # MQTT-1.5.3-1, -2; MQTT-3.1.3-9 answers CONNACK 2
            return IDENTIFIER_REJECTED, "client id is not UTF-8 or holds U+0000; answered CONNACK 2"
        if will:
            if _bad_string(fields.field()):
                return None, "will topic is not UTF-8 or holds U+0000"
            fields.field()  # will message
        if flags & 0x80 and _bad_string(fields.field()):
            return None, "username is not UTF-8 or holds U+0000"
        if flags & 0x40:
            fields.field()  # password
    except _Truncated:
        return None, "malformed CONNECT: shorter than its fields say"
    if fields.left:
        return None, f"malformed CONNECT: {fields.left} bytes after its last field"
    return None


def _conforming_connect(init_from_connect: Any) -> Any:
    """Bug (18): amqtt parses a CONNECT field by field, not by its length, and takes what it
    finds: an MQTT 5 CONNECT (its properties read as the client id's length) waited for bytes
    that never came and was closed at the connect deadline without the CONNACK 1 MQTT 3.1.1
    asks for; a client id with U+0000 or not UTF-8 was accepted (as the text "b'\\xff'"), and
    so were will QoS and retain bits without a will. The whole CONNECT is read first (within
    limits.max_packet_kb) and checked; amqtt then parses that copy. A refusal raises MQTTError,
    so the hardened initializer closes the socket and logs it with the other refused CONNECTs."""
    if getattr(init_from_connect, "_ota_conforming", False):
        return init_from_connect
    parse = init_from_connect.__func__

    @functools.wraps(parse)
    async def init(cls: Any, reader: Any, writer: Any, plugins_manager: Any, loop: Any = None) -> Any:
        header = await MQTTFixedHeader.from_stream(reader)
        if header is None:
            raise NoDataError("the connection closed before its CONNECT")
        peer = writer.get_peer_info() or ("?", 0)
        if header.packet_type != CONNECT:  # MQTT-3.1.0-1
            raise MQTTError(f"first packet from {peer[0]}:{peer[1]} is of type {header.packet_type}, not a CONNECT")
        body = await read_or_raise(reader, header.remaining_length) if header.remaining_length else b""
        refusal = _connect_problem(body)
        if refusal is not None:
            code, reason = refusal
            if code is not None:
                await ConnackPacket.build(0, code).to_stream(writer)
            raise MQTTError(f"CONNECT from {peer[0]}:{peer[1]}: {reason}")
        return await parse(cls, BufferReader(header.to_bytes() + body), writer, plugins_manager, loop)

    init._ota_conforming = True  # type: ignore[attr-defined]
    return classmethod(init)


def patch_classes() -> None:
    """Every broker's CONNECTs are read whole and checked first (process-wide)."""
    BrokerProtocolHandler.init_from_connect = _conforming_connect(  # type: ignore[method-assign]
        BrokerProtocolHandler.init_from_connect)
