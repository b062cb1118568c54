"""Keeps the server inside its open-files limit: when descriptors run short, the MQTT and
HTTP listeners stop accepting until connections close.

Every device holds a socket, and during a download a second one; at 10,000 devices that
reaches a typical limit. Without this, accept() fails with EMFILE, asyncio logs an error
per attempt and opening files fails. With it, new connections wait in the kernel's listen
backlog (clients see a slower connect, not an error) and the log says once what happened.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import selectors
import socket
from collections.abc import Callable, Iterable
from typing import Any

from otacore.log_hygiene import Burst

log = logging.getLogger("ota.server")

CHECK_SECONDS = 0.05


def open_files_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def descriptors_in_use() -> int:
    """Exact, but costs ~2 us per open descriptor: call it rarely (at start)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64


def accept_error_filter() -> Burst:
    """asyncio logs an error with a traceback for every accept() that fails for want of
    descriptors, and retries many times a second: one line per interval is enough."""
    return Burst(("socket.accept() out of system resource",), burst=1, interval=10.0)


_ACCEPT_ERRORS = accept_error_filter()


class ConnectionBudget:
    """`connections()`: sockets the listeners have accepted and not closed; `listeners()`:
    the listening sockets to pause. Descriptors other than connections are counted once, at
    start, plus a reserve for files, the database and connections accepted between checks."""

    def __init__(self, connections: Callable[[], int], listeners: Callable[[], Iterable[socket.socket]],
                 limit: int | None = None) -> None:
        self._connections = connections
        self._listeners = listeners
        limit = limit if limit is not None else open_files_limit()
        reserve = max(128, limit // 50)  # more than one accept burst (asyncio takes up to 100)
        self.high = limit - reserve - descriptors_in_use()
        self.low = self.high - min(reserve, self.high // 2)  # resume below this
        self._known: dict[int, tuple[Any, Any]] = {}  # listening fd -> its accept callback and args
        self.paused = False
        self._warned = -60.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if _ACCEPT_ERRORS not in logging.getLogger("asyncio").filters:
            logging.getLogger("asyncio").addFilter(_ACCEPT_ERRORS)
        loop = asyncio.get_running_loop()
        if not isinstance(getattr(loop, "_selector", None), selectors.BaseSelector):
            log.debug("event loop without a selector; connection budget off")
            return
        self._task = loop.create_task(self._run(), name="ota-connection-budget")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.paused:
            loop = asyncio.get_running_loop()
            self._resume(loop, self._registered(loop))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(CHECK_SECONDS)
            try:
                self.check()
            except Exception:  # keep watching; a listener that moved is found next time
                log.exception("connection budget check failed")

    def check(self) -> None:
        used = self._connections()
        loop: Any = asyncio.get_running_loop()
        registered = self._registered(loop)
        self._known.update(registered)  # how each listener accepts, to restore it later
        if not self.paused and used >= self.high:
            self.paused = True
            # Warn once a minute at most: under a steady overload it pauses every few seconds.
            now = loop.time()
            level = logging.WARNING if now - self._warned >= 60 else logging.INFO
            self._warned = now if level == logging.WARNING else self._warned
            log.log(level, "%d connections open, near the open-files limit (%d): new connections wait until "
                    "some close; raise `ulimit -n` for a larger fleet", used, open_files_limit())
        elif self.paused and used <= self.low:
            self._resume(loop, registered)
            log.info("%d connections open: accepting new connections again", used)
        if self.paused:
            # Also when asyncio put a listener back itself (it retries accept a second after EMFILE).
            for fd in registered:
                loop.remove_reader(fd)

    def _resume(self, loop: Any, registered: dict[int, tuple[Any, Any]]) -> None:
        self.paused = False
        for fd, (callback, args) in self._known.items():
            if fd not in registered:
                with contextlib.suppress(ValueError, OSError):  # the listener closed meanwhile
                    loop.add_reader(fd, callback, *args)

    def _registered(self, loop: Any) -> dict[int, tuple[Any, Any]]:
        """The listening sockets the loop serves now, with their accept callbacks."""
        found = {}
        for listener in self._listeners():
            fd = listener.fileno()
            try:
                key = loop._selector.get_key(fd)
            except (KeyError, ValueError):
                continue  # not served now (paused, or asyncio backs off after EMFILE)
            handle = key.data[0] if key.data else None
            if handle is not None and not handle.cancelled():
                found[fd] = (handle._callback, handle._args)
        return found
