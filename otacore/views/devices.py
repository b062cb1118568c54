"""Admin views of the fleet: devices (a filtered, paged list and one device's page), the
versions reported per module, and the packages with their hashes and statuses.

The list, the versions and the packages read the engine's memory only (FleetState, the live
catalog, PackageFiles): no database read per device, so a list of a 10,000-device fleet is
a few dict walks. One device's page adds its jobs and their history from the store.

Whether a device is online and when it was last seen are the MQTT side's to know: they come
in as callables, so nothing here imports the broker.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from otacore.catalog.model import Catalog, Package
from otacore.protocol.credentials import DeviceId
from otacore.fleet.state import FleetState
from otacore.fleet.jobs import ALL_STATES, Job
from otacore.downloads.package_files import PackageFiles
from otacore.fleet.rollout import failure_of
from otacore.storage.store import Store
from otacore.catalog.versions import parse_version

MAX_LIMIT = 500
DEFAULT_LIMIT = 50
_STATES = tuple(state.value for state in ALL_STATES)

Online = Callable[[DeviceId], bool]
LastSeen = Callable[[DeviceId], float | None]


class QueryError(ValueError):
    """A query parameter that cannot be used; the message says which and what it takes."""


@dataclass(frozen=True)
class DeviceQuery:
    """Filters of `GET /admin/api/devices`; None means "any"."""

    product: str | None = None
    module: str | None = None  # the device reported a version of this module
    version: str | None = None  # ... that is this version (of `module`, or of any module)
    online: bool | None = None
    state: str | None = None  # the state of the device's latest job (of `module` when given)
    q: str | None = None  # a substring of the device name, any case
    offset: int = 0
    limit: int = DEFAULT_LIMIT


def parse_device_query(params: Mapping[str, str]) -> DeviceQuery:
    """The filters of a query string; QueryError names a bad parameter. A limit over
    MAX_LIMIT is lowered to it (the answer says the limit it used)."""
    def text(name: str) -> str | None:
        value = params.get(name)
        return value if value else None

    online = text("online")
    if online is not None and online not in ("true", "false"):
        raise QueryError(f"online={online!r}: use online=true or online=false")
    state = text("state")
    if state is not None and state not in _STATES:
        raise QueryError(f"state={state!r} is not a job state; use one of {', '.join(_STATES)}")
    return DeviceQuery(product=text("product"), module=text("module"), version=text("version"),
                       online=None if online is None else online == "true", state=state, q=text("q"),
                       offset=_number(params, "offset", 0),
                       limit=min(_number(params, "limit", DEFAULT_LIMIT), MAX_LIMIT))


def _number(params: Mapping[str, str], name: str, default: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    # isdigit() alone is true for '²'; int() also takes '+5' and '1_000'.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9):
        raise QueryError(f"{name}={raw!r}: use a whole number in ASCII digits")
    return int(raw)


def _known_devices(state: FleetState, catalog: Catalog | None,
                   product: str | None) -> dict[tuple[str, str], dict[str, str]]:
    """Every device that reported a version or is listed in the catalog, as (product key,
    name) -> module -> version. Plain tuples: a DeviceId each would double the cost."""
    devices: dict[tuple[str, str], dict[str, str]] = {}
    for (pk, module), names in state.versions_by_module.items():
        if product is not None and pk != product:
            continue
        for name, version in names.items():
            versions = devices.get((pk, name))
            if versions is None:
                versions = devices[(pk, name)] = {}
            versions[module] = version
    if catalog is not None:
        for listed in catalog.products.values():
            if product is None or listed.key == product:
                for name in listed.devices:
                    devices.setdefault((listed.key, name), {})
    return devices


def _latest_job(state: FleetState, device: DeviceId, modules: list[str]) -> Job | None:
    """The device's latest job over these modules (jobs exist only for reported modules)."""
    latest = None
    for module in modules:
        job = state.latest_jobs.get((device, module))
        if job is not None and (latest is None or job.id > latest.id):
            latest = job
    return latest


def _job_brief(job: Job | None) -> dict[str, Any] | None:
    if job is None:
        return None
    return {"id": job.id, "batch": job.batch, "module": job.module, "state": job.state.value,
            "progress": job.progress, "served_percent": job.served_percent, "code": job.code,
            "failure": failure_of(job), "message": job.message}


