"""Fixtures: a running OTA server per test, on free loopback ports with its own tmp dirs.
The helpers are in tests/support/ (importable as `support`: pyproject.toml's pytest pythonpath)."""
from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from support.harness import MQTT_BATCH, UPGRADE_BATCH, OtaServer, write_catalog


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[OtaServer]:
    """A server with fw 1.0.0/1.1.0 and a pushed, dynamic http upgrade batch to 1.1.0."""
    write_catalog(tmp_path, UPGRADE_BATCH)
    async with OtaServer(tmp_path) as running:
        yield running


@pytest.fixture
async def mqtt_server(tmp_path: Path) -> AsyncIterator[OtaServer]:
    """The same with a pushed, dynamic upgrade batch over MQTT block downloads."""
    write_catalog(tmp_path, MQTT_BATCH)
    async with OtaServer(tmp_path) as running:
        yield running
