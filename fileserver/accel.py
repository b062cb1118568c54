"""nginx in front of the file server (`http.accel`, docs/cluster-downloads.md): which
authorized downloads the server hands to nginx with X-Accel-Redirect, the answer that does
it, and the UDP listener for nginx's access log lines that say how many bytes each sent.

The server still decides every download (signature, open job, file unchanged, conditional
headers it answers itself); nginx only sends the bytes, with sendfile, Range and If-Range,
from an `internal` location aliasing the package folders (config/nginx/). A request nginx
would not answer exactly as the server does is served by the server, as without nginx.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import mimetypes
import os
import socket
import stat
from collections.abc import Iterator
from urllib.parse import quote

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from otacore.config.accel import AccelSettings
from otacore.downloads.handoff import HandOffs, parse_log_line
from otacore.downloads.package_files import DownloadFile
from otacore.engine import Transfer

log = logging.getLogger("ota.http")

# nginx sets it on every /files/ request it proxies, to its internal prefix: only such a
# request is handed back to it (a client reaching the server directly is served by it).
ACCEL_HEADER = "X-Ota-Accel"
# The hand-off's token, for nginx's access log line; nginx does not pass it to the client.
TRANSFER_HEADER = "X-Ota-Transfer"
# Which log_bind awaits the line: with several workers (each its own log_bind), nginx sends
# the line to the worker that made the hand-off, whichever worker nginx asked (a download is
# answered by the worker holding its device: cluster_worker/forwarding.py).
LOG_BIND_HEADER = "X-Ota-Log-Bind"
# nginx compares these with its own mtime-based tag or by other rules: the server answers them.
_SERVER_ANSWERS = ("If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since")
SWEEP_SECONDS = 60.0
RECEIVE_BUFFER = 4 * 1024 * 1024  # datagrams queued while the event loop is busy


@functools.lru_cache(maxsize=1024)
def _content_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


class AccelDownloads:
    """Hands downloads to nginx; with a log address, credits the bytes nginx reports per job."""

    def __init__(self, settings: AccelSettings, max_age: float, statuses: dict[int, int]) -> None:
        """`max_age`: seconds a hand-off waits for its log line; `statuses`: /files/ answers by
        status for /metrics, counted here from nginx's lines (the server's own 200 is not the answer)."""
        self.settings = settings
        self.handoffs = HandOffs(max_age) if settings.counts_bytes else None
        self._statuses = statuses
        self._transport: asyncio.DatagramTransport | None = None
        self._sweep: asyncio.Task[None] | None = None
        self._odd_header = False
        self._log_bind = f"unix:{settings.log_path}" if settings.log_path else f"{settings.log_host}:{settings.log_port}"

    def takes(self, request: web.Request) -> bool:
        """Does nginx send this request's bytes? A GET that came through nginx (its header
        names our prefix) and that nginx answers as the server would: no `?offset=&length=`
        (nginx reads ranges from the header only), none of the conditions nginx would decide
        by its own tag or rules, and an If-Range only as an entity tag."""
        via = request.headers.get(ACCEL_HEADER)
        if via is None or request.method != "GET":
            return False
        if via != self.settings.prefix:
            if not self._odd_header:  # said once, not per request
                self._odd_header = True
                log.warning("nginx sent %s: %.80r, but http.accel.prefix is %r; serving downloads without nginx "
                            "until its config and broker.yaml agree", ACCEL_HEADER, via, self.settings.prefix)
            return False
        headers = request.headers
        if any(name in headers for name in _SERVER_ANSWERS):
            return False
        if_range = headers.get("If-Range")
        if if_range is not None and not if_range.startswith(('"', "W/")):
            return False
        return "offset" not in request.query and "length" not in request.query

    def response(self, file: DownloadFile, transfer: Transfer, etag: str, mtime: float) -> web.Response:
        """The answer that hands `file` to nginx; the transfer starts now. `mtime`: the file's,
        as the server's own answer would date it (nginx's template repeats the ETag and
        Last-Modified sent here, instead of its own)."""
        headers = {"X-Accel-Redirect": self.settings.redirect_path(quote(str(file.path))), "ETag": etag,
                   "Cache-Control": "private, no-transform", "Content-Type": _content_type(file.name)}
        if self.handoffs is not None:
            headers[TRANSFER_HEADER] = self.handoffs.add(transfer, file.digest.size)
            headers[LOG_BIND_HEADER] = self._log_bind
        else:  # nobody will say how many bytes went: the download is activity, and no bytes
            transfer.started()
            transfer.finished(0)
        response = web.Response(status=200, headers=headers)
        response.last_modified = mtime  # aiohttp's rounding, as in a file it sends itself
        return response

    # -- nginx's access log lines ------------------------------------------------------------
    def receive(self, datagram: bytes) -> None:
        """One datagram on log_bind: a line naming a waiting hand-off credits it; anything
        else changes nothing but a count."""
        assert self.handoffs is not None
        line = parse_log_line(datagram)
        if line is None:
            self.handoffs.ignore()
        elif self.handoffs.settle(line):
            self._statuses[line.status] = self._statuses.get(line.status, 0) + 1

    async def start(self) -> None:
        if self.handoffs is None:
            return
        settings = self.settings
        loop = asyncio.get_running_loop()
        try:
            if settings.log_path is not None:
                # Only processes allowed to write the file can send lines (nginx's user: put
                # it in this server's group); a UDP port takes them from any local process.
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(os.lstat(settings.log_path).st_mode):
                        os.unlink(settings.log_path)  # a previous run's
                self._transport, _ = await loop.create_datagram_endpoint(
                    lambda: _LogLines(self), local_addr=settings.log_path, family=socket.AF_UNIX)
                os.chmod(settings.log_path, 0o660)
            else:
                self._transport, _ = await loop.create_datagram_endpoint(
                    lambda: _LogLines(self), local_addr=(settings.log_host, settings.log_port))
        except OSError as exc:
            raise OSError(f"http.accel.log_bind {settings.log_address}: cannot listen for nginx's access log "
                          f"({exc.strerror or exc})") from None
        sock = self._transport.get_extra_info("socket")
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        except OSError:
            pass  # the system's default then
        self._sweep = loop.create_task(self._sweep_forever(), name="ota-accel-sweep")
        log.info("OTA: downloads handed to nginx at %s; its access log lines on %s", settings.prefix,
                 settings.log_address)

    async def stop(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            await asyncio.gather(self._sweep, return_exceptions=True)
            self._sweep = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
            if self.settings.log_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.settings.log_path)
        if self.handoffs is not None:
            self.handoffs.close()

    async def _sweep_forever(self) -> None:
        assert self.handoffs is not None
        handoffs, ignored, warned = self.handoffs, 0, False
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            expired = handoffs.expire()
            if expired:
                log.warning("%d download(s) handed to nginx over %.0f s ago never got their access log line; "
                            "counted with 0 bytes", expired, handoffs.max_age)
            oldest = handoffs.oldest_age()
            if not warned and handoffs.settled == 0 and oldest is not None and oldest > SWEEP_SECONDS:
                warned = True
                log.warning("nginx has sent no access log line for the downloads handed to it: its access_log "
                            "syslog:server= must be %s (http.accel.log_bind)", self.settings.log_address)
            if handoffs.ignored > ignored:
                log.warning("%d datagram(s) on http.accel.log_bind named no download waiting (malformed, spoofed, "
                            "repeated or late); ignored", handoffs.ignored - ignored)
                ignored = handoffs.ignored


class _LogLines(asyncio.DatagramProtocol):
    def __init__(self, accel: AccelDownloads) -> None:
        self._accel = accel

    def datagram_received(self, data: bytes, addr: object) -> None:
        self._accel.receive(data)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors on a socket that only receives: nothing to do


class HandOffFigures(Collector):
    """GET /metrics: what became of the downloads handed to nginx (docs/metrics.md)."""

    def __init__(self, accel: AccelDownloads) -> None:
        self._accel = accel

    def collect(self) -> Iterator[Metric]:
        handoffs = self._accel.handoffs
        if handoffs is None:
            return
        done = CounterMetricFamily("ota_nginx_handoffs", "Downloads the server handed to nginx whose access log "
                                   "line came (settled) or never did (abandoned: counted with 0 bytes).",
                                   labels=["result"])
        done.add_metric(["settled"], handoffs.settled)
        done.add_metric(["abandoned"], handoffs.abandoned)
        yield done
        yield GaugeMetricFamily("ota_nginx_handoffs_waiting", "Downloads handed to nginx, waiting for their "
                                "access log line.", value=len(handoffs))
        yield CounterMetricFamily("ota_nginx_log_lines_ignored", "Datagrams on http.accel.log_bind that named no "
                                  "download waiting (malformed, spoofed, repeated or late).", value=handoffs.ignored)


ACCEL = web.AppKey("accel", AccelDownloads)


async def _start(app: web.Application) -> None:
    await app[ACCEL].start()


async def _stop(app: web.Application) -> None:
    await app[ACCEL].stop()


def install(app: web.Application, settings: AccelSettings, max_age: float, statuses: dict[int, int],
            metrics: CollectorRegistry) -> None:
    """Hand the app's downloads to nginx as `settings` say; the log listener runs with the app,
    and its figures join `metrics`."""
    app[ACCEL] = AccelDownloads(settings, max_age, statuses)
    metrics.register(HandOffFigures(app[ACCEL]))
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
