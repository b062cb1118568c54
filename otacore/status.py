"""Progress reports for admins: per batch counts and percent done, per device state and progress."""
from __future__ import annotations

from collections import Counter
from typing import Any

from .catalog import Batch, Catalog
from .credentials import DeviceId
from .store import ALL_STATES, FINAL_STATES, Job, Store


def _latest(jobs: list[Job]) -> list[Job]:
    """Each device's latest job per batch: a retried or rejoined device counts once."""
    latest: dict[tuple[str, DeviceId, str], Job] = {}
    for job in jobs:  # ordered by id
        latest[(job.batch, job.device, job.module)] = job
    return list(latest.values())


async def _waiting(store: Store, batch: Batch | None, jobbed: set[str]) -> set[str]:
    """Static targets that have not reported a targeted version yet (and are still listed)."""
    if batch is None or batch.mode != "static":
        return set()
    targets = await store.targets(batch.name)
    if batch.devices is not None:
        targets &= set(batch.devices)
    return targets - jobbed


async def batch_summaries(store: Store, catalog: Catalog | None) -> list[dict[str, Any]]:
    rows = await store.batches()
    statuses = await store.package_statuses()
    jobs = _latest(await store.jobs())
    by_batch: dict[str, Counter[str]] = {}
    for job in jobs:
        by_batch.setdefault(job.batch, Counter())[job.state] += 1
    names = list(catalog.batches) if catalog else []
    names += [name for name in rows if name not in names]
    summaries = []
    for name in names:
        row = rows.get(name)
        batch = catalog.batches.get(name) if catalog else None
        counts = by_batch.get(name, Counter())
        waiting = len(await _waiting(store, batch, {j.device.device_name for j in jobs if j.batch == name}))
        total = sum(counts.values()) + waiting
        finished = sum(counts[state] for state in FINAL_STATES)
        package_id = batch.package if batch else (row.package_id if row else "")
        summaries.append({
            "name": name, "package": package_id,
            "type": batch.type if batch else "", "protocol": batch.protocol if batch else "",
            "mode": batch.mode if batch else "", "push": batch.push if batch else None,
            "state": row.state if row else "not started", "reason": row.reason if row else "",
            "package_status": statuses[package_id][0] if package_id in statuses
            else _unverified_status(catalog, package_id),
            "counts": {state: counts[state] for state in ALL_STATES if counts[state]},
            "waiting_report": waiting, "total": total,
            "done_percent": round(100 * finished / total) if total else 0,
            "succeeded_percent": round(100 * counts["succeeded"] / total) if total else 0,
        })
    return summaries


async def batch_devices(store: Store, catalog: Catalog | None, batch_name: str) -> list[dict[str, Any]]:
    devices = []
    jobs = _latest(await store.jobs(batch_name))
    for job in jobs:
        devices.append({
            "device": job.device.device_name, "product": job.device.product_key, "module": job.module,
            "job": job.id, "state": job.state, "from": job.from_version, "to": job.target_version,
            "progress": job.progress, "served_percent": job.served_percent, "code": job.code,
            "message": job.message, "updated_at": job.updated_at,
        })
    batch = catalog.batches.get(batch_name) if catalog else None
    for name in sorted(await _waiting(store, batch, {job.device.device_name for job in jobs})):
        devices.append({"device": name, "state": "waiting_report", "progress": 0, "served_percent": 0,
                        "message": "in the batch; no qualifying version reported yet"})
    return devices


def _unverified_status(catalog: Catalog | None, package_id: str) -> str:
    package = catalog.packages.get(package_id) if catalog else None
    return "unverified" if package is not None and package.verify else "no verification required"
