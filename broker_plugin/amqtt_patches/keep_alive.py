"""Keep-alive enforced, with one sweep a second per broker (bug 3).

amqtt never closed a silent client. MQTT allows 1.5 times the keep-alive (plus amqtt's
`timeout-disconnect-delay`); past it the connection is closed as an abnormal disconnect
(the will fires). amqtt's own per-packet read timeout (a task and a timer per packet read)
is switched off by setting the session's keep-alive to 0 once the watch has it.
"""
from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from .internals import _per_broker

log = logging.getLogger("ota.broker")
_KEEP_ALIVE = "_ota_keep_alive_watch"


class _KeepAliveWatch:
    """Closes connections that sent nothing for longer than their keep-alive allows, with one
    sweep a second over the broker's connections instead of amqtt's read timeout, which
    costs a task and a timer for every packet read."""

    SWEEP_SECONDS = 1.0

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._watched: dict[BrokerProtocolHandler, tuple[Session, int, list[float]]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, handler: BrokerProtocolHandler, session: Session, reader: Any, allowed: int) -> None:
        loop = asyncio.get_running_loop()
        last_read = [loop.time()]
        read = reader.read

        async def read_and_note(n: int = -1) -> bytes:
            data = await read(n)
            last_read[0] = loop.time()
            return data

        reader.read = read_and_note
        self._watched[handler] = (session, allowed, last_read)
        if self._timer is None:
            self._timer = loop.call_later(self.SWEEP_SECONDS, self._sweep)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for handler, (session, allowed, last_read) in list(self._watched.items()):
            state = session.transitions.state
            current = self._broker._sessions.get(session.client_id)
            if state == "disconnected" or (current is not None and current[1] is not handler):
                del self._watched[handler]  # gone, or the session lives on another connection
            elif now - last_read[0] > allowed:
                del self._watched[handler]
                if state != "connected":
                    continue  # its connect never completed: nothing to close
                log.info("client %r sent nothing for %ss; closing it (keep-alive)", session.client_id, allowed)
                # Ends the client loop as an abnormal disconnect: the will fires.
                asyncio.ensure_future(handler.handle_connection_closed())
        # A timer, not a task: nothing is left pending when the broker and its loop stop.
        self._timer = loop.call_later(self.SWEEP_SECONDS, self._sweep) if self._watched else None


def _keep_alive_watch(broker: Broker) -> _KeepAliveWatch:
    return _per_broker(broker, _KEEP_ALIVE, _KeepAliveWatch)


def _watch_keep_alive(broker: Broker, handler: BrokerProtocolHandler, session: Session, reader: Any) -> None:
    """Watch an accepted connection whose CONNECT set a keep-alive (0: none)."""
    if session.keep_alive > 0:
        # Bug (3): amqtt never closes a silent client. MQTT allows 1.5x keep-alive.
        delay = broker.config.get("timeout-disconnect-delay", 0)
        allowed = math.ceil(session.keep_alive * 1.5) + (delay if isinstance(delay, int) else 0)
        _keep_alive_watch(broker).watch(handler, session, reader, allowed)
        # 0: amqtt reads without its per-packet timeout (a task and a timer per packet).
        session.keep_alive = 0
