"""The HTTP side of the OTA server: translates requests into engine calls (docs/protocol.md 4-5)."""
from __future__ import annotations

import asyncio
import base64
import os
import binascii
import hmac
import json
import logging
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from otacore.downloads.package_files import DownloadFile, log_unreadable, open_hashed
from otacore.downloads.signed_urls import UrlRejected
from otacore.engine import OtaEngine
from otacore.errors import ConfigError, Refused
from otacore.fleet.jobs import ALL_STATES
from otacore.fleet.rollout import failure_of
from otacore.protocol.codec import (PayloadError, decode_json, parse_firmware_request, parse_progress,
                                    parse_version_report)
from otacore.protocol.credentials import DeviceId
from otacore.views.devices import QueryError, parse_device_query

from . import accel
from .aiohttp_internals import PackageResponse, plain_headers
from .connection_guard import GUARD, ConnectionGuard
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, BrokerFigures, exposition, metrics_registry

log = logging.getLogger("ota.http")

ENGINE = web.AppKey("engine", OtaEngine)
ADMIN_TOKEN = web.AppKey("admin_token", str)
CROWDED = web.AppKey("crowded", Callable[[], bool])
METRICS = web.AppKey("metrics", CollectorRegistry)
BROKER = web.AppKey("broker", BrokerFigures)  # what the MQTT side knows (GET /metrics, /healthz)
DOWNLOAD_STATUSES = web.AppKey("download_statuses", dict[int, int])  # HTTP status -> /files/ answers
MAX_DEVICE_BODY = 64 * 1024
ADMIN_READ_WAIT = 5.0  # seconds an admin read waits for the database to catch up with memory


def create_app(engine: OtaEngine, admin_token: str, crowded: Callable[[], bool] = lambda: False,
               broker: BrokerFigures | None = None) -> web.Application:
    """`crowded()`: True while the server is short of connections (the listeners wait);
    `broker`: the broker's figures for GET /metrics."""
    app = web.Application(client_max_size=MAX_DEVICE_BODY)
    app[ENGINE], app[ADMIN_TOKEN], app[CROWDED] = engine, admin_token, crowded
    app[OPEN_FILES] = open_files = OpenPackageFiles()
    app.on_cleanup.append(_close_open_files)
    # A package that left the catalog, or whose file changed, gives its handle back.
    engine.on_reload(lambda _catalog: open_files.retain(engine.package_files()))
    # Listeners made with HttpSite report their connections to it (connection_guard.py).
    app[GUARD] = ConnectionGuard(engine.settings.header_timeout_seconds, engine.settings.unauthenticated_cap)
    app.on_startup.append(_start_guard)
    app.on_cleanup.append(_stop_guard)
    app.router.add_get("/files/{key}/{name}", download)  # also answers HEAD
    app.router.add_get("/base-api/api/v1/get_ota_info", get_ota_info)
    app.router.add_post("/base-api/api/v1/write_ota_info", write_ota_info)
    app.router.add_get("/admin/api/status", admin_status)
    app.router.add_get("/admin/api/batches/{name}", admin_batch)
    app.router.add_get("/admin/api/jobs/{job_id}", admin_job)
    app.router.add_post("/admin/api/reload", admin_reload)
    app.router.add_post("/admin/api/prune", admin_prune)
    app.router.add_post("/admin/api/batches/{name}/{action:retry|cancel}", admin_batch_action)
    app.router.add_post("/admin/api/batches/{name}/{action:pause|resume}", admin_batch_pause)
    app.router.add_get("/admin/api/devices", admin_devices)
    app.router.add_get("/admin/api/devices/{product}/{device}", admin_device)
    app.router.add_get("/admin/api/versions", admin_versions)
    app.router.add_get("/admin/api/packages", admin_packages)
    app.router.add_get("/admin/", console_page)
    app.router.add_get("/admin/static/{name}", console_file)
    app.router.add_get("/admin/batches/{name}", batch_status_page)
    app.router.add_get("/healthz", healthz)
    app.on_response_prepare.append(_set_package_etag)
    app[DOWNLOAD_STATUSES] = {200: 0, 206: 0}  # shown from the start, so that rate() sees the first ones
    app[BROKER] = broker or BrokerFigures()
    app[METRICS] = metrics_registry(engine, app[BROKER], app[DOWNLOAD_STATUSES],
                                    lambda: open_files.count)
    if engine.settings.accel is not None:  # nginx in front sends the bytes (fileserver/accel.py)
        accel.install(app, engine.settings.accel, engine.settings.url_ttl_seconds, app[DOWNLOAD_STATUSES],
                      app[METRICS])
    app.router.add_get("/metrics", metrics_page)
    app.on_response_prepare.append(_count_download_status)
    app.on_response_prepare.append(_protect_admin_answers)
    return app


