"""Any worker answers (docs/cluster.md, "Several workers"): an HTTP request that only another
worker can answer is passed to it, and its answer passed back unchanged.

- A device's HTTP API call and a signed download go to the worker holding the device's
  partition (it holds the device's jobs in memory; with nginx, the X-Accel-Redirect it
  answers comes back through here to nginx).
- Batch decisions (reload, pause, resume, prune) go to the coordinator.
- A retry or cancel goes to every worker, each acting for the devices it holds; the counts
  are summed.
- RabbitMQ's login and topic checks (`/broker-auth/`) that name a client id go to the worker
  holding the client id's partition: who owns a client id, and which of its session's
  queues are bound to its OTA topics, is known in one place.
- Everything else (status, devices, /metrics, the console) is answered here, from the whole
  fleet as PostgreSQL holds it.

A request passed on carries FORWARDED, and is answered where it arrives, never passed again.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from fileserver.app import body_too_slow, read_body_in_time
from otacore.errors import Refused
from otacore.protocol.credentials import DeviceId

if TYPE_CHECKING:
    from otacore.engine import OtaEngine

    from .fleet_share import FleetShare

log = logging.getLogger("ota.cluster")

FORWARDED = "X-Ota-Forwarded"
AUTH_PREFIX = "/broker-auth/"
DEVICE_API = ("/base-api/api/v1/get_ota_info", "/base-api/api/v1/write_ota_info")
TO_COORDINATOR = re.compile(r"^/admin/api/(reload|prune|batches/[^/]+/(pause|resume))$")
TO_EVERY_WORKER = re.compile(r"^/admin/api/batches/[^/]+/(retry|cancel)$")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}
# sock_connect, not connect: `connect` also counts the wait for a pooled connection, which a
# burst of downloads makes long without anything being wrong. 10 s: a dead worker on this
# host refuses at once, one on a dead host stops heartbeating and its partitions move in
# seconds; a live one whose backlog is full answers after the kernel's SYN retries (1 s, 3 s).
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
# Under the workers' own HTTP keep-alive (15 s, otaserver/runtime.py): this side lets an idle
# connection go first, so a request seldom meets one the other side has just closed.
KEEPALIVE = 10.0
MAX_CONNECTIONS = 2000  # to all the other workers together (aiohttp's default, 100, queues a fleet's downloads)


def basic_user_device(request: web.Request) -> DeviceId | None:
    """The device an HTTP Basic user `{deviceName}&{productKey}` names (not checked: the
    worker holding it checks the secret)."""
    header = request.headers.get("Authorization", "")
    if not header.lower().startswith("basic "):
        return None
    try:
        user = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").split(":", 1)[0]
    except (ValueError, UnicodeDecodeError):
        return None
    name, _, product = user.partition("&")
    return DeviceId(product, name) if name and product else None


def _moving() -> web.Response:
    return web.json_response({"code": 503, "message": "the worker serving this is moving; try again in a few "
                                                      "seconds"}, status=503, headers={"Retry-After": "2"})


class Forwarding:
    def __init__(self, share: "FleetShare", engine: "OtaEngine") -> None:
        self._share = share
        self._engine = engine
        self._session: aiohttp.ClientSession | None = None
        self.forwarded = 0
        self.unreachable = 0

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=TIMEOUT, auto_decompress=False,
                                                  connector=aiohttp.TCPConnector(
                                                      limit=MAX_CONNECTIONS, keepalive_timeout=KEEPALIVE))
        return self._session

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        path = request.path
        device_call = path in DEVICE_API or path.startswith("/files/")
        if FORWARDED in request.headers:
            if device_call:  # passed here as the device's holder: still so? (its partition may have moved)
                device = basic_user_device(request) if path in DEVICE_API else self._url_device(request)
                if device is not None and not self._share.holds(device):
                    return _moving()
            return await handler(request)
        route: Callable[[], str | None]  # where the request goes now (None: here)
        if device_call:
            device = basic_user_device(request) if path in DEVICE_API else self._url_device(request)
            route = (lambda: self._share.holder_url(device)) if device is not None else (lambda: None)
        elif path.startswith(AUTH_PREFIX):
            client_id = await self._client_id(request)
            route = (lambda: self._share.client_holder_url(client_id)) if client_id else (lambda: None)
        elif request.method == "POST" and TO_COORDINATOR.match(path):
            route = self._share.coordinator_url
        elif request.method == "POST" and TO_EVERY_WORKER.match(path):
            return await self._everywhere(request, handler)
        else:
            return await handler(request)
        try:
            target = route()
            if target is None:
                return await handler(request)
            answer = await self._pass(request, target)
            if answer is None:
                # The worker named did not answer: it may be gone and its partitions taken
                # already, which this worker's routes (read every half second) may not show
                # yet. Read them now and try once more where they point.
                await self._share.refresh_routes()
                again = route()
                if again is None:
                    return await handler(request)
                if again != target:
                    answer = await self._pass(request, again)
        except Refused as exc:
            log.info("cluster: %s answered %d: %s", path, exc.status, exc.message)
            return web.json_response({"code": exc.status, "message": exc.message}, status=exc.status,
                                     headers={"Retry-After": "2"})
        return _moving() if answer is None else answer

    async def _client_id(self, request: web.Request) -> str | None:
        fields: dict[str, object] = dict(request.query)
        if request.method == "POST" and request.content_type == "application/x-www-form-urlencoded":
            try:
                async with asyncio.timeout(self._engine.settings.header_timeout_seconds):
                    fields.update(await request.post())
            except (ValueError, TimeoutError, web.HTTPException):
                return None
        value = fields.get("client_id", fields.get("variable_map.client_id"))
        return value if isinstance(value, str) and value else None

    @staticmethod
    async def _body(request: web.Request) -> bytes | web.Response:
        """The body, within the header deadline, or the 408 the worker itself would answer."""
        try:
            return await read_body_in_time(request)
        except TimeoutError:
            return body_too_slow(request)

    def _url_device(self, request: web.Request) -> DeviceId | None:
        try:
            return self._engine.url_device(request.raw_path.split("?", 1)[0], dict(request.query))
        except Exception:  # noqa: BLE001  (forged or expired: answered here, as refused)
            return None

    async def _pass(self, request: web.Request, target: str) -> web.StreamResponse | None:
        """The target's answer passed back; None if it did not answer at all (nothing was sent)."""
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers[FORWARDED] = "1"
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        self.forwarded += 1
        response: web.StreamResponse | None = None
        for attempt in (1, 2):
            try:
                async with self._client().request(request.method, target + request.raw_path, headers=headers,
                                                  data=body or None, allow_redirects=False) as answer:
                    response = web.StreamResponse(status=answer.status, reason=answer.reason)
                    for key, value in answer.headers.items():
                        if key.lower() not in HOP_BY_HOP:
                            response.headers.add(key, value)
                    if answer.content_length is not None:
                        response.content_length = answer.content_length
                    try:
                        await response.prepare(request)
                        async for chunk in answer.content.iter_chunked(256 * 1024):
                            await response.write(chunk)
                        await response.write_eof()
                    except ConnectionResetError:
                        if request.transport is None or request.transport.is_closing():
                            return response  # the client left: aiohttp drops the rest quietly
                        raise
                    return response
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # A pooled connection the other worker closed as this one reused it (its
                # keep-alive ran out): once more, on a new connection. Every request passed
                # on may be asked twice (device API, downloads, auth checks, admin actions
                # that end in the same state).
                if response is not None and response.prepared:
                    raise  # its answer had begun: the client sees the connection end
                if attempt == 2:
                    return self._unreachable(request, target, exc)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                if response is not None and response.prepared:
                    raise
                return self._unreachable(request, target, exc)
        raise AssertionError("unreachable")

    def _unreachable(self, request: web.Request, target: str, exc: BaseException) -> None:
        self.unreachable += 1
        log.info("cluster: worker %s did not answer %s (%r); its partitions move within seconds", target,
                 request.path, exc)

    async def _everywhere(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Each worker acts for the devices it holds; the answer sums their counts."""
        others = self._share.other_worker_urls()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers[FORWARDED] = "1"
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body

        async def ask(url: str) -> dict[str, object]:
            async with self._client().post(url + request.raw_path, headers=headers, data=body or None) as answer:
                data = await answer.json(content_type=None)
                if answer.status != 200:
                    raise Refused(answer.status, str(data.get("message", answer.reason)))
                return data

        local = await handler(request)
        if local.status != 200 or not isinstance(local, web.Response) or local.body is None:
            return local
        summed = json.loads(local.body)
        try:
            for data in await asyncio.gather(*(ask(url) for url in others)):
                for key in ("retried", "canceled"):
                    if key in data:
                        summed[key] = summed.get(key, 0) + int(data[key])  # type: ignore[call-overload]
        except Refused as exc:
            log.info("cluster: %s answered %d: %s", request.path, exc.status, exc.message)
            return web.json_response({"code": exc.status, "message": f"done on some workers only: {exc.message}"},
                                     status=exc.status)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            return web.json_response({"code": 503, "message": f"done on some workers only: a worker did not answer "
                                                              f"({exc!r}); run it again"}, status=503)
        return web.json_response(summed)
