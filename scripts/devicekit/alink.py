"""The device's view of the Alink OTA protocol (docs/protocol.md): the upgrade offer of a
push (b) or get_reply (d'), MQTT block replies (e') with their CRC-16/ARC, HTTP
Content-Range, and numbers sent as strings or ints. Nothing from the server.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from typing import Any

import yarl  # aiohttp's own URL type: keeps a signed URL byte for byte

FILE_HASHES = {"md5": hashlib.md5, "sha256": hashlib.sha256}  # push signMethod, lowercased
MQTT_BLOCK_MIN, MQTT_BLOCK_MAX = 256, 131072  # docs/protocol.md 3e: allowed fileBlock.size


def _crc16_arc_tables() -> tuple[list[int], list[int]]:
    byte_table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        byte_table.append(crc)
    # A 16-bit CRC can absorb two bytes per lookup: crc' = T16[crc ^ (b0 | b1 << 8)].
    # Blocks are up to 128 KiB and a fleet checks many, so halve the Python-level loop.
    word_table = [(byte_table[x & 0xFF] >> 8) ^ byte_table[((x >> 8) ^ byte_table[x & 0xFF]) & 0xFF]
                  for x in range(65536)]
    return byte_table, word_table


_CRC_BYTE, _CRC_WORD = _crc16_arc_tables()


def crc16_arc(data: bytes) -> int:
    """CRC-16/ARC (a.k.a. CRC-16/IBM): poly 0x8005 reflected (0xA001), init 0, no xorout."""
    crc, table = 0, _CRC_WORD
    even = len(data) & ~1
    for (word,) in struct.iter_unpack("<H", memoryview(data)[:even]):
        crc = table[crc ^ word]
    if even != len(data):
        crc = (crc >> 8) ^ _CRC_BYTE[(crc ^ data[-1]) & 0xFF]
    return crc


def parse_block_reply(payload: bytes) -> tuple[dict[str, Any], bytes | None]:
    """Split an e' reply into (header, block). Error replies have no block: None.
    Raises ValueError on a malformed frame or a CRC mismatch."""
    if len(payload) < 2:
        raise ValueError("block reply shorter than its length prefix")
    (hlen,) = struct.unpack_from(">H", payload)
    if len(payload) < 2 + hlen:
        raise ValueError(f"block reply header length {hlen} exceeds payload")
    header = json.loads(payload[2:2 + hlen])
    rest = payload[2 + hlen:]
    if not rest:
        return header, None
    if len(rest) < 2:
        raise ValueError("block reply has a block but no CRC")
    block, (crc,) = rest[:-2], struct.unpack("<H", rest[-2:])
    if crc16_arc(block) != crc:
        raise ValueError(f"CRC mismatch: got {crc:#06x}, computed {crc16_arc(block):#06x}")
    return header, block


def parse_content_range(value: str | None) -> tuple[int, int, int]:
    """'bytes a-b/total' -> (a, b, total)."""
    try:
        unit, _, spec = (value or "").partition(" ")
        span, _, total = spec.partition("/")
        first, _, last = span.partition("-")
        if unit != "bytes":
            raise ValueError
        return int(first), int(last), int(total)
    except ValueError:
        raise ValueError(f"bad Content-Range {value!r}") from None


def as_int(value: Any, what: str) -> int:
    """Replies may carry numbers as strings or ints (docs/protocol.md: accept both)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} is not a number: {value!r}") from None


@dataclasses.dataclass
class Offer:
    """The upgrade description shared by push (b) and get_reply (d') data."""

    version: str
    size: int
    sign: str
    sign_method: str
    md5: str | None
    url: str | None
    stream_id: int | None
    file_id: int
    is_diff: bool
    ext: dict[str, Any]
    module: str

    @property
    def protocol(self) -> str:
        return "mqtt" if self.url is None else yarl.URL(self.url, encoded=True).scheme

    @classmethod
    def parse(cls, data: Any) -> Offer:
        """Raises KeyError or ValueError when `data` is not a usable offer."""
        if not isinstance(data, dict):
            raise ValueError(f"data is not an object: {data!r}")
        mqtt = str(data.get("dProtocol", "")).lower() == "mqtt"
        if not mqtt and not data.get("url"):
            raise ValueError("offer has neither url nor dProtocol mqtt")
        ext = data.get("extData") or {}
        if isinstance(ext, str):  # some platforms send extData as a JSON string
            ext = json.loads(ext)
        return cls(
            version=str(data["version"]),
            size=as_int(data["size"], "size"),
            sign=str(data["sign"]).lower(),
            sign_method=str(data.get("signMethod", "Md5")),
            md5=str(data["md5"]).lower() if data.get("md5") else None,
            url=None if mqtt else str(data["url"]),
            stream_id=as_int(data["streamId"], "streamId") if mqtt else None,
            file_id=as_int(data.get("streamFileId", 1), "streamFileId"),
            is_diff=as_int(data.get("isDiff", 0), "isDiff") == 1,
            ext=ext if isinstance(ext, dict) else {},
            module=str(data.get("module") or "default"),
        )

