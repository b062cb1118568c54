"""Which batch wants a device: the eligibility rules of docs/operations.md (Batches), as pure functions."""
from __future__ import annotations

from otacore.catalog.model import Batch, Catalog, Package
from otacore.protocol.credentials import DeviceId
from otacore.catalog.versions import is_lower


def version_qualifies(batch: Batch, package: Package, version: str) -> bool:
    """Does a device on `version` need this batch's package (ignoring who the device is)?"""
    if version == package.version:
        return False
    if package.is_diff and version != package.base_version:
        return False
    if batch.src_versions is not None:
        return version in batch.src_versions
    return package.is_diff or is_lower(version, package.version)


def device_in_scope(batch: Batch, package: Package, device: DeviceId, module: str) -> bool:
    """Same product and module, and on the batch's device list when it has one."""
    if device.product_key != package.product or module != package.module:
        return False
    return batch.devices is None or device.device_name in batch.devices


def wants(batch: Batch, package: Package, device: DeviceId, module: str, version: str) -> bool:
    """Does this batch want this device, on this version of this module, now?"""
    return device_in_scope(batch, package, device, module) and version_qualifies(batch, package, version)


def batch_priority(batch: Batch) -> tuple[int, int]:
    """Higher wins: verify batches first, then the batch that stands later in the file."""
    return (1 if batch.type == "verify" else 0, batch.position)


def candidate_batches(catalog: Catalog, running: set[str], device: DeviceId, module: str,
                      version: str) -> list[Batch]:
    """Running batches that would take this device now, best first (static targets are
    checked by the caller, who holds the stored target sets)."""
    found = []
    for batch in catalog.batches.values():
        if batch.name not in running:
            continue
        if wants(batch, catalog.packages[batch.package], device, module, version):
            found.append(batch)
    return sorted(found, key=batch_priority, reverse=True)
