"""What an HTTP client can make the file server hold before it has sent a request.

A connection has `limits.header_timeout_seconds` to send complete request headers: from
its accept, and on keep-alive from the end of its previous response (seen by a sweep every
min(1 s, deadline / 4), so up to that much later). One that has not is closed (slowloris: a
socket held open, or headers sent a byte at a time). And of the connections that have not
sent a request yet, at most `limits.max_unauthenticated` are held: past that the one waiting
longest is closed, at once when a new connection comes. Many devices behind one address
are never capped, but sockets held open cannot starve everyone else. Connections between
two requests of a download are not counted: at 10,000 devices fetching in Range requests,
thousands are between requests at any moment (counting them failed 4,477 of 10,000 devices
in the fleet benchmark); they have the header deadline like any other.

aiohttp 3.14's keep-alive timer happens to close such connections too, but only at the
keep-alive timeout, and older releases (pyproject allows 3.9) leave a connection that never
sends a request open for good. A sweep over `web.Server.connections` (public) decides, with
what aiohttp keeps private read through fileserver/aiohttp_internals.py (checked once at
start): whether a connection waits for its next request, and how many it has sent.
`HttpSite` sees each connection at its accept (for the cap) and holds the TLS handshake to
the same deadline (asyncio's default is 60 s).
"""
from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .aiohttp_internals import ListenerSite, check_aiohttp, requests_parsed, waiting_for_request

log = logging.getLogger("ota.http")


class ConnectionGuard:
    """The header deadline and the cap on connections waiting for a request, for one server."""

    def __init__(self, header_timeout: float, max_waiting: int) -> None:
        check_aiohttp()
        self.header_timeout, self.max_waiting = header_timeout, max_waiting
        self.grace = min(2.0, header_timeout / 2)
        # Connections waiting for request headers -> (requests parsed then, since when);
        # oldest first. A changed count means a request came meanwhile.
        self._waiting: dict[RequestHandler, tuple[int, float]] = {}
        self._fresh: dict[RequestHandler, None] = {}  # of those, the ones with no request yet, oldest first
        self._server: web.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._timed_out = self._evicted = 0  # since the last log line
        self._logged = -math.inf

    @property
    def sweep_seconds(self) -> float:
        return min(1.0, self.header_timeout / 4)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ota-http-guard")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._waiting.clear()
        self._fresh.clear()

    def protocol_factory(self, server: web.Server) -> Callable[[], RequestHandler]:
        """What a listener calls for each accepted connection: `server`'s, watched from now."""
        self._server = server

        def accepted() -> RequestHandler:
            handler = server()
            self._waiting[handler] = (0, asyncio.get_running_loop().time())
            self._fresh[handler] = None
            if len(self._fresh) > self.max_waiting:
                self._evict_oldest()
            return handler

        return accepted

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_seconds)
            try:
                self.sweep()
            except Exception:  # keep guarding; the next sweep starts over
                log.exception("HTTP connection sweep failed")

    def sweep(self) -> None:
        """Close connections past the header deadline; track the ones now waiting."""
        if self._server is None:
            return
        now = asyncio.get_running_loop().time()
        waiting: dict[RequestHandler, tuple[int, float]] = {}
        for handler in self._server.connections:
            count = requests_parsed(handler)
            known = self._waiting.get(handler)
            if known is not None and known[0] == count:
                since = known[1]  # still the same wait
            elif waiting_for_request(handler):
                since = now  # a new wait: its previous response has finished
            else:
                continue  # busy with a request
            if now - since >= self.header_timeout and handler.transport is not None:
                self._timed_out += count == 0  # idle keep-alive ending is routine; never asking is not
                handler.force_close()
            else:
                waiting[handler] = (count, since)
        # Connections still in their TLS handshake are not in server.connections yet: asyncio
        # ends the handshake at the same deadline, and the next sweep sees them once connected.
        self._waiting = dict(sorted(waiting.items(), key=lambda entry: entry[1][1]))
        self._fresh = {handler: None for handler, (count, _) in self._waiting.items() if count == 0}
        self._evict_oldest()
        self._report(now)

    def _evict_oldest(self) -> None:
        """Close the oldest connections that never sent a request, past max_waiting of them,
        if they have had `grace` seconds to send it: under load a busy event loop reads an
        honest device's first request late, and closing it then fails a working download."""
        cutoff = asyncio.get_running_loop().time() - self.grace
        while len(self._fresh) > self.max_waiting:
            handler = next(iter(self._fresh))
            if self._waiting.get(handler, (0, cutoff))[1] > cutoff:
                return  # the oldest is recent: nobody has held a socket long yet
            del self._fresh[handler]
            self._waiting.pop(handler, None)
            # Sent a request meanwhile: it is no longer waiting. Not connected yet (the
            # moment after accept, or a TLS handshake): the next sweep counts it again.
            # Only one still waiting now: one that has started its first request (a download
            # under way counts 0 requests until it ends) is never closed from stale notes.
            if requests_parsed(handler) == 0 and handler.transport is not None and waiting_for_request(handler):
                self._evicted += 1
                handler.force_close()

    def _report(self, now: float) -> None:
        """One line a minute at most: under attack every sweep closes something."""
        if not (self._timed_out or self._evicted) or now - self._logged < 60:
            return
        self._logged = now
        if self._evicted:
            log.warning("HTTP: %d connection(s) closed, oldest first, over limits.max_unauthenticated (%d "
                        "waiting for a request), and %d that sent no request within %g s", self._evicted,
                        self.max_waiting, self._timed_out, self.header_timeout)
        else:
            log.info("HTTP: %d connection(s) closed that sent no request within %g s "
                     "(limits.header_timeout_seconds)", self._timed_out, self.header_timeout)
        self._timed_out = self._evicted = 0


GUARD = web.AppKey("connection_guard", ConnectionGuard)


class HttpSite(ListenerSite):
    """web.TCPSite whose connections the app's ConnectionGuard sees from their accept, and
    whose TLS handshake has the header deadline (TCPSite cannot pass it to asyncio)."""

    __slots__ = ()

    def __init__(self, runner: web.AppRunner, host: str, port: int, *,
                 ssl_context: object | None = None, backlog: int = 1024) -> None:
        # 1024, not aiohttp's 128: a fleet's burst of downloads (or, in a cluster, of requests
        # passed between workers and of nginx's upstream connects) overflowed 128, and a SYN
        # dropped there costs the client a 1 s retransmit or a connect timeout.
        guard = runner.app[GUARD]
        super().__init__(runner, host, port, protocol_factory=guard.protocol_factory,
                         handshake_timeout=guard.header_timeout, ssl_context=ssl_context, backlog=backlog)
