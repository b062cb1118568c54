"""What GET /metrics shows of the fleet: per batch, devices per job state (each counted once,
by its latest job in the batch) and failed devices by how they failed, for the catalog's
batches only (so the label set stays bounded by the catalog however long the server runs);
what each running batch's rollout does now; bytes served; pushes and reloads."""
from __future__ import annotations

from dataclasses import dataclass

from otacore.catalog.model import Catalog
from otacore.decisions.admin import rollout_view
from otacore.decisions.live import LiveFleet
from otacore.catalog.rollout_policy import FAILURE_KINDS
from otacore.fleet.jobs import JobState
from otacore.fleet.rollout import failure_kind
from otacore.fleet.state import FleetState


@dataclass(frozen=True)
class BatchFigures:
    batch: str
    jobs: dict[JobState, int]  # every job state, 0 included
    failures: dict[str, int]  # every failure kind, 0 included


def batch_figures(state: FleetState, catalog: Catalog | None) -> list[BatchFigures]:
    listed = catalog.batches if catalog is not None else {}
    figures = []
    for batch, counts in sorted((name, state.counts.get(name, {})) for name in listed):
        kinds = dict.fromkeys(FAILURE_KINDS, 0)
        if counts.get(JobState.FAILED):
            for job in state.latest_in_batch.get(batch, {}).values():
                if job.state == JobState.FAILED:
                    kind = failure_kind(job)
                    kinds[kind] = kinds.get(kind, 0) + 1
        figures.append(BatchFigures(batch, {job_state: counts.get(job_state, 0) for job_state in JobState}, kinds))
    return figures


@dataclass(frozen=True)
class EngineFigures:
    pushes_sent: int
    reloads: dict[str, int]
    bytes_served: dict[str, int]  # protocol (http, mqtt) -> package bytes sent
    batches: list[BatchFigures]  # the catalog's batches, by name
    rollouts: dict[str, str]  # running batch -> what its rollout does now (active, paused, ...)


def fleet_figures(live: LiveFleet, pushes_sent: int, reloads: dict[str, int]) -> EngineFigures:
    rollouts = {}
    for name in sorted(live.running):
        view = rollout_view(live, name)
        if view is not None:
            rollouts[name] = view["state"]
    return EngineFigures(pushes_sent, dict(reloads),
                         {"http": live.downloads.bytes_http, "mqtt": live.downloads.bytes_mqtt},
                         batch_figures(live.state, live.catalog), rollouts)
