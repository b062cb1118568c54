"""The edge of the broker: connections before their CONNECT is accepted, and each device's
live connections (`_Edge`, one per broker).

amqtt holds any number of sockets that never send a CONNECT, lets connects of one client id
race (two at once both saw the same old connection and shared one Session: sockets left in
CLOSE-WAIT for good), leaks a connection's slot under `max_connections` when anything but
its own three errors is raised before CONNACK (bug 10), and lets one device's credentials
hold any number of connections. Here:
- connections without an accepted CONNECT are capped at `limits.max_unauthenticated`, the
  oldest dropped first;
- connects of one client id take turns until each is registered (`take_turn`, ended by
  `_end_turn` when the session is registered or the connect fails);
- a take-over waits for the old connection's loop to end (bug 11; `loop_ended`), which
  `_noting_connection_end` (amqtt's per-connection loop, wrapped per broker) reports;
- a device's live connections are capped at `limits.max_connections_per_device`, the
  oldest closing first (`admit`; `connections_replaced` counts them for /metrics);
- refused CONNECTs are logged in bursts on `refused_log`, and amqtt's own repeat of each
  refusal ("Failed to initialize client session") is dropped.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Any

from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from otacore.log_hygiene import Burst
from otacore.protocol.credentials import DeviceId

from .identity import session_device
from .internals import _per_broker
from .limits import limits_of
from .writes import _abort, _writer_transport

refused_log = logging.getLogger("ota.broker.refused")
refused_log.addFilter(Burst(("refused CONNECT",), burst=5, interval=10.0))
# amqtt repeats each refusal as "Failed to initialize client session"; ours is the one line.
logging.getLogger("amqtt.broker").addFilter(Burst(("Failed to initialize client session",), burst=0))
_EDGE = "_ota_edge"


class _Edge:
    """The connections not yet accepted, and the live connections of each device.

    - Connections without an accepted CONNECT are capped at `max_unauthenticated`: past
      it the oldest is dropped, so an attacker holding sockets open pushes out his own
      oldest sockets, while devices behind one NAT are never capped by address.
    - Refusals are logged in bursts with a count (a flood of refused CONNECTs is one line
      per interval, not one per attempt).
    - A device's live connections are capped at `max_connections_per_device`.
    - Connects of one client id take turns; a take-over can wait for the end of the
      connection it replaces.
    """

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._pending: collections.OrderedDict[Any, None] = collections.OrderedDict()
        # Scoped client id -> the connect of it in flight, done once registered or failed.
        self._turns: dict[str, asyncio.Future[None]] = {}
        # Connections whose amqtt loop runs -> a future for whoever waits for its end.
        self._loops: dict[BrokerProtocolHandler, asyncio.Future[None] | None] = {}
        # Each device's logged-in connections, oldest first (limits.max_connections_per_device).
        # The writer is kept because a handler has none until its CONNACK is sent.
        self._live: dict[DeviceId, dict[BrokerProtocolHandler, tuple[Session, Any]]] = {}
        self.replaced = 0  # connections closed for a newer login of their device, for /metrics

    def admit(self, session: Session, handler: BrokerProtocolHandler,
              writer: Any) -> list[tuple[Session, Any]]:
        """Count a logged-in connection against its device's cap; returns the device's
        oldest connections that must close to make room (already no longer counted).
        Synchronous, so connects of one device racing each other cannot all pass."""
        device = session_device(session)
        if device is None:
            return []
        live = self._live.setdefault(device, {})
        for known in [h for h, (_, w) in live.items() if _writer_transport(w) is None]:
            del live[known]  # closed before its loop began, so `left` never came
        live[handler] = (session, writer)
        excess = len(live) - limits_of(self._broker).max_connections_per_device
        closing = []
        for known in list(live)[:max(excess, 0)]:
            closing.append(live.pop(known))
        self.replaced += len(closing)
        return closing

    def left(self, session: Session, handler: BrokerProtocolHandler) -> None:
        """A connection's loop ended: it no longer counts for its device."""
        device = session_device(session)
        live = self._live.get(device) if device is not None else None
        if live is not None:
            live.pop(handler, None)
            if not live:
                del self._live[device]

    async def take_turn(self, session: Session) -> asyncio.Future[None]:
        """Wait until no other connect of this client id is between its take-over check and
        its registration; then hold the turn until `turn_over` (SessionStates.connect calls
        it as amqtt registers the session; failures call it too)."""
        client_id = session.client_id
        deadline = asyncio.get_running_loop().time() + limits_of(self._broker).connect_timeout
        while (turn := self._turns.get(client_id)) is not None and not turn.done():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break  # a stuck connect does not hold its client id for ever
            await asyncio.wait({turn}, timeout=left)
        turn = self._turns[client_id] = asyncio.get_running_loop().create_future()
        session.ota_turn = (self, turn)
        return turn

    def turn_over(self, client_id: str | None, turn: asyncio.Future[None]) -> None:
        """That connect of `client_id` is registered, or failed: the next one goes on."""
        if not turn.done():
            turn.set_result(None)
        if self._turns.get(client_id) is turn:  # type: ignore[arg-type]
            del self._turns[client_id]  # type: ignore[arg-type]

    def loop_started(self, handler: BrokerProtocolHandler) -> None:
        self._loops[handler] = None

    def loop_over(self, handler: BrokerProtocolHandler) -> None:
        waiter = self._loops.pop(handler, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def loop_ended(self, handler: BrokerProtocolHandler, timeout: float) -> None:
        """Until the amqtt loop of `handler`'s connection has ended (at most `timeout` s)."""
        if handler not in self._loops:
            return
        waiter = self._loops[handler]
        if waiter is None:
            waiter = self._loops[handler] = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiter), timeout)

    def live_connections(self, device: DeviceId) -> int:
        return len(self._live.get(device, ()))

    def arrived(self, writer: Any) -> None:
        self._pending[writer] = None
        limit = limits_of(self._broker).max_unauthenticated
        while len(self._pending) > limit:
            oldest, _ = self._pending.popitem(last=False)
            _abort(oldest)
            refused_log.warning("refused CONNECT: over limits.max_unauthenticated (%d) connections "
                                "not yet logged in; dropped the oldest", limit)

    def settled(self, writer: Any) -> None:
        self._pending.pop(writer, None)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def refused(self, reason: object) -> str:
        refused_log.warning("refused CONNECT: %s", reason)
        return str(reason)


