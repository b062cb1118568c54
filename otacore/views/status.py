"""Progress reports for admins: per batch counts and percent done, per device state and progress.

They read a `Source`: the server's memory (`FleetView`, what the admin API uses: no database
round trip, a cost that does not grow with history) or the database (`Store`, for `otactl`
without a server and for removed batches when asked). Batches that left the catalog are
shown only when asked (`removed=True`): years of them must not slow every poll.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from otacore.catalog.model import Batch, Catalog, Package
from otacore.fleet.state import BatchRow, FleetState
from otacore.fleet.jobs import Job
from otacore.fleet.rollout import failure_of, rollout_view
from otacore.storage.store import ALL_STATES, FINAL_STATES


class Source(Protocol):
    async def batches(self) -> dict[str, BatchRow]: ...
    async def package_statuses(self) -> dict[str, tuple[str, str]]: ...
    async def state_counts(self, batch: str | None = None) -> dict[str, dict[str, int]]: ...
    async def latest_jobs(self, batch: str) -> list[Job]: ...
    async def targets(self, batch: str) -> set[str]: ...


class FleetView:
    """The status Source of a running server: its FleetState, read where it stands."""

    def __init__(self, state: FleetState) -> None:
        self.state = state

    async def batches(self) -> dict[str, BatchRow]:
        return self.state.batches

    async def package_statuses(self) -> dict[str, tuple[str, str]]:
        return self.state.package_status

    async def state_counts(self, batch: str | None = None) -> dict[str, dict[str, int]]:
        counts = self.state.counts if batch is None else {batch: self.state.counts.get(batch, {})}
        return {name: {str(state): number for state, number in by_state.items() if number}
                for name, by_state in counts.items()}

    async def latest_jobs(self, batch: str) -> list[Job]:
        return self.state.batch_latest_jobs(batch)

    async def targets(self, batch: str) -> set[str]:
        return self.state.targets.get(batch, set())


async def _waiting(store: Source, batch: Batch | None, jobbed: set[str]) -> set[str]:
    """Static targets that have not reported a targeted version yet (and are still listed)."""
    if batch is None or batch.mode != "static":
        return set()
    targets = await store.targets(batch.name)
    if batch.devices is not None:
        targets &= set(batch.devices)
    return targets - jobbed


ShaOf = Callable[[Package], str]
# A batch's schedule answer at a time (Rollout.schedule: the server's once-a-second answer).
ScheduleOf = Callable[[Batch, float], tuple[str, float | None] | None]


async def batch_summaries(store: Source, catalog: Catalog | None, only: str | None = None,
                          sha_of: ShaOf | None = None, now: float | None = None,
                          schedule: ScheduleOf | None = None, removed: bool = False) -> list[dict[str, Any]]:
    """One summary per batch of the catalog (or just `only`; with `removed`, also the ones
    that left it), counting each device's latest job once. With `sha_of` (a package's
    current file hash), a verification earned by an earlier build of the package shows as
    unverified. With `schedule`, a batch's schedule is the server's answer of this second;
    without, the batch's windows answer (from their last openings, no cron arithmetic
    within an opening)."""
    rows = await store.batches()
    statuses = await store.package_statuses()
    names = list(catalog.batches) if catalog else []
    if removed or catalog is None:
        names += [name for name in rows if name not in names]
    if only is not None:
        names = [name for name in names if name == only] or ([only] if only in rows else [])
    if only is not None or removed or catalog is None:
        counts_by_batch = await store.state_counts(only)
    else:  # batch by batch: the database reads only these batches' jobs (an index), not all history
        counts_by_batch = {}
        for name in names:
            counts_by_batch[name] = (await store.state_counts(name)).get(name, {})
    summaries = []
    for name in names:
        row = rows.get(name)
        batch = catalog.batches.get(name) if catalog else None
        counts = counts_by_batch.get(name, {})
        jobbed = {job.device.device_name for job in await store.latest_jobs(name)} if batch and \
            batch.mode == "static" else set()
        waiting = len(await _waiting(store, batch, jobbed))
        total = sum(counts.values()) + waiting
        finished = sum(counts.get(state, 0) for state in FINAL_STATES)
        package_id = batch.package if batch else (row.package_id if row else "")
        summaries.append({
            "name": name, "package": package_id,
            "type": batch.type if batch else "", "protocol": batch.protocol if batch else "",
            "mode": batch.mode if batch else "", "push": batch.push if batch else None,
            "state": row.state if row else "not started", "reason": row.reason if row else "",
            "package_status": _package_status(statuses.get(package_id), catalog, sha_of, package_id),
            "counts": {state: counts[state] for state in ALL_STATES if counts.get(state)},
            "waiting_report": waiting, "total": total,
            "done_percent": round(100 * finished / total) if total else 0,
            "succeeded_percent": round(100 * counts.get("succeeded", 0) / total) if total else 0,
        })
        if batch is not None and row is not None and row.state == "running" and \
                (not batch.policy.empty or row.control.get("by")):
            at = time.time() if now is None else now
            jobs = await store.latest_jobs(name)
            summaries[-1]["rollout"] = rollout_view(batch, row.control, jobs, at) if schedule is None else \
                rollout_view(batch, row.control, jobs, at, schedule(batch, at))
    return summaries


async def batch_report(store: Source, catalog: Catalog | None, name: str, sha_of: ShaOf | None = None,
                       schedule: ScheduleOf | None = None) -> dict[str, Any] | None:
    """The summary of one batch and a row per device, or None when there is no such batch."""
    summaries = await batch_summaries(store, catalog, only=name, sha_of=sha_of, schedule=schedule)
    if not summaries:
        return None
    jobs = await store.latest_jobs(name)
    devices: list[dict[str, Any]] = [{
        "device": job.device.device_name, "product": job.device.product_key, "module": job.module,
        "job": job.id, "state": job.state, "from": job.from_version, "to": job.target_version,
        "progress": job.progress, "served_percent": job.served_percent, "code": job.code,
        "failure": failure_of(job), "message": job.message, "updated_at": job.updated_at,
    } for job in jobs]
    batch = catalog.batches.get(name) if catalog else None
    for device in sorted(await _waiting(store, batch, {job.device.device_name for job in jobs})):
        devices.append({"device": device, "state": "waiting_report", "progress": 0, "served_percent": 0,
                        "message": "in the batch; no qualifying version reported yet"})
    return {"batch": summaries[0], "devices": devices}


def _package_status(stored: tuple[str, str] | None, catalog: Catalog | None, sha_of: ShaOf | None,
                    package_id: str) -> str:
    package = catalog.packages.get(package_id) if catalog else None
    if stored is not None:
        status, sha256 = stored
        if sha_of is None or package is None or sha_of(package) == sha256:
            return status
    return "unverified" if package is not None and package.verify else "no verification required"
