"""What a reload may change (docs/operations.md, Batches): a started batch keeps its package, type, protocol and
mode, and its package keeps its version and bytes; a removed (canceled) batch's name is spent.
Used by the engine before it applies a catalog and by `otactl validate` against the database."""
from __future__ import annotations

from otacore.catalog.model import Batch, Catalog, Package
from otacore.errors import ConfigIssue
from otacore.downloads.package_files import PackageFiles
from otacore.storage.store import BatchRow

_FIELD_NAMES = {"package_version": "package version", "package_sha256": "package file"}


def batch_fingerprint(batch: Batch, package: Package, files: PackageFiles) -> dict[str, str]:
    """The fields of a batch that are fixed once it starts."""
    return {"package": batch.package, "type": batch.type, "protocol": batch.protocol, "mode": batch.mode,
            "package_version": package.version,
            "package_sha256": files.download_for(package, None).digest.sha256}


def reload_issues(catalog: Catalog, files: PackageFiles, rows: dict[str, BatchRow]) -> list[ConfigIssue]:
    issues = []
    for name, row in rows.items():
        batch = catalog.batches.get(name)
        if batch is None:
            continue
        where = f"batches[{name}]"
        if row.state == "canceled" or row.control.get("removed"):
            issues.append(ConfigIssue(catalog.path, batch.line, f"{where}.name",
                                      f"this batch was removed ({row.state}) earlier; give it a new name"))
            continue
        if row.started_at is None:
            continue  # not started yet: everything may still change
        now = batch_fingerprint(batch, catalog.packages[batch.package], files)
        changed = [key for key, value in now.items() if key in row.fingerprint and row.fingerprint[key] != value]
        if any(key in _FIELD_NAMES for key in changed):
            what = " and ".join(_FIELD_NAMES[key] for key in changed if key in _FIELD_NAMES)
            issues.append(ConfigIssue(catalog.path, catalog.packages[batch.package].line,
                                      f"packages[{batch.package}]",
                                      f"{what} changed while started batch {name!r} uses it; "
                                      "add the new build as a new package id"))
        elif changed:
            was = ", ".join(f"{key}={row.fingerprint[key]}" for key in changed)
            issues.append(ConfigIssue(catalog.path, batch.line, f"{where}.{changed[0]}",
                                      f"cannot change {', '.join(changed)} of a started batch (was {was}); "
                                      "create a new batch instead"))
    return issues
