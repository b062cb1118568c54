"""Every use of aiohttp private internals by the file server, in one place.

Checked against aiohttp 3.14.5 (what the tests run); pyproject allows aiohttp>=3.9. Where a
detail is missing the server does not break silently: PackageResponse falls back to
FileResponse's public path (DIRECT_FILE_SEND is False; tests/test_downloads.py fails on it),
and ConnectionGuard refuses to start (`check_aiohttp`). What is touched, and why:

- `web_fileresponse._FileResponseResult.SEND_FILE`, `FileResponse._make_response`,
  `FileResponse._prepare_open_file(request, fobj, st, file_encoding)` and the parameters of
  `FileResponse.__init__` (`path`, `chunk_size`): probed once (DIRECT_FILE_SEND).
  PackageResponse sends a package from the handle the server keeps open
  (fileserver/app.py OpenPackageFiles) through `_prepare_open_file`, without FileResponse's
  thread-pool hops and open() per request: at thousands of Range requests a second the
  hops were a fifth of the server's CPU, and a descriptor per transfer runs a large fleet
  out of them.
- `FileResponse._path` and `FileResponse._chunk_size`: set directly instead of calling
  FileResponse.__init__, which only parses the path into a Path again (a tenth of the CPU
  of a Range request).
- `FileResponse._sendfile(request, fobj, offset, count)`: overridden to offer the range to
  one non-blocking sendfile(2) first (half the cost of a 64 KiB Range request was the
  loop's sendfile registering and unregistering a writer).
- `RequestHandler._waiter` (pending while a connection waits for its next request) and
  `RequestHandler._request_count` (requests parsed on it): read by ConnectionGuard's sweep
  (fileserver/connection_guard.py) for the header deadline and the cap on connections that
  never sent a request; aiohttp has no public way to tell a connection waiting for a
  request from one busy with one.
- `BaseSite._runner`, `_ssl_context`, `_backlog` and `_server`: ListenerSite is TCPSite with
  a protocol factory of its own (ConnectionGuard sees each connection at its accept) and a
  TLS handshake deadline, neither of which TCPSite can pass to asyncio; `_server` is where
  BaseSite.stop and AppRunner.addresses look for the listener, and where
  `http_listening_sockets` finds its sockets.
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import mimetypes
import os
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web, web_fileresponse
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict

if TYPE_CHECKING:
    from otacore.downloads.package_files import DownloadFile
    from otacore.engine import Transfer

    from .app import PackageHandle

# -- FileResponse: packages sent from a shared handle --------------------------------------

_SEND_FILE = getattr(getattr(web_fileresponse, "_FileResponseResult", None), "SEND_FILE", None)
DIRECT_FILE_SEND = _SEND_FILE is not None and all(
    hasattr(web.FileResponse, name) for name in ("_make_response", "_prepare_open_file")) \
    and list(inspect.signature(web.FileResponse.__init__).parameters)[:3] == ["self", "path", "chunk_size"]


@functools.lru_cache(maxsize=1024)
def _content_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def plain_headers(request: web.Request, drop: str = "") -> CIMultiDict[str]:
    """The request's headers with anything not ASCII escaped, for request.clone(): clone()
    encodes them again and fails on the undecodable bytes aiohttp let through (a 500). The
    ones FileResponse reads are ASCII when valid; escaped, garbage stays garbage."""
    return CIMultiDict((name, value if value.isascii() else value.encode("ascii", "backslashreplace").decode())
                       for name, value in request.headers.items() if name.lower() != drop.lower())


class PackageResponse(web.FileResponse):
    """A FileResponse whose ETag is the file's SHA-256 (strong), not aiohttp's mtime-size tag,
    that answers the request as rewritten by `download` and reports the transfer of a
    device's job (started, and the bytes sent when it completed)."""

    def __init__(self, file: DownloadFile, opened: "PackageHandle", etag: str,
                 rewritten: web.Request, transfer: Transfer | None,
                 headers: dict[str, str]) -> None:
        """`opened`: the shared handle of `file`, leased for this answer (OpenPackageFiles.get)."""
        path = file.path
        self._opened = opened
        # Given back once: after the answer, or when the response is dropped unsent (a
        # client gone before aiohttp prepared it), so a retired handle always closes.
        self._release = weakref.finalize(self, opened.release)
        headers = {"Content-Type": _content_type(path.name), **headers}  # guessed once per name
        if DIRECT_FILE_SEND:
            # FileResponse.__init__ only parses `path` into a Path again (a tenth of the CPU of
            # a Range request); it is one already.
            web.StreamResponse.__init__(self, headers=headers)
            self._path, self._chunk_size = path, 256 * 1024
        else:
            super().__init__(path, headers=headers)
        self.package_etag = etag
        self._rewritten, self._transfer = rewritten, transfer

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        try:
            if self._transfer is None or request.method != "GET":
                return await self._send(self._rewritten)
            sent = 0
            self._transfer.started()
            try:
                writer = await self._send(self._rewritten)  # the body is sent here
                if self.status in (200, 206):
                    sent = self.content_length or 0
                return writer
            finally:
                self._transfer.finished(sent)
        finally:
            self._release()

    async def _send(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        """FileResponse.prepare without its thread-pool hops and without an open() per request:
        a plain (Range) GET over plain TCP is sent with sendfile from the package's shared
        handle (OpenPackageFiles). At thousands of Range requests a second the hops were a
        fifth of the server's CPU, and a descriptor per transfer runs a large fleet out of
        them. Anything else (TLS, If-Modified-Since, aiohttp's internals moved) goes through
        FileResponse's own path."""
        transport = request.transport
        if not DIRECT_FILE_SEND or transport is None or transport.get_extra_info("sslcontext") is not None \
                or "If-Modified-Since" in request.headers or "If-Unmodified-Since" in request.headers:
            if "Accept-Encoding" in request.headers:
                # FileResponse would serve a sibling `NAME.gz`/`.br` file instead, with
                # Content-Encoding, under this package's hash: other bytes than were pushed.
                request = request.clone(headers=plain_headers(request, drop="Accept-Encoding"))
            return await super().prepare(request)
        return await self._prepare_open_file(request, self._opened.file, self._opened.stat, None)

    async def _sendfile(self, request: web.BaseRequest, fobj: Any, offset: int, count: int) -> AbstractStreamWriter:
        """FileResponse._sendfile, first offering the range to one non-blocking sendfile(2) over
        plain TCP: on a fast link it all goes at once. Only the rest goes through the loop's
        sendfile, which pauses reading and registers a writer each time (four epoll changes
        and several futures per request: half the cost of a 64 KiB Range request)."""
        writer = await web.StreamResponse.prepare(self, request)  # the headers, written now
        assert writer is not None
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("connection lost")
        sock = transport.get_extra_info("socket")
        if sock is not None and transport.get_extra_info("sslcontext") is None \
                and transport.get_write_buffer_size() == 0 and not self.compression:
            try:
                sent = os.sendfile(sock.fileno(), fobj.fileno(), offset, count)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:  # the peer went away
                raise ConnectionResetError(str(exc)) from exc
            offset, count = offset + sent, count - sent
        if count > 0:
            await asyncio.get_running_loop().sendfile(transport, fobj, offset, count)
        await web.StreamResponse.write_eof(self)
        return writer


# -- RequestHandler: is a connection waiting for a request? -----------------------------------

_PRIVATE = ("_waiter", "_request_count")


def check_aiohttp() -> None:
    """Fail at start, not silently, if aiohttp no longer has what the sweep reads."""
    slots = {name for cls in RequestHandler.__mro__ for name in getattr(cls, "__slots__", ())}
    missing = [name for name in _PRIVATE if name not in slots]
    if missing or not callable(getattr(RequestHandler, "force_close", None)):
        lacking = ", ".join(missing) or "force_close"
        raise RuntimeError(f"aiohttp {aiohttp.__version__}: RequestHandler has no {lacking}, which "
                           "fileserver/connection_guard.py reads to enforce limits.header_timeout_seconds; "
                           "install an aiohttp release it knows or update fileserver/aiohttp_internals.py")


def waiting_for_request(handler: RequestHandler) -> bool:
    """Is this connection between requests, waiting for the next one's headers?"""
    waiter = handler._waiter
    return waiter is not None and not waiter.done()


def requests_parsed(handler: RequestHandler) -> int:
    """Requests parsed on this connection so far (a download under way counts once it ends)."""
    return handler._request_count


# -- BaseSite: a listener with our protocol factory and handshake deadline ---------------------

class ListenerSite(web.BaseSite):
    """web.TCPSite whose connections come from `protocol_factory(server)` (called at start
    with the runner's web.Server) and whose TLS handshake has `handshake_timeout` seconds
    (TCPSite can pass neither to asyncio; its default handshake timeout is 60 s)."""

    __slots__ = ("_host", "_port", "_protocol_factory", "_handshake_timeout")

    def __init__(self, runner: web.AppRunner, host: str, port: int, *,
                 protocol_factory: Callable[[web.Server], Callable[[], RequestHandler]], handshake_timeout: float,
                 ssl_context: object | None = None, backlog: int = 128) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)  # type: ignore[arg-type]
        self._host, self._port = host, port
        self._protocol_factory, self._handshake_timeout = protocol_factory, handshake_timeout

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()  # registers the site with its runner
        server = self._runner.server
        assert server is not None  # runner.setup() made it
        tls = self._ssl_context is not None
        # `_server`: where BaseSite.stop and runner.addresses look for the listener.
        self._server = await asyncio.get_running_loop().create_server(
            self._protocol_factory(server), self._host, self._port, ssl=self._ssl_context,
            backlog=self._backlog, ssl_handshake_timeout=self._handshake_timeout if tls else None)


def http_listening_sockets(runner: web.AppRunner) -> list[Any]:
    """The listening sockets of the runner's sites (each site's private `_server`)."""
    return [sock for site in runner.sites for sock in (getattr(getattr(site, "_server", None), "sockets", None) or ())]
