"""What the journal writes: the latest value of every row that changed and the history
events, as plain tuples per table, taken from memory in the event loop (so a writer thread
never reads state that decisions are changing). Shared by every journal backend."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from otacore.fleet.state import Changes, FleetState
from otacore.protocol.routing_keys import partition_of

Records = dict[str, list[tuple[Any, ...]]]  # table -> rows, in its columns' order (storage/store.py)


def records(state: FleetState, changes: Changes, now: float, partitions: int = 1) -> Records:
    """Jobs and versions end with the device's partition (`part`, of `partitions`)."""
    jobs = [state.jobs[job_id] for job_id in sorted(changes.jobs)]  # older jobs first
    versions = []
    for device, module in changes.versions:
        version, at = state.versions[(device, module)]
        versions.append((device.product_key, device.device_name, module, version, at,
                         partition_of(device, partitions) if partitions > 1 else 0))
    batches = [(row.name, row.package_id, json.dumps(row.fingerprint, sort_keys=True), row.state.value,
                row.created_at, row.started_at, row.ended_at, row.reason, json.dumps(row.control, sort_keys=True))
               for row in (state.batches[name] for name in changes.batches)]
    return {
        "jobs": [(j.id, j.batch, j.device.product_key, j.device.device_name, j.module, j.package_id,
                  j.from_version, j.target_version, j.state.value, j.progress, j.code, j.message,
                  j.file_key, j.file_size, j.bytes_served, j.created_at, j.updated_at, j.superseded,
                  partition_of(j.device, partitions) if partitions > 1 else 0)
                 for j in jobs],
        "events": changes.events,
        "versions": versions,
        "batches": batches,
        "targets": changes.targets,
        "packages": [(package_id, state.package_status[package_id][0], now, state.package_status[package_id][1])
                     for package_id in changes.packages],
        "counters": [(name, state.counters[name]) for name in sorted(changes.counters)],
        # (sha256, text, path): written by a backend that shares catalogs (PostgreSQL, cluster mode)
        "catalog": [(hashlib.sha256(changes.catalog[0].encode()).hexdigest(), *changes.catalog)]
        if changes.catalog else [],
    }
