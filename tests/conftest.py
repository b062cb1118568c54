"""Fixtures: a running OTA server per test, on free loopback ports with its own tmp dirs."""
from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import OtaServer, write_catalog  # noqa: E402

UPGRADE_BATCH = """
- name: up-1.1.0
  package: fw-1.1.0
  type: upgrade
  protocol: http
  mode: dynamic
  push: true
"""


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[OtaServer]:
    """A server with fw 1.0.0/1.1.0 and a pushed, dynamic http upgrade batch to 1.1.0."""
    write_catalog(tmp_path, UPGRADE_BATCH)
    running = await OtaServer(tmp_path).start()
    yield running
    await running.stop()
