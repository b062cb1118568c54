"""The live catalog and fleet state that every decision works on, and what decisions send.

`LiveFleet` holds the catalog and package files in force, the fleet's state, the rollout's
run-time side, where URLs come from, who is online, the clock, and the outbox of one
decision. It answers questions about them; it decides nothing itself.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from otacore.catalog.model import Batch, Catalog, Package
from otacore.catalog.reload_rules import batch_fingerprint
from otacore.config.settings import Settings
from otacore.downloads.package_files import DownloadFile, PackageFiles
from otacore.downloads.serving import Downloads
from otacore.fleet.jobs import Job, JobState, NewJob
from otacore.fleet.rollout import Rollout
from otacore.fleet.state import FleetState
from otacore.protocol.credentials import DeviceId

PUSH_IDS = "push_ids"  # the counter of push ids handed out (reserved ahead)
PUSH_ID_MAX = 2**31 - 1
PUSH_ID_BLOCK = 10_000  # ids reserved per database write; a restart skips what is left of one


@dataclass(frozen=True)
class Send:
    """A message for one device's live session."""

    device: DeviceId
    topic: str
    payload: bytes
    qos: int = 1


class LiveFleet:
    """The live catalog and the fleet's state, shared by every decision."""

    def __init__(self, settings: Settings, state: FleetState, downloads: Downloads,
                 online: Callable[[DeviceId], bool], clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.state = state
        self.downloads = downloads
        self.online = online
        self.clock = clock
        self.catalog: Catalog | None = None
        self.rollout = Rollout(state)
        self.gate_was_open: dict[str, bool] = {}  # batch -> could it start jobs at the last tick
        self.wave_seen: dict[str, int] = {}  # batch -> the opened wave the last tick saw
        # Does this process decide what happens to batches (start, halt, waves, verification)?
        # Always with one process; in a cluster only the coordinator does, the others follow
        # the shared rows it writes (decisions/follow.py).
        self.decides_batches = True
        # Cluster mode: push ids from blocks reserved in the shared database (several workers
        # push); None: reserved in this process's counters.
        self.push_ids: Callable[[], int] | None = None
        # Cluster mode: does this worker hold the device (its partition)? Admin actions act
        # for held devices only; the others' workers act for theirs.
        self.holds: Callable[[DeviceId], bool] = lambda device: True
        # Cluster mode, a worker that follows: the state of each batch it has acted on.
        self.followed: dict[str, str] = {}
        self._last_push_id = state.counters.get(PUSH_IDS, 0)  # ids up to it may have left before a restart
        self._out: list[Send] = []

    @property
    def files(self) -> PackageFiles | None:
        """The live catalog's package files, which downloads serve."""
        return self.downloads.files

    @files.setter
    def files(self, files: PackageFiles | None) -> None:
        self.downloads.files = files

    @property
    def running(self) -> set[str]:
        """Batches that run now (derived from their state, never kept apart)."""
        return self.state.running

    # -- the outbox of one decision ------------------------------------------------------
    def send(self, message: Send) -> None:
        self._out.append(message)

    def take_out(self) -> list[Send]:
        out, self._out = self._out, []
        return out

    # -- questions about the catalog and files --------------------------------------------
    def new_job(self, device: DeviceId, package: Package, version: str,
                state: JobState = JobState.QUEUED) -> NewJob:
        assert self.files is not None
        download = self.files.download_for(package, version)
        return NewJob(device, package.module, package.id, version, package.version, download.key,
                      download.digest.size, state)

    def fingerprint(self, batch: Batch) -> dict[str, str]:
        assert self.catalog is not None and self.files is not None
        return batch_fingerprint(batch, self.catalog.packages[batch.package], self.files)

    def current_sha(self, package: Package) -> str:
        """SHA-256 of the package's image as the live catalog serves it."""
        assert self.files is not None
        return self.files.download_for(package, None).digest.sha256

    def package_status(self, package: Package) -> str:
        """`verified` / `verify_failed` as earned by this very file; otherwise `unverified`."""
        status, sha256 = self.state.package_status.get(package.id, ("unverified", ""))
        return status if sha256 == self.current_sha(package) else "unverified"

    def file_of(self, job: Job) -> DownloadFile | None:
        """The file this job was given (None once a reload removed it)."""
        return self.downloads.file_of(job)

    def knows_module(self, device: DeviceId, module: str) -> bool:
        product = self.catalog.products.get(device.product_key) if self.catalog else None
        return product is not None and module in product.modules

    def batch_of(self, job: Job) -> Batch | None:
        return self.catalog.batches.get(job.batch) if self.catalog else None

    # -- push ids ------------------------------------------------------------------------
    def next_push_id(self) -> int:
        """1..2^31-1, so that firmware can keep it in a signed 32-bit int (Aliyun's fit too);
        never reused across restarts: ids are reserved on disk in blocks, and the reservation
        is committed with the push's own changes, before the push leaves."""
        if self.push_ids is not None:
            return self.push_ids()
        push_id = self._last_push_id % PUSH_ID_MAX + 1  # after 2^31-1 pushes, 1 again
        if push_id > self.state.counters.get(PUSH_IDS, 0) or push_id == 1:
            self.state.set_counter(PUSH_IDS, min(push_id + PUSH_ID_BLOCK - 1, PUSH_ID_MAX))
        self._last_push_id = push_id
        return push_id
