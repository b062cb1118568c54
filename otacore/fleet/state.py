"""The engine's state in memory: reported versions, jobs and their indexes, batches, static
targets, package statuses, and per-state counts per batch. Loaded from the database at start.

Every change goes through a method here, which keeps the indexes and counts true and notes
what the journal must write (`take_changes`). Nothing here awaits or does I/O.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from otacore.protocol.credentials import DeviceId
from otacore.fleet.batches import BatchState, check_batch_move
from otacore.fleet.id_blocks import IdBlocks
from otacore.fleet.jobs import FINAL_STATES, OPEN_STATES, Job, JobState, NewJob, check_move

# Job states that are promises: the device was told (notified), or told us something it
# will not repeat (installed, a final state); committed before they are acknowledged.
_PROMISED = frozenset({JobState.NOTIFIED, JobState.INSTALLED}) | FINAL_STATES


@dataclass(slots=True)
class BatchRow:
    """A batch as the run-time state knows it (the catalog holds its definition)."""

    name: str
    package_id: str
    fingerprint: dict[str, str]
    state: BatchState
    created_at: float
    started_at: float | None
    ended_at: float | None
    reason: str
    # The rollout's run-time control (rollout.py): paused/halted and by whom, opened waves,
    # the catalog's `state:` and policy as last applied.
    control: dict[str, Any] = field(default_factory=dict)


@dataclass
class Changes:
    """What changed since the last commit: rows to write (their latest value) and events to add."""

    jobs: set[int] = field(default_factory=set)
    events: list[tuple[int, float, str | None, str, int | None, str]] = field(default_factory=list)
    versions: set[tuple[DeviceId, str]] = field(default_factory=set)
    batches: set[str] = field(default_factory=set)
    targets: list[tuple[str, str, str]] = field(default_factory=list)
    packages: set[str] = field(default_factory=set)
    counters: set[str] = field(default_factory=set)
    # Cluster mode: the catalog text (and path) the coordinator applied, published to the other
    # workers in the same transaction as the batch rows it decided with it.
    catalog: tuple[str, str] | None = None

    def __bool__(self) -> bool:
        return bool(self.jobs or self.events or self.versions or self.batches or self.targets or self.packages
                    or self.counters or self.catalog)

    def merge_older(self, older: "Changes") -> None:
        """Put back changes whose commit failed, before the ones made since."""
        self.jobs |= older.jobs
        self.events[:0] = older.events
        self.versions |= older.versions
        self.batches |= older.batches
        self.targets[:0] = older.targets
        self.packages |= older.packages
        self.counters |= older.counters
        if self.catalog is None:
            self.catalog = older.catalog


class FleetState:
    def __init__(self, next_job_id: int = 1) -> None:
        self.versions: dict[tuple[DeviceId, str], tuple[str, float]] = {}
        self.versions_by_module: dict[tuple[str, str], dict[str, str]] = {}  # (pk, module) -> name -> version
        self.jobs: dict[int, Job] = {}
        self.open_jobs: dict[tuple[DeviceId, str], Job] = {}  # one open job per device and module
        self.latest_jobs: dict[tuple[DeviceId, str], Job] = {}  # latest job per device and module
        self.current: dict[str, dict[DeviceId, Job]] = {}  # batch -> device -> its not-superseded job
        self.latest_in_batch: dict[str, dict[DeviceId, Job]] = {}  # batch -> device -> its latest job
        self.open_in_batch: dict[str, dict[int, Job]] = {}
        self.counts: dict[str, Counter[str]] = {}  # batch -> state -> devices (latest job each)
        self.batches: dict[str, BatchRow] = {}
        self.running: set[str] = set()  # batches in state running: an index of `batches`
        self.targets: dict[str, set[str]] = {}  # static batch -> device names
        self.package_status: dict[str, tuple[str, str]] = {}  # package -> (status, sha256 earned with)
        self.job_counts: Counter[tuple[str, DeviceId]] = Counter()  # (batch, device) -> jobs it had there
        self.next_job_id = next_job_id
        # Cluster mode: job ids from blocks reserved in the shared database (several workers
        # create jobs); None: `next_job_id` counts up.
        self.job_ids: IdBlocks | None = None
        self.counters: dict[str, int] = {}  # name -> highest value that may have been used
        self.changes = Changes()
        self.promises = 0  # counts promises made; the engine commits before they leave

    # -- the journal's side ------------------------------------------------------------
    def take_changes(self) -> Changes:
        taken, self.changes = self.changes, Changes()
        return taken

    def give_back(self, changes: Changes) -> None:
        changes_since, self.changes = self.changes, changes
        changes_since.merge_older(changes)
        self.changes = changes_since

    def set_counter(self, name: str, value: int) -> None:
        self.counters[name] = value
        self.changes.counters.add(name)

    # -- reported versions -------------------------------------------------------------
    def version(self, device: DeviceId, module: str) -> str | None:
        entry = self.versions.get((device, module))
        return entry[0] if entry else None

    def reported_versions(self, product_key: str, module: str) -> dict[str, str]:
        return self.versions_by_module.get((product_key, module), {})

    def record_version(self, device: DeviceId, module: str, version: str, now: float) -> bool:
        """False when the device reported what it had reported before: nothing to write."""
        entry = self.versions.get((device, module))
        if entry is not None and entry[0] == version:
            return False
        self._set_version(device, module, version, now)
        self.changes.versions.add((device, module))
        return True

    def _set_version(self, device: DeviceId, module: str, version: str, at: float) -> None:
        self.versions[(device, module)] = (version, at)
        self.versions_by_module.setdefault((device.product_key, module), {})[device.device_name] = version

    # -- jobs --------------------------------------------------------------------------
    def open_job(self, device: DeviceId, module: str) -> Job | None:
        return self.open_jobs.get((device, module))

    def latest_job(self, device: DeviceId, module: str) -> Job | None:
        return self.latest_jobs.get((device, module))

    def current_job(self, batch: str, device: DeviceId) -> Job | None:
        return self.current.get(batch, {}).get(device)

    def latest_job_in_batch(self, batch: str, device: DeviceId) -> Job | None:
        return self.latest_in_batch.get(batch, {}).get(device)

    def batch_open_jobs(self, batch: str) -> list[Job]:
        return sorted(self.open_in_batch.get(batch, {}).values(), key=lambda job: job.id)

    def jobs_of(self, batch: str, device: DeviceId) -> int:
        """How many jobs the device had in the batch (retries included)."""
        return self.job_counts[(batch, device)]

    def batch_latest_jobs(self, batch: str) -> list[Job]:
        return sorted(self.latest_in_batch.get(batch, {}).values(), key=lambda job: job.id)

    def create_job(self, batch: str, new: NewJob, reason: str, now: float) -> Job | None:
        """None when the device has an open job for the module, or a current job in the batch."""
        if new.state in OPEN_STATES and (new.device, new.module) in self.open_jobs:
            return None
        if new.device in self.current.get(batch, {}):
            return None
        progress = 100 if new.state == JobState.SUCCEEDED else 0
        job = Job(self._new_job_id(), batch, new.device, new.module, new.package_id, new.from_version,
                  new.target_version, new.state, progress, None, "", new.file_key, new.file_size, 0, now, now)
        self._index(job)
        self.changes.jobs.add(job.id)
        self.changes.events.append((job.id, now, None, job.state.value, job.progress, reason))
        self.promises += 1
        return job

    def _new_job_id(self) -> int:
        if self.job_ids is not None:
            return self.job_ids.take()
        job_id = self.next_job_id
        self.next_job_id += 1
        return job_id

    def move(self, job: Job, to: JobState, reason: str, now: float, **fields: Any) -> Job:
        """Move `job` to `to` (or update it in place), checked against the table of legal moves;
        recorded as an event in the job's history."""
        check_move(job.id, job.state, to)
        old = job.state
        self._set(job, to, now, fields)
        self.changes.events.append((job.id, now, old.value, to.value, job.progress, reason))
        if to != old and to in _PROMISED:
            self.promises += 1
        return job

    def update(self, job: Job, now: float, **fields: Any) -> None:
        """Telemetry on an open job (progress within a state, bytes served): the latest value
        is written with the next commit, without an event."""
        self._set(job, job.state, now, fields)

    def touch(self, job: Job, now: float) -> None:
        """The device showed it is alive (a report that changed nothing): kept in memory for
        the timeout, written with the job's next change; such a report writes nothing."""
        job.updated_at = now

    def _set(self, job: Job, to: JobState, now: float, fields: dict[str, Any]) -> None:
        old = job.state
        for name, value in fields.items():
            setattr(job, name, value)
        job.updated_at = now
        if to != old:
            job.state = to
            if self.latest_in_batch.get(job.batch, {}).get(job.device) is job:
                counts = self.counts.setdefault(job.batch, Counter())
                counts[old] -= 1
                counts[to] += 1
            if to in FINAL_STATES:
                self.open_jobs.pop((job.device, job.module), None)
                self.open_in_batch.get(job.batch, {}).pop(job.id, None)
        if job.superseded:
            current = self.current.get(job.batch, {})
            if current.get(job.device) is job:
                del current[job.device]
        self.changes.jobs.add(job.id)

    def _index(self, job: Job) -> None:
        """Add a job to every index (at creation, or when loading the database)."""
        self.jobs[job.id] = job
        self.job_counts[(job.batch, job.device)] += 1
        key = (job.device, job.module)
        if job.is_open:
            self.open_jobs[key] = job
            self.open_in_batch.setdefault(job.batch, {})[job.id] = job
        latest = self.latest_jobs.get(key)
        if latest is None or latest.id < job.id:
            self.latest_jobs[key] = job
        if not job.superseded:
            self.current.setdefault(job.batch, {})[job.device] = job
        in_batch = self.latest_in_batch.setdefault(job.batch, {})
        previous = in_batch.get(job.device)
        if previous is None or previous.id < job.id:
            counts = self.counts.setdefault(job.batch, Counter())
            if previous is not None:
                counts[previous.state] -= 1
            counts[job.state] += 1
            in_batch[job.device] = job

    def forget_batches(self, names: set[str]) -> int:
        """Drop from memory the jobs of these batches (ones that left the catalog), keeping
        each device's latest job per module, which decisions read, and any job not final or
        not yet written: the rest is history, on disk only (status of a removed batch, device
        pages and `otactl` read it there). Call it between commits (see Journal.busy): a
        change being written names its jobs by id. Returns how many jobs left memory."""
        if not names:
            return 0
        kept = {id(job) for job in self.latest_jobs.values()}
        forgotten = 0
        for job_id, job in list(self.jobs.items()):
            if job.batch in names and id(job) not in kept and not job.is_open and job_id not in self.changes.jobs:
                del self.jobs[job_id]
                forgotten += 1
        for name in names:
            if self.open_in_batch.get(name):
                continue  # an open job: its batch's indexes stay until it ends
            for index in (self.current, self.latest_in_batch, self.open_in_batch, self.counts, self.targets):
                index.pop(name, None)
        if forgotten:
            for key in [key for key in self.job_counts if key[0] in names and not self.open_in_batch.get(key[0])]:
                del self.job_counts[key]
        return forgotten

    # -- batches, targets, packages ----------------------------------------------------
    def save_batch(self, name: str, package_id: str, fingerprint: dict[str, str], state: BatchState, reason: str,
                   now: float) -> BatchRow:
        """Create or update a batch; its package and fingerprint follow the catalog until it starts."""
        row = self.batches.get(name)
        state = BatchState(state)
        check_batch_move(name, row.state if row is not None else None, state)
        if row is None:
            row = self.batches[name] = BatchRow(name, package_id, fingerprint, state, now, None, None, reason)
        elif row.started_at is None:
            row.package_id, row.fingerprint = package_id, fingerprint
        self._set_batch_state(row, state)
        row.reason = reason
        if state == BatchState.RUNNING and row.started_at is None:
            row.started_at = now
        self.changes.batches.add(name)
        self.promises += 1
        return row

    def _set_batch_state(self, row: BatchRow, state: BatchState) -> None:
        """The one place a batch's state changes, keeping the `running` index true."""
        row.state = state
        if state == BatchState.RUNNING:
            self.running.add(row.name)
        else:
            self.running.discard(row.name)

    def set_control(self, name: str, fields: dict[str, Any]) -> None:
        """Update a batch's rollout control (a pause, a halt, an opened wave): kept before it
        is acknowledged or acted on."""
        row = self.batches.get(name)
        if row is None:
            return
        row.control = {**row.control, **fields}
        self.changes.batches.add(name)
        self.promises += 1

    def end_batch(self, name: str, state: BatchState, reason: str, now: float) -> None:
        row = self.batches.get(name)
        if row is None:
            return
        state = BatchState(state)
        check_batch_move(name, row.state, state)
        self._set_batch_state(row, state)
        row.reason, row.ended_at = reason, now
        self.changes.batches.add(name)
        self.promises += 1

    def publish_catalog(self, text: str, path: str) -> None:
        """Cluster mode: this catalog is the one the batch rows changed since were decided with."""
        self.changes.catalog = (text, path)
        self.promises += 1

    def add_targets(self, batch: str, product_key: str, names: list[str]) -> None:
        targets = self.targets.setdefault(batch, set())
        for name in names:
            if name not in targets:
                targets.add(name)
                self.changes.targets.append((batch, product_key, name))

    def set_package_status(self, package_id: str, status: str, sha256: str) -> None:
        self.package_status[package_id] = (status, sha256)
        self.changes.packages.add(package_id)
        self.promises += 1

    # -- loading -----------------------------------------------------------------------
    def load_version(self, device: DeviceId, module: str, version: str, at: float) -> None:
        self._set_version(device, module, version, at)

    def load_batch(self, row: BatchRow) -> None:
        self.batches[row.name] = row
        self._set_batch_state(row, row.state)

    def load_job(self, job: Job) -> None:
        self._index(job)
        if self.job_ids is None:
            self.next_job_id = max(self.next_job_id, job.id + 1)

    # -- cluster mode: devices come and go with their partition, batches are shared ------
    def devices(self) -> set[DeviceId]:
        """Every device with a reported version or a job here."""
        return {device for device, _ in self.versions} | {job.device for job in self.jobs.values()}

    def pending_for(self, holds: Callable[[DeviceId], bool]) -> bool:
        """Are changes of these devices not yet taken by the journal?"""
        changes = self.changes
        return any(holds(device) for device, _ in changes.versions) or \
            any(job_id in self.jobs and holds(self.jobs[job_id].device) for job_id in changes.jobs)

    def drop_devices(self, holds: Callable[[DeviceId], bool]) -> int:
        """Forget these devices (their partition went to another worker): versions, jobs and
        every index and count. Call it once their changes are committed (`pending_for`).
        Returns how many jobs left memory."""
        for key in [key for key in self.versions if holds(key[0])]:
            device, module = key
            del self.versions[key]
            names = self.versions_by_module.get((device.product_key, module))
            if names is not None:
                names.pop(device.device_name, None)
        dropped = [job for job in self.jobs.values() if holds(job.device)]
        for job in dropped:
            del self.jobs[job.id]
            key = (job.device, job.module)
            if self.open_jobs.get(key) is job:
                del self.open_jobs[key]
            if self.latest_jobs.get(key) is job:
                del self.latest_jobs[key]
            if self.current.get(job.batch, {}).get(job.device) is job:
                del self.current[job.batch][job.device]
            self.open_in_batch.get(job.batch, {}).pop(job.id, None)
            in_batch = self.latest_in_batch.get(job.batch, {})
            if in_batch.get(job.device) is job:
                del in_batch[job.device]
                self.counts[job.batch][job.state] -= 1
            self.job_counts.pop((job.batch, job.device), None)
        return len(dropped)

    def replace_shared(self, rows: dict[str, BatchRow], package_status: dict[str, tuple[str, str]],
                       targets: dict[str, set[str]]) -> None:
        """The shared rows as the deciding worker committed them (no change to write)."""
        self.batches = {}
        self.running = set()
        for row in rows.values():
            self.load_batch(row)
        self.package_status = dict(package_status)
        self.targets = {name: set(names) for name, names in targets.items()}
