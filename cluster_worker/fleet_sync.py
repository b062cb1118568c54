"""What the workers of a cluster read from PostgreSQL to act as one (docs/cluster.md):

- the shared rows (batches, package statuses, static targets) the coordinator commits, which
  every other worker takes when PostgreSQL notifies `ota_shared` (and every few seconds in
  case a notification was lost while a connection was down);
- the catalog version the coordinator applied (`ota_catalog`): its text, so every worker
  applies the very same catalog, whatever its own copy of the file says;
- the whole fleet's latest job per device in the batches a fleet-wide rule reads (waves,
  abort, verification), for the coordinator's tick;
- who owns each client id (the broker's login check);
- a reading of the whole fleet for views (status, devices, /metrics), a second old at most,
  made only while someone looks.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from otacore.fleet.jobs import Job
from otacore.protocol.credentials import DeviceId
from otacore.fleet.state import BatchRow, FleetState
from otacore.storage.postgres_backend import load_partitions, load_shared
from otacore.storage.store import _JOB_COLUMNS, _job

from .membership import NOW

log = logging.getLogger("ota.cluster")


SHARED_CHANNEL = "ota_shared"  # the coordinator committed shared rows
CATALOG_CHANNEL = "ota_catalog"  # the coordinator applied a catalog version
FINAL_CHANNEL = "ota_final"  # a worker committed a job's final state (the coordinator looks again)
VIEW_MAX_AGE = 1.0  # seconds a reading of the whole fleet serves views


@dataclass
class SharedRows:
    batches: dict[str, BatchRow]
    package_status: dict[str, tuple[str, str]]
    targets: dict[str, set[str]]


async def read_shared(conn: asyncpg.Connection) -> SharedRows:
    state = FleetState()
    async with conn.transaction(readonly=True, isolation="repeatable_read"):  # one moment for all three
        await load_shared(conn, state)
    return SharedRows(state.batches, state.package_status, state.targets)


@dataclass
class CatalogVersion:
    id: int
    sha256: str
    text: str
    path: str


def catalog_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def latest_catalog(conn: asyncpg.Connection) -> CatalogVersion | None:
    row = await conn.fetchrow("SELECT id, sha256, text, path FROM ota_catalog ORDER BY id DESC LIMIT 1")
    return CatalogVersion(row["id"], row["sha256"], row["text"], row["path"]) if row is not None else None


def catalog_file_for(version: CatalogVersion, own: Path) -> Path:
    """Where to read the version from: this worker's own catalog file when it holds the same
    text; else a copy of the version's text beside it (so relative paths in it, like
    packages_dir, mean the same), written once."""
    try:
        if catalog_sha(own.read_text(encoding="utf-8")) == version.sha256:
            return own
    except (OSError, UnicodeDecodeError):
        pass
    copy = own.with_name(f".{own.stem}.cluster-{version.sha256[:16]}{own.suffix or '.yaml'}")
    if not copy.exists():
        tmp = copy.with_name(copy.name + ".tmp")
        tmp.write_text(version.text, encoding="utf-8")
        tmp.replace(copy)
    return copy


async def claim_client_id(conn: asyncpg.Connection, client_id: str, device: DeviceId, held_seconds: float) -> bool:
    """May `device` log in with `client_id`? The first device to use a client id owns it for as
    long as it keeps using it and `held_seconds` after (fileserver/broker_auth.py ClientIds,
    kept here so that no worker forgets it when a partition moves)."""
    claimed = await conn.fetchval(
        f"INSERT INTO ota_client_ids AS held VALUES ($1, $2, $3, {NOW}) ON CONFLICT (client_id) DO UPDATE SET "
        "product_key = excluded.product_key, device_name = excluded.device_name, used_at = excluded.used_at "
        "WHERE (held.product_key = excluded.product_key AND held.device_name = excluded.device_name) "
        "OR held.used_at < excluded.used_at - $4 RETURNING 1", client_id, device.product_key, device.device_name,
        held_seconds)
    return claimed is not None


@dataclass
class SharedFigures:
    """The whole fleet's latest job per device in some batches, as PostgreSQL has them: what
    the coordinator's rules read (fleet/rollout.py LocalFigures is the one-process kind)."""

    latest: dict[str, list[Job]] = field(default_factory=dict)
    _counts: dict[str, Counter[str]] = field(default_factory=dict)

    def latest_in_batch(self, batch: str) -> Iterable[Job]:
        return self.latest.get(batch, [])

    def counts(self, batch: str) -> dict[str, int]:
        counts = self._counts.get(batch)
        if counts is None:
            counts = self._counts[batch] = Counter(job.state for job in self.latest.get(batch, []))
        return counts


async def read_figures(conn: asyncpg.Connection, batches: list[str]) -> SharedFigures:
    figures = SharedFigures({name: [] for name in batches})
    if not batches:
        return figures
    rows = await conn.fetch(
        f"SELECT DISTINCT ON (batch, product_key, device_name, module) {_JOB_COLUMNS} FROM jobs "
        "WHERE batch = ANY($1::text[]) ORDER BY batch, product_key, device_name, module, id DESC", batches)
    for row in rows:
        job = _job(row)
        figures.latest[job.batch].append(job)
    return figures


class FleetReading:
    """The whole fleet as PostgreSQL holds it, for views: read when a view asks and the last
    reading is older than VIEW_MAX_AGE (nobody looking costs nothing)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.state: FleetState | None = None
        self._read_at = 0.0

    async def fresh(self) -> FleetState:
        """A reading at most VIEW_MAX_AGE old (waits for one)."""
        if self.state is None or time.monotonic() - self._read_at > VIEW_MAX_AGE:
            await self._read()
        assert self.state is not None
        return self.state

    def stale(self) -> None:
        """Something was committed that views show (a notification said so): read again."""
        self._read_at = 0.0

    async def _read(self) -> None:
        state = FleetState()
        async with self._pool.acquire() as conn, conn.transaction(readonly=True, isolation="repeatable_read"):
            await load_shared(conn, state)
            await load_partitions(conn, state, None)
        self.state, self._read_at = state, time.monotonic()
