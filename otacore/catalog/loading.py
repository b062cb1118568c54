"""A catalog ready to serve: validated, with its package files hashed and diffs built.
Shared by the engine (start and reload) and `otactl validate`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from otacore.catalog.model import Catalog, load_catalog
from otacore.downloads.package_files import PackageFiles
from otacore.config.settings import Settings


@dataclass(frozen=True)
class LoadedCatalog:
    catalog: Catalog
    files: PackageFiles


def prepare_catalog(settings: Settings, catalog_path: Path | None = None) -> LoadedCatalog:
    """Load, validate and prepare files for a catalog (blocking; run in a thread)."""
    catalog = load_catalog(catalog_path or settings.catalog_path, settings)
    files = PackageFiles(settings.data_dir)
    files.prepare(catalog)
    return LoadedCatalog(catalog, files)
