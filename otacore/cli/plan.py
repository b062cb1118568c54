"""`otactl plan`: what a reload of the catalog would do, against the state the running
server's database holds, changing nothing. One line per batch: start, stop, pause, resume,
policy change or nothing, and how many devices it would target now."""
from __future__ import annotations

from dataclasses import dataclass

from otacore.catalog.model import Batch, Catalog
from otacore.decisions.assignment import chooses
from otacore.decisions.batches import leaving, reload_action
from otacore.fleet.batches import ENDED_STATES, BatchState
from otacore.fleet.jobs import JobState
from otacore.fleet.rollout import Rollout
from otacore.fleet.state import FleetState
from otacore.protocol.credentials import DeviceId


@dataclass(frozen=True)
class PlanLine:
    batch: str
    action: str  # start | wait | stop | pause | resume | change | none
    detail: str
    targets: int | None = None  # devices it would target now

    @property
    def changes(self) -> bool:
        return self.action != "none"

    def __str__(self) -> str:
        targets = f"; would target {self.targets} device(s) now" if self.targets is not None else ""
        return f"{self.batch}: {self.action}: {self.detail}{targets}"


def plan_reload(catalog: Catalog, state: FleetState, verified: dict[str, str]) -> list[PlanLine]:
    """`verified`: package id -> status (verified / verify_failed) as the database holds it."""
    rollout = Rollout(state)
    lines = []
    for batch in catalog.batches.values():
        row = state.batches.get(batch.name)
        package = catalog.packages[batch.package]
        if row is None:
            action = reload_action(batch, package, row, verified.get(package.id, "unverified"))
            if action == BatchState.WAITING_VERIFICATION:
                lines.append(PlanLine(batch.name, "wait", f"new; waits until package {package.id} is verified"))
                continue
            paused = " (paused: state: paused)" if batch.policy.state == "paused" else ""
            lines.append(PlanLine(batch.name, "start", f"new {batch.type} batch of {package.id}{paused}",
                                  _targets(catalog, state, rollout, batch)))
            continue
        if row.state in ENDED_STATES:
            lines.append(PlanLine(batch.name, "none", f"{row.state} ({row.reason})"))
            continue
        lines.append(_running_line(catalog, state, rollout, batch, row.control))
    for row in leaving(catalog, state.batches):
        if row.state != BatchState.COMPLETED:  # a completed one only has its name spent: nothing to see
            open_jobs = len(state.open_in_batch.get(row.name, {}))
            lines.append(PlanLine(row.name, "stop",
                                  f"removed from the catalog: canceled, {open_jobs} open job(s) canceled"))
    return lines


def _running_line(catalog: Catalog, state: FleetState, rollout: Rollout, batch: Batch,
                  control: dict[str, object]) -> PlanLine:
    written = batch.policy.state or "active"
    before = control.get("catalog_state", "active")
    targets = _targets(catalog, state, rollout, batch)
    if written != before:
        action = "pause" if written == "paused" else "resume"
        return PlanLine(batch.name, action, f"state: {before} -> {written} in the catalog", targets)
    old_policy = control.get("policy", {})
    new_policy = batch.policy.text
    if old_policy != new_policy:
        assert isinstance(old_policy, dict)
        keys = sorted(set(old_policy) | set(new_policy))
        changed = [key for key in keys if old_policy.get(key) != new_policy.get(key)]
        return PlanLine(batch.name, "change", "policy " + ", ".join(
            f"{key} {_short(old_policy.get(key))} -> {_short(new_policy.get(key))}" for key in changed), targets)
    paused = " (paused)" if control.get("paused") else ""
    return PlanLine(batch.name, "none", f"running{paused}, unchanged", targets)


def _short(value: object) -> str:
    text = "(none)" if value is None else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _targets(catalog: Catalog, state: FleetState, rollout: Rollout, batch: Batch) -> int:
    """Devices whose last reported version the batch wants and that its policy chooses now,
    with or without a job already."""
    package = catalog.packages[batch.package]
    known = state.reported_versions(package.product, package.module)
    count = 0
    for name, version in known.items():
        device = DeviceId(package.product, name)
        if batch.devices is not None and name not in batch.devices:
            continue
        job = state.current_job(batch.name, device)
        if job is not None and job.state != JobState.CANCELED:
            count += rollout.member(catalog, batch, device)
        elif chooses(catalog, rollout, batch, package, device, package.module, version):
            count += 1
    return count
