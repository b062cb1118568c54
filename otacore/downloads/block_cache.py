"""Recently served MQTT blocks with their CRC, shared by every device of a fleet.

Devices of one batch ask for the same (file, offset, size) blocks; reading the file and
computing CRC-16 in Python once per block instead of once per device is the difference
between the CPU going to CRC and going to the protocol.
"""
from __future__ import annotations

import asyncio
import os
import struct
from collections import OrderedDict
from typing import BinaryIO

from otacore.protocol.codec import crc16_arc
from otacore.downloads.package_files import DownloadFile, open_hashed


class BlockCache:
    def __init__(self, max_bytes: int = 32 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._blocks: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._bytes = 0

    async def block_with_crc(self, download: DownloadFile, offset: int, size: int) -> bytes | None:
        """The block's bytes followed by its little-endian CRC-16/ARC (the tail of a reply
        frame); None when the file on disk is no longer the one that was hashed (gone,
        changed, replaced); OSError when it cannot be read (permissions, I/O)."""
        key = (download.digest.sha256, offset, size)
        cached = self._blocks.get(key)
        if cached is not None:
            self._blocks.move_to_end(key)
            return cached
        cached = await asyncio.to_thread(_read_with_crc, download, offset, size)
        if cached is None:
            return None
        self._blocks[key] = cached
        self._bytes += len(cached)
        while self._bytes > self.max_bytes and self._blocks:
            _, evicted = self._blocks.popitem(last=False)
            self._bytes -= len(evicted)
        return cached


def _read_with_crc(download: DownloadFile, offset: int, size: int) -> bytes | None:
    """Read through a handle whose file is checked, before and after, to be the hashed one
    (same size and mtime): a file replaced or rewritten meanwhile must not put other bytes
    under the old hash, in this reply or in the cache every device reads from."""
    wanted = (download.digest.size, download.digest.mtime_ns)
    try:
        handle, _ = open_hashed(download)
    except FileNotFoundError:
        return None
    with handle:
        block = os.pread(handle.fileno(), size, offset)
        if _identity(handle) != wanted:
            return None
    return block + struct.pack("<H", crc16_arc(block))


def _identity(handle: BinaryIO) -> tuple[int, int]:
    stat = os.fstat(handle.fileno())
    return stat.st_size, stat.st_mtime_ns