async def _close_open_files(app: web.Application) -> None:
    app[OPEN_FILES].close()


async def _start_guard(app: web.Application) -> None:
    app[GUARD].start()


async def _stop_guard(app: web.Application) -> None:
    await app[GUARD].stop()


# The console is plain files from this server: scripts, styles, fetches and forms only from
# 'self', no inline code or style attributes (console.js sets widths through CSSOM), never
# in a frame, and no address of it leaks to another site in a Referer.
ADMIN_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


async def _protect_admin_answers(request: web.Request, response: web.StreamResponse) -> None:
    """ADMIN_HEADERS on every answer (the console, its files, the admin API, /metrics,
    /healthz, errors and the router's own 404/405 for any path and case) but downloads under
    /files/, which keep their caching and ETags, and the device API."""
    path = request.path
    if path.startswith(("/files/", "/base-api/")):
        return
    response.headers.update(ADMIN_HEADERS)
    # The answers name devices and show the fleet's state: kept by no cache. The console's
    # own code holds no data: revalidated (ETag), so a new version shows at once.
    response.headers["Cache-Control"] = "no-cache" if path.startswith("/admin/static/") else "no-store"


def _error(status: int, message: str, challenge: str | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    headers = dict(headers or {})
    if status == 401 and challenge:
        headers["WWW-Authenticate"] = challenge
    return web.json_response({"code": status, "message": message}, status=status, headers=headers)


class BadCredentials(Exception):
    """An Authorization header that cannot be read; the message says what is wrong with it."""


def _authorization(request: web.Request) -> tuple[str, str]:
    """(scheme in lower case, credentials) of the Authorization header; ("", "") without one.

    Tokens and base64 are ASCII. aiohttp hands bytes that are not UTF-8 through as lone
    surrogates, which hmac and base64 refuse with an exception (a 500): say so instead.
    """
    value = request.headers.get("Authorization", "")
    if not value.isascii():
        raise BadCredentials("the Authorization header must be ASCII")
    scheme, _, credentials = value.strip().partition(" ")
    return scheme.lower(), credentials.strip()


def _basic_credentials(request: web.Request) -> tuple[str, str] | None:
    """(user, password) of HTTP Basic; None for another scheme; BadCredentials if unreadable."""
    scheme, encoded = _authorization(request)
    if scheme != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise BadCredentials("the Basic credentials are not valid base64") from None
    try:
        user, _, password = decoded.decode("utf-8").partition(":")
    except UnicodeDecodeError:
        raise BadCredentials("the Basic credentials are not UTF-8 text") from None
    return user, password


def _admin_problem(request: web.Request, *, browser: bool = False) -> str | None:
    """None when the request carries the admin token, else what is wrong.

    The token as a Bearer token; for the browser pages (GET only) also as the password of
    HTTP Basic. Browsers replay Basic credentials on their own, so accepting them on the API
    would let any web page POST admin actions (CSRF)."""
    if "Authorization" not in request.headers:
        return "admin token required"
    try:
        scheme, token = _authorization(request)
        if scheme != "bearer":
            basic = _basic_credentials(request) if browser and request.method == "GET" else None
            if basic is None:
                return "admin token required"
            token = basic[1]
    except BadCredentials as exc:
        return str(exc)
    if not token:
        return "admin token required"
    if not hmac.compare_digest(token.encode(), request.app[ADMIN_TOKEN].encode()):
        return "wrong admin token"
    return None


def _is_admin(request: web.Request, *, browser: bool = False) -> bool:
    return _admin_problem(request, browser=browser) is None


# -- downloads --------------------------------------------------------------------------
class PackageHandle:
    """An open package file and its stat as hashed, with the answers using it now."""

    __slots__ = ("path", "stamp", "file", "stat", "users", "_retired")

    def __init__(self, path: Path, stamp: tuple[int, int], file: BinaryIO, stat: os.stat_result) -> None:
        self.path, self.stamp, self.file, self.stat = path, stamp, file, stat
        self.users = 0
        self._retired: Callable[["PackageHandle"], None] | None = None

    def release(self) -> None:
        """One answer is done with it; a retired handle closes with its last answer."""
        self.users -= 1
        if self.users <= 0 and self._retired is not None:
            self._retired(self)


class OpenPackageFiles:
    """One open handle per package file, shared by all its transfers over plain TCP.

    sendfile reads at explicit offsets, so transfers never disturb each other (TLS transfers
    read through the file position instead and open their own). A handle is retired when its
    package leaves the catalog or its file changes (a reload calls `retain`), or when a
    transfer finds the file replaced; it closes once the last answer using it ends, so a
    deleted package's disk space is freed. Never before: a transfer still sending from it
    (a device at 1 KB/s) would otherwise get the bytes of whatever file takes its number.
    """

    def __init__(self) -> None:
        self._open: dict[Path, PackageHandle] = {}
        self._retired: set[PackageHandle] = set()

    def get(self, file: DownloadFile) -> PackageHandle:
        """The handle of `file` as it was hashed, leased: call its `release()` when done.
        FileNotFoundError if it is gone or changed; another OSError if it cannot be read
        (permissions, I/O)."""
        wanted = (file.digest.size, file.digest.mtime_ns)
        entry = self._open.get(file.path)
        if entry is None or entry.stamp != wanted:
            handle, stat = open_hashed(file)
            if entry is not None:
                self._retire(entry)
            entry = self._open[file.path] = PackageHandle(file.path, wanted, handle, stat)
        entry.users += 1
        return entry

    def retain(self, current: Iterable[DownloadFile]) -> None:
        """Keep the handles of these files as hashed now; retire every other one."""
        wanted = {file.path: (file.digest.size, file.digest.mtime_ns) for file in current}
        for path, entry in list(self._open.items()):
            if wanted.get(path) != entry.stamp:
                self._retire(entry)

    @property
    def count(self) -> int:
        """Handles open now, retired ones still in use included (for /metrics)."""
        return len(self._open) + len(self._retired)

    def _retire(self, entry: PackageHandle) -> None:
        if self._open.get(entry.path) is entry:
            del self._open[entry.path]
        if entry.users <= 0:
            entry.file.close()
            return
        self._retired.add(entry)
        entry._retired = self._close_retired

    def _close_retired(self, entry: PackageHandle) -> None:
        if entry in self._retired:
            self._retired.discard(entry)
            entry.file.close()

    def close(self) -> None:
        for entry in [*self._open.values(), *self._retired]:
            entry.file.close()
        self._open.clear()
        self._retired.clear()


OPEN_FILES = web.AppKey("open_files", OpenPackageFiles)


async def _set_package_etag(request: web.Request, response: web.StreamResponse) -> None:
    if isinstance(response, PackageResponse) and response.status in (200, 206, 304):
        response.headers["ETag"] = response.package_etag


async def _count_download_status(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer to a /files/ request, by status, for GET /metrics: counted as its headers
    go out, when the status is final (a PackageResponse's 206, 304 or 416 is set then). A
    download handed to nginx is counted with the status nginx's log line gives (accel.py)."""
    if request.path.startswith("/files/") and "X-Accel-Redirect" not in response.headers:
        statuses = request.app[DOWNLOAD_STATUSES]
        statuses[response.status] = statuses.get(response.status, 0) + 1


def _etag_matches(header: str, etag: str, *, weak: bool) -> bool:
    for candidate in (part.strip() for part in header.split(",")):
        if candidate == "*":
            return True
        if candidate.startswith("W/"):
            if weak and candidate[2:] == etag:
                return True
        elif candidate == etag:
            return True
    return False


async def download(request: web.Request) -> web.StreamResponse:
    """GET/HEAD a package file: signed URL (or admin token), Range, If-Range, offset/length."""
    engine = request.app[ENGINE]
    key = request.match_info["key"]
    transfer = None
    if _is_admin(request):
        file = engine.package_file(key)
        if file is None:
            return _error(404, f"no package file {key!r}")
        if not file.is_current():
            return _error(409, "the package file changed on disk since it was hashed; run `otactl reload`")
    else:
        try:
            # The signature covers the path as sent (percent-encoded), not as decoded.
            file, transfer = engine.authorize_download(request.rel_url.raw_path, dict(request.query),
                                                       key)  # from memory
        except UrlRejected as exc:
            return _error(403, str(exc))
        except Refused as exc:
            return _error(exc.status, exc.message)
    if request.match_info["name"] != file.name:
        return _error(404, "file name does not match this URL")
    try:
        opened = request.app[OPEN_FILES].get(file)  # a lookup once the file is open
    except FileNotFoundError:
        return _error(409, "the package file changed on the server; try again later")
    except OSError as exc:
        log_unreadable(file.path, exc)
        return _error(503, "the server cannot read this package file; try again later",
                      headers={"Retry-After": "60"})
    etag = f'"{file.digest.sha256}"'
    rewritten = _rewrite_conditions(request, etag, file.digest.size)
    if isinstance(rewritten, web.StreamResponse):
        opened.release()  # answered without the file (304, 412, ...)
        return rewritten
    if transfer is not None and accel.ACCEL in request.app and request.app[accel.ACCEL].takes(request):
        opened.release()  # checked that it opens as hashed; nginx sends it
        return request.app[accel.ACCEL].response(file, transfer, etag, opened.stat.st_mtime)
    response = PackageResponse(file, opened, etag, rewritten, transfer,
                               headers={"Cache-Control": "private, no-transform"})
    if request.app[CROWDED]():
        # Short of connections: each transfer gets its own, so devices waiting to connect
        # take turns with the ones downloading instead of waiting for whole downloads.
        response.force_close()
    return response


_REWRITTEN = ("If-Match", "If-None-Match", "If-Range")


def _plain_range(value: str) -> bool:
    """Is this Range what devices send, `bytes=FIRST-[LAST]`, for aiohttp to answer as is?
    (It refuses a malformed one, LAST < FIRST and FIRST past the end with 416 itself.)"""
    return value.startswith("bytes=") and "0" <= value[6:7] <= "9" and "," not in value


def _rewrite_conditions(request: web.Request, etag: str, size: int) -> web.Request | web.StreamResponse:
    """The request FileResponse should answer: our hash-based ETag checks done, Range as RFC
    9110 has it, `?offset=&length=` turned into a Range; or the answer itself."""
    original = request.headers
    plain = (rng := original.get("Range")) is None or _plain_range(rng)
    if plain and not any(name in original for name in _REWRITTEN) \
            and "offset" not in request.query and "length" not in request.query:
        return request  # a plain (Range) GET, as devices send: nothing to rewrite
    headers = plain_headers(request)
    # aiohttp compares its own mtime-based tag; we answer the hash-based tag ourselves.
    if (match := original.get("If-Match")) is not None:
        if not _etag_matches(match, etag, weak=False):
            return web.Response(status=412)
        headers.pop("If-Match", None)
        headers.pop("If-Unmodified-Since", None)  # RFC 9110 13.1.4: If-Match decides
    if (none_match := original.get("If-None-Match")) is not None:
        if _etag_matches(none_match, etag, weak=True):
            return web.Response(status=304, headers={"ETag": etag})
        headers.pop("If-None-Match", None)
        headers.pop("If-Modified-Since", None)
    if (if_range := original.get("If-Range")) is not None:
        if not _if_range_holds(request, if_range, etag):
            headers.pop("Range", None)  # RFC 9110 13.1.5: the whole file
        if if_range.startswith(('"', "W/")):
            headers.pop("If-Range", None)  # answered here; aiohttp would compare its own tag
    if (unsatisfiable := _check_range(headers, size)) is not None:
        return unsatisfiable
    if "offset" in request.query or "length" in request.query:
        return _offset_length(request, headers)
    return request.clone(headers=headers)


def _if_range_holds(request: web.Request, if_range: str, etag: str) -> bool:
    """An entity-tag must match ours exactly (strong); a date is left to FileResponse (it
    compares the file's mtime); anything else cannot hold."""
    if if_range.startswith(('"', "W/")):
        return if_range == etag
    return request.if_range is not None


def _check_range(headers: CIMultiDict[str], size: int) -> web.Response | None:
    """Range cases aiohttp gets wrong, answered or dropped here (RFC 9110 14.1.1, 14.2)."""
    rng = headers.get("Range")
    if rng is None:
        return None
    unit, equals, spec = rng.partition("=")
    if not equals or unit.strip().lower() != "bytes" or "," in spec:
        # A unit we do not know MUST be ignored; several ranges MAY be: the whole file, 200.
        del headers["Range"]
        return None
    suffix = spec.strip()
    if suffix[:1] == "-" and suffix[1:] and not suffix[1:].strip("0"):
        # The last zero bytes: unsatisfiable (aiohttp sent the whole file as a 206).
        return web.Response(status=416, headers={"Content-Range": f"bytes */{size}",
                                                 "Cache-Control": "private, no-transform"})
    return None


def _offset_length(request: web.Request, headers: CIMultiDict[str]) -> web.Request | web.Response:
    """`?offset=N&length=M` as the Range `bytes=N-(N+M-1)`."""
    offset_text, length_text = request.query.get("offset", "0"), request.query.get("length")
    if not _ascii_number(offset_text) or (length_text is not None and not _ascii_number(length_text)):
        return _error(400, "offset and length must be whole numbers in ASCII digits")
    offset, length = int(offset_text), None if length_text is None else int(length_text)
    if length is not None and length < 1:
        return _error(400, "length must be at least 1")
    headers["Range"] = f"bytes={offset}-{'' if length is None else offset + length - 1}"
    return request.clone(headers=headers)


def _ascii_number(text: str) -> bool:
    # isdigit() alone is true for '٣' and '²'; int() also takes '+5', ' 5' and '1_000'.
    return text.isascii() and text.isdigit() and len(text) <= 19


# -- device HTTP API (SagooIoT) ---------------------------------------------------------
DEVICE_CHALLENGE = 'Basic realm="ota-server devices"'


def _device_login(request: web.Request) -> DeviceId | web.Response:
    try:
        credentials = _basic_credentials(request)
    except BadCredentials as exc:
        return _error(401, f"{exc}: send HTTP Basic auth, user {{deviceName}}&{{productKey}}, password = device "
                      "secret", DEVICE_CHALLENGE)
    if credentials is None:
        return _error(401, "HTTP Basic auth required: user {deviceName}&{productKey}, password = device secret",
                      DEVICE_CHALLENGE)
    engine = request.app[ENGINE]
    device = engine.http_login(*credentials)
    if device is None:
        return _error(401, "unknown device or wrong secret", DEVICE_CHALLENGE)
    return device


def _same_device(device: DeviceId, product_key: Any, device_key: Any) -> web.Response | None:
    if product_key is None or device_key is None:
        return _error(400, "productKey and deviceKey are required")
    if (str(product_key), str(device_key)) != (device.product_key, device.device_name):
        return _error(403, "productKey/deviceKey differ from the authenticated device")
    return None


async def get_ota_info(request: web.Request) -> web.Response:
    device = _device_login(request)
    if isinstance(device, web.Response):
        return device
    query = request.query
    if (mismatch := _same_device(device, query.get("productKey"), query.get("deviceKey"))) is not None:
        return mismatch
    engine = request.app[ENGINE]
    # The same parsing as the MQTT topics: the query is the `params` of a version report.
    params = {"module": query.get("module")}
    try:
        if query.get("version"):
            report = parse_version_report({"params": {**params, "version": query["version"]}})
            engine.decide_version(device, report.module, report.version, deliver=False)
            module = report.module
        else:
            module = parse_firmware_request({"params": params}).module
    except PayloadError as exc:
        return _error(400, str(exc))
    return web.json_response({"code": 0, "message": "", "data": await engine.offer(device, module)})


async def write_ota_info(request: web.Request) -> web.Response:
    device = _device_login(request)
    if isinstance(device, web.Response):
        return device
    try:
        body = decode_json(await read_body_in_time(request))
        report = parse_progress({"params": body})  # the body is the `params` of a progress report
    except web.HTTPRequestEntityTooLarge:
        return _error(400, f"body over {MAX_DEVICE_BODY} bytes")
    except TimeoutError:
        return body_too_slow(request)
    except PayloadError as exc:
        return _error(400, str(exc))
    if (mismatch := _same_device(device, body.get("productKey"), body.get("deviceKey"))) is not None:
        return mismatch
    try:
        await request.app[ENGINE].on_progress(device, report.module, report.step, report.desc)
    except Refused as exc:
        return _error(exc.status, exc.message, headers={"Retry-After": "2"})
    return web.json_response({"code": 0, "message": ""})


async def read_body_in_time(request: web.Request) -> bytes:
    """The body, within limits.header_timeout_seconds: a client trickling its body would
    otherwise hold a handler and its connection for as long as it likes (the header
    deadline covers only the time before the request)."""
    async with asyncio.timeout(request.app[ENGINE].settings.header_timeout_seconds):
        return await request.read()


def body_too_slow(request: web.Request) -> web.Response:
    seconds = request.app[ENGINE].settings.header_timeout_seconds
    response = _error(408, f"request body not received within {seconds:g} s (limits.header_timeout_seconds)")
    response.force_close()  # the rest of the body may never come
    return response


# -- admin API ---------------------------------------------------------------------------
def _admin_only(request: web.Request) -> web.Response | None:
    # GETs also take the browser login (the console reads the API with it); POSTs never do.
    problem = _admin_problem(request, browser=True)
    if problem is not None:
        return _error(401, f"{problem}: send Authorization: Bearer <token from data_dir/admin-token>",
                      'Bearer realm="ota-server admin"')
    return None


async def admin_status(request: web.Request) -> web.Response:
    """GET /admin/api/status[?removed=true]: the catalog's batches from memory; with
    `removed=true` also the batches that left the catalog, read from the database."""
    if (denied := _admin_only(request)) is not None:
        return denied
    engine = request.app[ENGINE]
    removed = request.query.get("removed", "false")
    if removed not in ("true", "false"):
        return _error(400, f"removed must be true or false, got {removed[:40]!r}")
    if removed == "true":
        behind = await _database_behind(engine)  # the database shows what memory knows
        if behind is not None:
            return behind
    return web.json_response({"batches": await engine.batch_summaries(removed=removed == "true")})


async def admin_batch(request: web.Request) -> web.Response:
    """GET /admin/api/batches/{name}?state=&offset=&limit=: the batch's summary and one page
    of its devices (the console pages 10,000 devices by 50)."""
    if (denied := _admin_only(request)) is not None:
        return denied
    try:
        state, offset, limit = _report_page(request.query)
    except QueryError as exc:
        return _error(400, str(exc))
    engine = request.app[ENGINE]
    name = request.match_info["name"]
    live = engine.is_live_batch(name)  # a batch of the catalog: from memory
    if not live:  # a removed one: its history on disk
        behind = await _database_behind(engine)
        if behind is not None:
            return behind
    report = await engine.batch_report(name, live=live)
    if report is None:
        return _error(404, f"no batch named {name!r}")
    devices = report["devices"] if state is None else [d for d in report["devices"] if d["state"] == state]
    return web.json_response({**report, "total": len(devices), "offset": offset, "limit": limit,
                              "devices": devices[offset:offset + limit]})


# A batch report's rows are its jobs plus "waiting_report": listed devices that have not
# reported a version yet (otacore.views.status.batch_report).
REPORT_STATES = (*(state.value for state in ALL_STATES), "waiting_report")


def _report_page(query: Mapping[str, str]) -> tuple[str | None, int, int]:
    """(state, offset, limit) of a batch report's query; QueryError as for the devices API.
    offset and limit go through the devices API's own parser: the same defaults, bounds and
    messages."""
    paging = parse_device_query({name: query[name] for name in ("offset", "limit") if name in query})
    state = query.get("state") or None
    if state is not None and state not in REPORT_STATES:
        raise QueryError(f"state={state!r} is not a state of a batch report; use one of {', '.join(REPORT_STATES)}")
    return state, paging.offset, paging.limit


async def admin_job(request: web.Request) -> web.Response:
    if (denied := _admin_only(request)) is not None:
        return denied
    engine = request.app[ENGINE]
    raw = request.match_info["job_id"]
    behind = await _database_behind(engine)
    if behind is not None:
        return behind
    # isdigit() alone is true for '٣' and '²' too (int() refuses the latter: a 500).
    found = await engine.job_with_history(int(raw)) if raw.isascii() and raw.isdigit() and len(raw) <= 18 else None
    if found is None:
        return _error(404, "no such job")
    job, events = found
    history = [{"at": at, "from": old, "to": new, "progress": progress, "reason": reason}
               for at, old, new, progress, reason in events]
    return web.json_response({"job": {"id": job.id, "batch": job.batch, "device": str(job.device),
                                      "state": job.state, "progress": job.progress, "code": job.code,
                                      "failure": failure_of(job), "message": job.message}, "history": history})


async def _device_names(request: web.Request, required: bool) -> list[str] | None | web.Response:
    """`{"devices": [...]}` from an admin request body (absent or empty body: None)."""
    try:
        raw = await read_body_in_time(request)
        body = decode_json(raw) if raw else {}
    except TimeoutError:
        return body_too_slow(request)
    except PayloadError as exc:
        return _error(400, str(exc))
    devices = body.get("devices")
    if devices is None and not required:
        return None
    if not isinstance(devices, list) or not devices or not all(isinstance(d, str) for d in devices):
        return _error(400, 'send {"devices": ["name", ...]}')
    return devices


async def admin_batch_action(request: web.Request) -> web.Response:
    """POST .../retry (devices optional: every failed one) or .../cancel (devices required)."""
    if (denied := _admin_only(request)) is not None:
        return denied
    action = request.match_info["action"]
    devices = await _device_names(request, required=action == "cancel")
    if isinstance(devices, web.Response):
        return devices
    engine, name = request.app[ENGINE], request.match_info["name"]
    try:
        if action == "retry":
            result = {"retried": await engine.retry(name, devices)}
        else:
            result = {"canceled": await engine.cancel_devices(name, devices or [])}
    except Refused as exc:
        return _error(exc.status, exc.message)
    return web.json_response({"code": 0, "message": "", **result})


async def admin_prune(request: web.Request) -> web.Response:
    """POST /admin/api/prune {"days": N, "dry_run": bool}: remove (or count) the finished
    history of batches that left the catalog and ended over N days ago (default: the
    server's retention_days)."""
    if (denied := _admin_only(request)) is not None:
        return denied
    engine = request.app[ENGINE]
    try:
        raw = await request.read()
        body = decode_json(raw) if raw else {}
    except PayloadError as exc:
        return _error(400, f"body: {exc}")
    days = body.get("days", engine.settings.retention_days)
    dry_run = body.get("dry_run", False)
    if isinstance(days, bool) or not isinstance(days, (int, float)) or not 0 <= days <= 36500:
        return _error(400, "days must be a number of days from 0 to 36500 (the server has no retention_days)"
                      if days is None else f"days must be a number of days from 0 to 36500, got {str(days)[:40]}")
    if not isinstance(dry_run, bool):
        return _error(400, "dry_run must be true or false")
    if not dry_run and (trouble := engine.trouble()) is not None:
        return _error(503, f"nothing changed: {trouble}")
    try:
        batches = await engine.prune(days, dry_run=dry_run)
    except (sqlite3.Error, OSError, RuntimeError) as exc:  # the disk filled, the database moved
        log.warning("prune failed: %s", exc)
        return _error(503, f"prune stopped: {exc}; what it removed so far is gone for good, the rest stays; "
                           "try again once /healthz says ok")
    return web.json_response({"code": 0, "message": "", "dry_run": dry_run, "days": days, "batches": batches,
                              "jobs": sum(batches.values())})


async def admin_batch_pause(request: web.Request) -> web.Response:
    """POST .../pause or .../resume: no new jobs and no pushes until resumed (also after a
    halt by `abort`); kept across restarts and reloads."""
    if (denied := _admin_only(request)) is not None:
        return denied
    engine, name, action = request.app[ENGINE], request.match_info["name"], request.match_info["action"]
    try:
        await (engine.pause(name) if action == "pause" else engine.resume(name))
    except Refused as exc:
        return _error(exc.status, exc.message)
    return web.json_response({"code": 0, "message": "", "batch": name, "paused": action == "pause",
                              "rollout": engine.rollout_view(name)})


async def admin_devices(request: web.Request) -> web.Response:
    """GET /admin/api/devices?product=&module=&version=&online=&state=&q=&offset=&limit=: one
    page of the fleet, from memory (no database read per device)."""
    if (denied := _admin_only(request)) is not None:
        return denied
    try:
        query = parse_device_query(request.query)
    except QueryError as exc:
        return _error(400, str(exc))
    engine = request.app[ENGINE]
    return web.json_response(await engine.device_list(query))


async def admin_device(request: web.Request) -> web.Response:
    """GET /admin/api/devices/{product}/{device}?offset=&limit=: versions, tags, a page of its jobs."""
    if (denied := _admin_only(request)) is not None:
        return denied
    engine = request.app[ENGINE]
    device = DeviceId(request.match_info["product"], request.match_info["device"])
    try:  # a device upgraded weekly for years has hundreds of jobs: a page of them
        paging = parse_device_query({name: request.query[name] for name in ("offset", "limit")
                                     if name in request.query})
    except QueryError as exc:
        return _error(400, str(exc))
    behind = await _database_behind(engine)  # the jobs' history is read from the database
    if behind is not None:
        return behind
    detail = await engine.device_detail(device, paging.offset, paging.limit)
    if detail is None:
        return _error(404, f"no device {device}: it never reported a version and is not listed in the catalog")
    return web.json_response(detail)


async def admin_versions(request: web.Request) -> web.Response:
    """GET /admin/api/versions: per product and module, devices per reported version."""
    if (denied := _admin_only(request)) is not None:
        return denied
    return web.json_response(await request.app[ENGINE].version_counts())


async def admin_packages(request: web.Request) -> web.Response:
    """GET /admin/api/packages: the live catalog's packages, their hashes and statuses."""
    if (denied := _admin_only(request)) is not None:
        return denied
    return web.json_response(request.app[ENGINE].package_list())


async def admin_reload(request: web.Request) -> web.Response:
    if (denied := _admin_only(request)) is not None:
        return denied
    engine = request.app[ENGINE]
    try:
        loaded = await engine.reload()
    except Refused as exc:  # the database takes no writes: said at once, not after a hang
        log.warning("reload refused: %s", exc.message)
        return web.json_response({"code": exc.status, "message": exc.message, "errors": [exc.message]},
                                 status=exc.status)
    except ConfigError as exc:
        log.warning("reload refused: %s", exc.one_line())
        return web.json_response({"code": 400, "message": "catalog has errors; nothing changed",
                                  "errors": [str(issue) for issue in exc.issues]}, status=400)
    except Exception as exc:  # a bug, not the catalog: still one line for otactl, the details in the log
        log.exception("reload failed")
        return web.json_response({"code": 500, "message": f"reload failed, nothing changed: "
                                  f"{type(exc).__name__}: {exc}; see the server log",
                                  "errors": [f"{type(exc).__name__}: {exc}"]}, status=500)
    catalog = loaded.catalog
    log.info("catalog reloaded: %d products, %d packages, %d batches",
             len(catalog.products), len(catalog.packages), len(catalog.batches))
    return web.json_response({"code": 0, "message": "reloaded", "products": len(catalog.products),
                              "packages": len(catalog.packages), "batches": len(catalog.batches)})


def _browser_login() -> web.Response:
    return web.Response(status=401, text="log in with any user name and the admin token as password\n",
                        headers={"WWW-Authenticate": 'Basic realm="ota-server admin"'})


CONSOLE_DIR = Path(__file__).parent / "console"
CONSOLE_FILES = {"console.js": "application/javascript", "console.css": "text/css"}


async def console_page(request: web.Request) -> web.Response:
    """The web console (fileserver/console/): one page that reads the admin JSON API."""
    if not _is_admin(request, browser=True):
        return _browser_login()
    return web.FileResponse(CONSOLE_DIR / "index.html")


async def console_file(request: web.Request) -> web.StreamResponse:
    if not _is_admin(request, browser=True):
        return _browser_login()
    name = request.match_info["name"]
    if name not in CONSOLE_FILES:  # a fixed list: no path from the request reaches the disk
        return _error(404, "no such file")
    return web.FileResponse(CONSOLE_DIR / name, headers={"Content-Type": CONSOLE_FILES[name]})


async def batch_status_page(request: web.Request) -> web.Response:
    """The old batch page's address: the console's batch view."""
    if not _is_admin(request, browser=True):
        return _browser_login()
    name = request.match_info["name"]
    raise web.HTTPFound(f"/admin/#/batch/{quote(name, safe='')}")


async def _database_behind(engine: OtaEngine) -> web.Response | None:
    """None once the database shows everything decided so far (admin reads read it); a 503
    with the reason while writes fail, instead of a request that hangs until they work."""
    trouble = await engine.database_behind(ADMIN_READ_WAIT)
    if trouble is None:
        return None
    return _error(503, f"the database is behind: {trouble}; /healthz says when it recovers")


async def healthz(request: web.Request) -> web.Response:
    """200 while the database takes writes; 503 with the reason while it does not (the journal
    keeps the changes and retries) or was abandoned (data_dir deleted or replaced), and, for a
    cluster worker, while it is connected to none of the cluster's nodes."""
    trouble = request.app[ENGINE].trouble()
    cluster = request.app[BROKER].cluster
    if trouble is None and cluster is not None and not cluster().connected:
        trouble = "connected to none of the RabbitMQ nodes in cluster.amqp; it keeps trying (see its log)"
    if trouble is None:
        return web.Response(text=json.dumps({"ok": True, "status": "ok"}), content_type="application/json")
    body = {"ok": False, "status": "degraded", "reason": trouble}
    return web.Response(text=json.dumps(body), content_type="application/json", status=503)


async def metrics_page(request: web.Request) -> web.Response:
    """GET /metrics in the Prometheus text format (docs/metrics.md): the admin token as a
    Bearer token, unless broker.yaml says `metrics: {public: true}`."""
    if not request.app[ENGINE].settings.metrics_public and (denied := _admin_only(request)) is not None:
        return denied
    return web.Response(body=exposition(request.app[METRICS]), headers={"Content-Type": METRICS_CONTENT_TYPE})
