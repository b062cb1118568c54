"""Lighter sessions: no state machine and no preallocated queues per connection.

Each amqtt Session built a `transitions.Machine` (a third of an idle connection's memory,
16 KiB of 55 KiB), and each connection four `asyncio.Queue`s (each four preallocated deques
and an Event: another quarter). `Session._init_states` and the `Queue` amqtt's session and
broker handler modules use are replaced, process-wide, by SessionStates and LightQueue,
which do what amqtt uses of them. SessionStates.connect also ends the connect's turn
(edge.py) as amqtt registers the session.
"""
from __future__ import annotations

import asyncio
import collections
from typing import Generic, TypeVar

import amqtt.mqtt.protocol.broker_handler as amqtt_broker_handler
import amqtt.session as amqtt_session
from amqtt.session import Session
from transitions import MachineError

from .edge import _end_turn

T = TypeVar("T")


class SessionStates:
    """What amqtt uses of a session's `transitions` state machine (new -> connected <->
    disconnected), without building a `transitions.Machine` per session: that machine was a
    third of the memory of an idle connection (16 KiB of 55 KiB)."""

    __slots__ = ("_session", "state")

    def __init__(self, session: Session) -> None:
        self._session, self.state = session, "new"

    def connect(self) -> None:
        if self.state == "connected":
            raise MachineError("Can't trigger event connect from state connected!")
        self.state = "connected"
        self._session._on_enter_connected()
        # amqtt registers the session right after this, without yielding: the next connect
        # of this client id may look for it now.
        _end_turn(self._session)

    def disconnect(self) -> None:
        self.state = "disconnected"
        self._session._on_enter_disconnected()

    def is_new(self) -> bool:
        return self.state == "new"

    def is_connected(self) -> bool:
        return self.state == "connected"

    def is_disconnected(self) -> bool:
        return self.state == "disconnected"


class LightQueue(Generic[T]):
    """The part of asyncio.Queue that amqtt uses on a connection's queues (unbounded,
    put/get/qsize/empty and their nowait forms), allocating only once something is queued."""

    __slots__ = ("_items", "_getters")

    def __init__(self) -> None:
        self._items: collections.deque[T] | None = None
        self._getters: list[asyncio.Future[None]] | None = None

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: T) -> None:
        if self._items is None:
            self._items = collections.deque()
        self._items.append(item)
        self._wake_next()

    def _wake_next(self) -> None:
        while self._getters:
            getter = self._getters.pop(0)
            if not getter.done():
                getter.set_result(None)
                break

    async def put(self, item: T) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> T:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    async def get(self) -> T:
        while not self._items:
            getter = asyncio.get_running_loop().create_future()
            if self._getters is None:
                self._getters = []
            self._getters.append(getter)
            try:
                await getter
            except BaseException:
                if getter in self._getters:
                    self._getters.remove(getter)
                if self._items:
                    self._wake_next()  # an item this getter may have been woken for
                raise
        return self._items.popleft()


def _light_session_states(session: Session) -> None:
    session.transitions = SessionStates(session)  # type: ignore[assignment]


def patch_classes() -> None:
    """Every session gets SessionStates, every connection LightQueues (process-wide)."""
    Session._init_states = _light_session_states  # type: ignore[method-assign]
    # Four asyncio.Queues per connection (each four preallocated deques and an Event) were
    # another quarter of an idle connection's memory; these queues have one reader each.
    amqtt_session.Queue = LightQueue  # type: ignore[misc]
    amqtt_broker_handler.Queue = LightQueue  # type: ignore[misc]
