"""Keeps the server inside its open-files limit: when descriptors run short, the MQTT and
HTTP listeners stop accepting until connections close.

Every device holds a socket, and during a download a second one; at 10,000 devices that
reaches a typical limit. Without this, accept() fails with EMFILE, asyncio logs an error
per attempt and opening files fails. With it, new connections wait in the kernel's listen
backlog (clients see a slower connect, not an error) and the log says once what happened.
"""
from __future__ import annotations

import asyncio
import logging
import os
import resource
import selectors
import socket
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("ota.server")

CHECK_SECONDS = 0.1


def open_files_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def descriptors_in_use() -> int:
    """Exact, but costs ~2 us per open descriptor: call it rarely (at start)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64


class ConnectionBudget:
    """`connections()`: sockets the listeners have accepted and not closed; `listeners()`:
    the listening sockets to pause. Descriptors other than connections are counted once, at
    start, plus a reserve for files, the database and connections accepted between checks."""

    def __init__(self, connections: Callable[[], int], listeners: Callable[[], Iterable[socket.socket]],
                 limit: int | None = None) -> None:
        self._connections = connections
        self._listeners = listeners
        limit = limit if limit is not None else open_files_limit()
        reserve = max(64, limit // 50)
        self.high = limit - reserve - descriptors_in_use()
        self.low = self.high - reserve
        self._paused: dict[int, tuple[Any, Any]] = {}  # listening fd -> its accept callback and args
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
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
        self._resume()

    @property
    def paused(self) -> bool:
        return bool(self._paused)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(CHECK_SECONDS)
            try:
                self.check()
            except Exception:  # keep watching; a listener that moved is found next time
                log.exception("connection budget check failed")

    def check(self) -> None:
        used = self._connections()
        if not self._paused and used >= self.high:
            self._pause()
            log.warning("%d connections open, near the open-files limit (%d): new connections wait until "
                        "some close; raise `ulimit -n` for a larger fleet", used, open_files_limit())
        elif self._paused and used <= self.low:
            self._resume()
            log.info("%d connections open: accepting new connections again", used)

    def _pause(self) -> None:
        loop: Any = asyncio.get_running_loop()
        for listener in self._listeners():
            fd = listener.fileno()
            try:
                key = loop._selector.get_key(fd)
            except (KeyError, ValueError):
                continue  # not being served (or already paused by asyncio itself)
            handle = key.data[0] if key.data else None
            if handle is not None and fd not in self._paused:
                self._paused[fd] = (handle._callback, handle._args)  # remove_reader clears them
                loop.remove_reader(fd)

    def _resume(self) -> None:
        if not self._paused:
            return
        loop = asyncio.get_event_loop()
        for fd, (callback, args) in self._paused.items():
            try:
                loop.add_reader(fd, callback, *args)
            except (ValueError, OSError):
                continue  # the listener closed meanwhile
        self._paused.clear()
