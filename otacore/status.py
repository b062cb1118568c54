"""Progress reports for admins: per batch counts and percent done, per device state and progress."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .catalog import Batch, Catalog, Package
from .rollout import failure_of, rollout_view
from .store import ALL_STATES, FINAL_STATES, Store


async def _waiting(store: Store, batch: Batch | None, jobbed: set[str]) -> set[str]:
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


async def batch_summaries(store: Store, catalog: Catalog | None, only: str | None = None,
                          sha_of: ShaOf | None = None, now: float | None = None,
                          schedule: ScheduleOf | None = None) -> list[dict[str, Any]]:
    """One summary per batch (or just `only`), counting each device's latest job once.
    With `sha_of` (a package's current file hash), a verification earned by an earlier
    build of the package shows as unverified. With `schedule`, a batch's schedule is the
    server's answer of this second; without, the batch's windows answer (from their last
    openings, no cron arithmetic within an opening)."""
    rows = await store.batches()
    statuses = await store.package_statuses()
    counts_by_batch = await store.state_counts(only)
    names = list(catalog.batches) if catalog else []
    names += [name for name in rows if name not in names]
    if only is not None:
        names = [name for name in names if name == only]
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


async def batch_report(store: Store, catalog: Catalog | None, name: str, sha_of: ShaOf | None = None,
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