def _end_turn(session: Session) -> None:
    """Let the next connect of this session's client id go on (once; see _Edge.take_turn)."""
    held = getattr(session, "ota_turn", None)
    if held is not None:
        session.ota_turn = None
        edge, turn = held
        edge.turn_over(session.client_id, turn)


def _noting_connection_end(broker: Broker) -> Any:
    """amqtt's per-connection loop, with the edge told when it ends (however it ends)."""
    handle_client_session = broker._handle_client_session
    edge = _edge(broker)

    async def handle(reader: Any, writer: Any, session: Session, handler: BrokerProtocolHandler, *args: Any) -> None:
        edge.loop_started(handler)
        try:
            await handle_client_session(reader, writer, session, handler, *args)
        except BaseException:
            _abort(writer)  # whatever amqtt raised, the socket is not left open (CLOSE-WAIT)
            raise
        finally:
            _end_turn(session)  # failed before its registration
            edge.left(session, handler)
            edge.loop_over(handler)

    return handle


def _edge(broker: Broker) -> _Edge:
    return _per_broker(broker, _EDGE, _Edge)


def connections_replaced(broker: Broker) -> int:
    """Logged-in connections closed so far because their device logged in once too many."""
    return _edge(broker).replaced


def patch_broker(broker: Broker) -> None:
    """amqtt's per-connection loop of this broker tells its edge when each loop ends."""
    broker._handle_client_session = _noting_connection_end(broker)  # type: ignore[method-assign]
