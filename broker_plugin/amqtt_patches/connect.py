"""The CONNECT path: authenticate first, then register, one connect of a client id at a time.

amqtt's `Broker._initialize_client_session` is replaced, per broker, by `_hardened_initializer`:
- bug 1: amqtt resolved (and could wipe) the stored session of a client id before
  authenticating; a CONNECT with bad credentials is now refused before anything is touched;
- bugs 2 and 11: a second CONNECT with the same client id left the first connection open;
  it is now closed, its will not published, and its loop ended before the new one goes on;
- bug 10: a failure before CONNACK closes the socket and is one of amqtt's own errors, so
  the connection's slot under `max_connections` is released;
- amqtt waited for the CONNECT for ever: it now has `limits.connect_timeout`;
- bug 6: the client id is scoped to the device (identity.py);
- the connection's keep-alive is watched (keep_alive.py), and its PUBLISH and PINGREQ go
  through upstream.py and pingresp.py.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from amqtt.broker import Broker
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from amqtt.utils import gen_client_id

from otacore.log_hygiene import Burst, clean_field
from otacore.protocol.credentials import DeviceId

from .edge import _edge
from .fixed_header import _PACKET_LIMIT
from .identity import _scope_client_id, session_device, wire_client_id
from .keep_alive import _watch_keep_alive
from .limits import BrokerLimits, limits_of
from .pingresp import _pingresp
from .session_limits import _stored_sessions
from .subscriptions import _CONNECTING
from .upstream import _consuming_publish
from .writes import _abort

log = logging.getLogger("ota.broker")
crowded_log = logging.getLogger("ota.broker.crowded")
crowded_log.addFilter(Burst(("closing the oldest connection of",), burst=5, interval=10.0))


def _hardened_initializer(broker: Broker) -> Any:
    edge = _edge(broker)

    async def initialize(reader: Any, writer: Any, remote_address: str, remote_port: int) -> tuple[Any, Session]:
        """Bug (10): amqtt releases a connection's slot under `max_connections` only for the
        three amqtt errors; anything else raised before CONNACK (a reset while it answers a
        refused CONNECT) leaked the slot for good, and a failed CONNECT left the socket open
        (CLOSE-WAIT). Every failure here closes the socket and is one of those errors."""
        edge.arrived(writer)
        # Read by the fixed-header check in this connection's tasks (they copy the context).
        _PACKET_LIMIT.set(limits_of(broker).max_packet)
        try:
            return await _accept(reader, writer, remote_address, remote_port)
        except (AMQTTError, MQTTError) as exc:
            _abort(writer)
            raise AMQTTError(edge.refused(exc)) from None
        except NoDataError:  # a port check or a client that gave up: not worth a warning
            _abort(writer)
            log.debug("a connection closed before its CONNECT")
            raise AMQTTError("the connection closed before its CONNECT") from None
        except asyncio.CancelledError:
            _abort(writer)
            raise
        except Exception as exc:  # OSError, a reset mid-CONNACK, a CONNECT amqtt cannot decode
            _abort(writer)
            raise AMQTTError(edge.refused(f"{type(exc).__name__}: {exc}")) from None
        finally:
            edge.settled(writer)

    async def _accept(reader: Any, writer: Any, remote_address: str, remote_port: int) -> tuple[Any, Session]:
        limits = limits_of(broker)
        try:
            # amqtt waits for the CONNECT forever: an idle socket would hold a descriptor for good.
            handler, session = await asyncio.wait_for(
                BrokerProtocolHandler.init_from_connect(reader, writer, broker.plugins_manager), limits.connect_timeout)
        except TimeoutError:
            raise AMQTTError(f"no CONNECT within {limits.connect_timeout:g}s") from None
        if session.clean_session and not session.client_id:
            session.client_id = gen_client_id()
        # Bug (1): amqtt resolves (and may wipe) the stored session for this client id
        # before authenticating; we refuse bad credentials before touching anything.
        if not await broker._authenticate(session, None):
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            raise AMQTTError(f"CONNECT from {remote_address}:{remote_port} (client id "
                             f"{clean_field(repr(session.client_id))}, username {clean_field(repr(session.username))}) "
                             "not authorized: unknown device, malformed username, wrong secret or a refused will")
        # Bug (6): amqtt keys sessions by client id alone, so a device with valid credentials
        # could take over, or squat, another device's client id. Inside the broker a client
        # id is scoped to the device that authenticated; the device never sees the difference.
        device = session_device(session)
        _scope_client_id(session, device)
        _CONNECTING.set(session.client_id)  # this task now handles this client's connect
        # Connects of one client id take turns until each is registered: two at once both
        # saw the same old connection, both went on, and shared one Session (sockets left
        # in CLOSE-WAIT for good, four live connections under one client id).
        turn = await edge.take_turn(session)
        try:
            return await _accepted(session, handler, reader, writer, device, limits)
        except BaseException:
            edge.turn_over(session.client_id, turn)
            raise

    async def _accepted(session: Session, handler: BrokerProtocolHandler, reader: Any, writer: Any,
                        device: DeviceId | None, limits: BrokerLimits) -> tuple[Any, Session]:
        existing = broker._sessions.get(session.client_id)
        if existing is not None and existing[0].transitions.is_connected():
            # Bug (2): a second CONNECT with the same client id must close the first.
            log.info("client id %r connected again; closing its previous connection", session.client_id)
            # Bug (11): the old connection's will was published after the new CONNECT had
            # replaced it (the new connection's "offline" went out while it was online). The
            # client is back, so no will says it left.
            existing[0].will_flag = False
            await existing[1].handle_connection_closed()
            await existing[1].stop()
            # Let the old connection's loop end first: a clean_session=0 connect goes on with
            # this same Session object, which that loop would mark disconnected (and publish
            # the will copied below) while the new connection is live. The session's state
            # alone does not say it: it turns "disconnected" before the loop has ended.
            await edge.loop_ended(existing[1], limits.connect_timeout)
        if session.clean_session:
            await broker._delete_session(session.client_id)
            session.parent = 0
        elif existing is not None:
            stored = existing[0]
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive",
                         "username", "password"):
                setattr(stored, name, getattr(session, name))
            stored.ota_turn, session.ota_turn = session.ota_turn, None  # connect() is called on it
            session, session.parent = stored, 1
        else:
            session.parent = 0
        for older_session, older_writer in edge.admit(session, handler, writer):
            # A cloned or leaked credential must not hold the listener's slots: as Aliyun
            # does for a device that connects again, its oldest connection gives way.
            crowded_log.warning("closing the oldest connection of %s (client id %s): over "
                                "limits.max_connections_per_device (%d); a leaked secret, or a device "
                                "reconnecting without closing", device,
                                clean_field(repr(wire_client_id(older_session))), limits.max_connections_per_device)
            older_session.will_flag = False  # the device is still here: no will says it left
            # Reset, and let its own loop end as for a device that lost power: stopping its
            # handler from here waits for ever on a reader task cancelled before it ran.
            _abort(older_writer)
        await _stored_sessions(broker).stored(session)
        _watch_keep_alive(broker, handler, session, reader)
        handler.handle_publish = _consuming_publish(broker, handler, session)
        handler.handle_pingreq = _pingresp(broker, handler)
        return handler, session

    return initialize


def patch_broker(broker: Broker) -> None:
    """This broker's CONNECT handling authenticates first (see the module docstring)."""
    broker._initialize_client_session = _hardened_initializer(broker)  # type: ignore[method-assign]
