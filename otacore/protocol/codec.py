"""Wire formats of docs/protocol.md 3: parsing device payloads, building replies, the binary block."""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any

from otacore.catalog.model import DEFAULT_MODULE

MAX_JSON_BYTES = 64 * 1024
MAX_DESC = 128
MIN_BLOCK, MAX_BLOCK = 256, 131072
# A whole number as devices write it: ASCII digits, an optional sign. int() alone would also
# take '٣' (any Unicode digit), '1_000' and ' 7 ', and float() takes '1.5e999' (infinity).
_ASCII_INTEGER = re.compile(r"[+-]?[0-9]+")
_SHOWN = 40  # characters of a device's value quoted back in an error


class PayloadError(ValueError):
    """A device payload we cannot use; the message says why, for the reply or the log."""


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc16_table()


def crc16_arc(data: bytes) -> int:
    """CRC-16/ARC (poly 0x8005 reflected, init 0, no final xor): crc(b"123456789") == 0xBB3D."""
    crc = 0
    table = _CRC_TABLE
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc


def decode_json(data: bytes | bytearray | None) -> dict[str, Any]:
    if data is None or len(data) == 0:
        raise PayloadError("empty payload; send a JSON object")
    if len(data) > MAX_JSON_BYTES:
        raise PayloadError(f"payload of {len(data)} bytes is over {MAX_JSON_BYTES}")
    try:
        text = bytes(data).decode("utf-8")
        try:
            value = json.loads(text)
        except ValueError as exc:
            # Device SDKs write `{"fileId":1,}` (Aliyun's C Link SDK 4.x), which Aliyun's
            # cloud accepts: trailing commas, and only those, are forgiven.
            lenient = _without_trailing_commas(text)
            if lenient is None:
                raise
            try:
                value = json.loads(lenient)
            except ValueError:
                raise exc from None  # the reason as the device wrote it, not as we edited it
    except (UnicodeDecodeError, ValueError) as exc:
        raise PayloadError(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise PayloadError("malformed JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise PayloadError("payload must be a JSON object")
    if "\\u" in text:  # only an escape can name a lone surrogate, which no database can store
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise PayloadError("malformed JSON: a \\u escape names a lone surrogate (\\ud800-\\udfff alone), "
                               "which UTF-8 cannot carry") from None
    return value


def _without_trailing_commas(text: str) -> str | None:
    """`text` with each comma that stands right before a closing `}` or `]` (whitespace
    between) removed, outside strings; None when it has no such comma."""
    out: list[str] = []
    in_string = escaped = changed = False
    pending_comma: int | None = None  # index in `out` of a comma that may be trailing
    last = ""  # the last character outside strings that is not whitespace
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string, last = False, '"'
        elif char == '"':
            in_string, pending_comma = True, None
        elif char in "}]" and pending_comma is not None:
            del out[pending_comma]
            pending_comma, changed, last = None, True, char
        elif char == ",":
            # Trailing only after a value: `{,}`, `[1,,]` and `{"a":,}` stay errors.
            pending_comma = len(out) if last not in ("", "{", "[", ",", ":") else None
            last = char
        elif not char.isspace():
            pending_comma, last = None, char
        out.append(char)
    return "".join(out) if changed else None


def _text(value: Any, name: str, *, required: bool = True) -> str | None:
    if value is None:
        if required:
            raise PayloadError(f"missing {name}")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise PayloadError(f"{name} must be a string or number")
    text = str(value)
    if len(text) > 256:
        raise PayloadError(f"{name} is too long")
    return text


def _params(message: dict[str, Any]) -> dict[str, Any]:
    params = message.get("params", {})
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise PayloadError("params must be an object")
    return params


def _module(value: Any) -> str:
    module = _text(value, "module", required=False)
    return module if module else DEFAULT_MODULE


def message_id(message: dict[str, Any]) -> str:
    value = message.get("id")
    return "" if value is None or isinstance(value, (dict, list)) else str(value)[:64]


@dataclass(frozen=True)
class VersionReport:
    id: str
    version: str
    module: str


@dataclass(frozen=True)
class ProgressReport:
    id: str
    step: int
    desc: str
    module: str


@dataclass(frozen=True)
class FirmwareRequest:
    id: str
    version: str
    module: str


@dataclass(frozen=True)
class BlockRequest:
    id: str
    stream_id: int
    file_id: int
    size: int
    offset: int
    file_token: str | None


def parse_version_report(message: dict[str, Any]) -> VersionReport:
    params = _params(message)
    version = _text(params.get("version"), "params.version")
    if not version:
        raise PayloadError("params.version is empty")
    return VersionReport(message_id(message), version, _module(params.get("module")))


def parse_step(value: Any) -> int:
    if value is None:
        raise PayloadError("missing step")
    step = _int(value, "step")
    if not (0 <= step <= 100 or step in (-1, -2, -3, -4)):
        raise PayloadError(f"step {step} is outside 0..100 and -1..-4")
    return step


def parse_progress(message: dict[str, Any]) -> ProgressReport:
    params = _params(message)
    desc = params.get("desc")
    desc_text = "" if desc is None or isinstance(desc, (dict, list)) else str(desc)
    return ProgressReport(message_id(message), parse_step(params.get("step")), desc_text[:MAX_DESC],
                          _module(params.get("module")))


def parse_firmware_request(message: dict[str, Any]) -> FirmwareRequest:
    params = _params(message)
    version = message.get("version")
    return FirmwareRequest(message_id(message), "" if version is None else str(version)[:32],
                           _module(params.get("module")))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else f"{text[:_SHOWN]}..."


def _int(value: Any, name: str) -> int:
    """A JSON integer (or a float with no fraction, e.g. 45.0), or a string of ASCII digits
    with an optional sign, within 64 bits; PayloadError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise PayloadError(f"{name} must be an integer, got {_shown(value)}")
    if isinstance(value, float):
        if not value.is_integer():  # also NaN and infinity, which JSON parsers let through
            raise PayloadError(f"{name} must be an integer, got {_shown(value)}")
        value = int(value)
    elif isinstance(value, str):
        if not _ASCII_INTEGER.fullmatch(value):
            raise PayloadError(f"{name} must be an integer in ASCII digits, got {_shown(value)}")
        if len(value) > 20:  # past 64 bits whatever the digits; int() of a long string costs
            raise PayloadError(f"{name} is out of range")
        value = int(value)
    if not -(2**63) <= value < 2**63:
        raise PayloadError(f"{name} is out of range")
    return value


def parse_block_request(message: dict[str, Any]) -> BlockRequest:
    params = _params(message)
    info, block = params.get("fileInfo"), params.get("fileBlock")
    if not isinstance(info, dict) or not isinstance(block, dict):
        raise PayloadError("params.fileInfo and params.fileBlock are required objects")
    size = _int(block.get("size"), "fileBlock.size")
    offset = _int(block.get("offset"), "fileBlock.offset")
    if not MIN_BLOCK <= size <= MAX_BLOCK:
        raise PayloadError(f"fileBlock.size {size} is outside {MIN_BLOCK}..{MAX_BLOCK}")
    if offset < 0:
        raise PayloadError("fileBlock.offset must not be negative")
    token = params.get("fileToken")
    return BlockRequest(message_id(message), _int(info.get("streamId"), "fileInfo.streamId"),
                        _int(info.get("fileId", 1), "fileInfo.fileId"), size, offset,
                        None if token in (None, "") else str(token))


def encode_json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


MAX_BLOCK_HEADER = 1024  # bytes of a block reply's JSON header (L), so firmware can size its buffer


def encode_block_reply(header: dict[str, Any], block: bytes | None) -> bytes:
    """`u16 BE L` + L bytes of JSON header + block + `u16 LE CRC16/ARC(block)`; no block -> header only.
    L is at most MAX_BLOCK_HEADER: an error's `msg` is cut to fit (the echoed id is at most
    64 characters, 384 bytes even escaped)."""
    head = encode_json(header)
    while len(head) > MAX_BLOCK_HEADER and header.get("msg"):
        header = {**header, "msg": header["msg"][:len(header["msg"]) // 2]}
        head = encode_json(header)
    frame = struct.pack(">H", len(head)) + head
    if block is None:
        return frame
    return frame + block + struct.pack("<H", crc16_arc(block))


def decode_block_reply(frame: bytes) -> tuple[dict[str, Any], bytes | None]:
    """Inverse of encode_block_reply; checks the CRC. For tests and tools."""
    (length,) = struct.unpack(">H", frame[:2])
    header = json.loads(frame[2:2 + length])
    rest = frame[2 + length:]
    if not rest:
        return header, None
    block, (crc,) = rest[:-2], struct.unpack("<H", rest[-2:])
    if crc != crc16_arc(block):
        raise PayloadError("block CRC mismatch")
    return header, block