def device_list(state: FleetState, catalog: Catalog | None, query: DeviceQuery, online: Online,
                last_seen: LastSeen) -> dict[str, Any]:
    """`GET /admin/api/devices`: the devices matching `query`, sorted by product then name,
    one page of them. Online status and last-seen times are asked for the page only, unless
    a filter needs them."""
    needle = query.q.lower() if query.q else None
    module, version = query.module, query.version
    rows: list[tuple[tuple[str, str], dict[str, str], Job | None]] = []
    for key, versions in _known_devices(state, catalog, query.product).items():
        if needle is not None and needle not in key[1].lower():
            continue
        if module is not None:
            if module not in versions or (version is not None and versions[module] != version):
                continue
        elif version is not None and version not in versions.values():
            continue
        job = None
        if query.state is not None or query.online is not None:
            device = DeviceId(*key)
            if query.state is not None:
                job = _latest_job(state, device, [module] if module else list(versions))
                if job is None or job.state.value != query.state:
                    continue
            if query.online is not None and online(device) != query.online:
                continue
        rows.append((key, versions, job))
    rows.sort(key=lambda row: row[0])
    page = []
    for key, versions, job in rows[query.offset:query.offset + query.limit]:
        device = DeviceId(*key)
        if job is None:
            job = _latest_job(state, device, [module] if module else list(versions))
        page.append({"product": key[0], "device": key[1], "versions": dict(sorted(versions.items())),
                     "online": online(device), "last_seen": last_seen(device), "job": _job_brief(job)})
    return {"total": len(rows), "offset": query.offset, "limit": query.limit, "devices": page}


def is_known(state: FleetState, catalog: Catalog | None, device: DeviceId) -> bool:
    """Did the device report a version, or is it listed in the catalog?"""
    if catalog is not None:
        product = catalog.products.get(device.product_key)
        if product is not None and device.device_name in product.devices:
            return True
    return any(device.device_name in names for (pk, _), names in state.versions_by_module.items()
               if pk == device.product_key)


async def device_detail(store: Store, state: FleetState, catalog: Catalog | None, device: DeviceId,
                        online: Online, last_seen: LastSeen, offset: int = 0,
                        limit: int = DEFAULT_LIMIT) -> dict[str, Any] | None:
    """`GET /admin/api/devices/{product}/{device}`: its versions, tags, and a page of the jobs
    it had (`limit` from `offset`, newest first) with their history, and how many it had
    (`jobs_total`); None for a device nobody knows."""
    if not is_known(state, catalog, device):
        return None
    product = catalog.products.get(device.product_key) if catalog is not None else None
    listed = product.devices.get(device.device_name) if product is not None else None
    versions = {}
    for (pk, module) in sorted(key for key in state.versions_by_module if key[0] == device.product_key):
        entry = state.versions.get((device, module))
        if entry is not None:
            versions[module] = {"version": entry[0], "reported_at": entry[1]}
    jobs = await store.device_jobs(device, offset, limit)
    histories = await store.histories([job.id for job in jobs])
    return {
        "product": device.product_key, "device": device.device_name, "online": online(device),
        "last_seen": last_seen(device), "tags": list(listed.tags) if listed is not None else [],
        "versions": versions, "jobs_total": await store.device_job_count(device), "offset": offset, "limit": limit,
        "jobs": [{"id": job.id, "batch": job.batch, "module": job.module, "state": job.state.value,
                  "from": job.from_version, "to": job.target_version, "progress": job.progress,
                  "served_percent": job.served_percent, "code": job.code, "failure": failure_of(job),
                  "message": job.message,
                  "created_at": job.created_at, "updated_at": job.updated_at,
                  "history": [{"at": at, "from": old, "to": new, "progress": progress, "reason": reason}
                              for at, old, new, progress, reason in histories.get(job.id, [])]}
                 for job in jobs],
    }


def _version_order(version: str) -> tuple[int, tuple[int, int, int] | tuple[()], str]:
    parsed = parse_version(version)
    return (0, parsed, version) if parsed is not None else (1, (), version)


def version_counts(state: FleetState) -> dict[str, Any]:
    """`GET /admin/api/versions`: per product and module, how many devices report each version
    (lowest version first; versions that are not N.N.N last)."""
    modules = []
    for (pk, module), names in sorted(state.versions_by_module.items()):
        counts = Counter(names.values())
        if counts:
            modules.append({"product": pk, "module": module,
                            "versions": {v: counts[v] for v in sorted(counts, key=_version_order)}})
    return {"modules": modules}


def package_list(catalog: Catalog | None, files: PackageFiles | None,
                 status_of: Callable[[Package], str]) -> dict[str, Any]:
    """`GET /admin/api/packages`: the live catalog's packages in catalog order, with the hashes
    of the files being served. `status_of` is the engine's package_status (verified /
    verify_failed as earned by this very file, else unverified)."""
    if catalog is None or files is None:
        return {"packages": []}
    packages = []
    for package in catalog.packages.values():
        digest = files.download_for(package, None).digest
        status = status_of(package)
        if status == "unverified" and not package.verify:
            status = "no verification required"
        try:
            file = str(package.file.relative_to(catalog.packages_dir))
        except ValueError:
            file = package.file.name
        packages.append({"id": package.id, "product": package.product, "module": package.module,
                         "version": package.version, "type": package.type, "size": digest.size,
                         "md5": digest.md5, "sha256": digest.sha256, "sign_method": package.sign_method,
                         "status": status, "file": file})
    return {"packages": packages}
