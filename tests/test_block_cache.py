"""MQTT blocks are read only from the file that was hashed, and cached only then."""
from __future__ import annotations

import os
from pathlib import Path

from otacore.downloads.block_cache import BlockCache
from otacore.protocol.codec import crc16_arc
from otacore.downloads.package_files import DownloadFile, FileDigest


def _download(path: Path) -> DownloadFile:
    digest = FileDigest(path.stat().st_size, "", "sha-of-the-original", path.stat().st_mtime_ns)
    return DownloadFile("fw", path, digest, False, digest)


async def test_a_block_of_a_file_changed_since_hashing_is_refused_and_not_cached(tmp_path: Path) -> None:
    path = tmp_path / "fw.bin"
    path.write_bytes(b"A" * 4096)
    download, cache = _download(path), BlockCache()
    block = await cache.block_with_crc(download, 0, 1024)
    assert block is not None and block[:-2] == b"A" * 1024
    assert int.from_bytes(block[-2:], "little") == crc16_arc(block[:-2])
    path.write_bytes(b"B" * 4096)  # rewritten in place: same size, new mtime
    os.utime(path, ns=(0, download.digest.mtime_ns + 1_000_000))
    assert await cache.block_with_crc(download, 1024, 1024) is None
    assert await cache.block_with_crc(download, 0, 1024) == block  # read before the change: still right
