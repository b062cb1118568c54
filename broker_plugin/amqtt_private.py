"""Every use of amqtt 0.12 internals, in one place, each checked by tests/test_amqtt_private.py.

- `broker_of`: the Broker behind a plugin context (to find sibling plugins and sessions).
- `harden`: defends against amqtt bugs: a CONNECT with a wrong password wiping the real
  client's session, a second CONNECT with the same client id leaving the first connection
  open, keep-alive never enforced, no deadline for the CONNECT, and retained messages of
  every filter on the broker sent past the ACL on connect. It also removes per-connection
  and per-packet costs (a state machine and four queues per session, a walk of the whole
  filter table per connect and per deleted session, a task and timer per packet read).
- `harden` also holds clients to MQTT 3.1.1 where amqtt reads on: a malformed CONNECT, fixed
  header or PUBLISH closes the connection (CONNACK 1 first for MQTT 5 or 3.1, 2 for a client
  id not UTF-8), and a QoS 1/2 message nobody acknowledges ends without an ERROR.
- `set_upstream_consumer`: hands the device OTA topics to the OTA plugin from the packet
  path, synchronously, before the PUBACK: a report acknowledged is a report counted, in the
  order the device sent it (amqtt's own hook runs later, as a detached task).
- `SessionDelivery`: publishes straight to one device's session, instead of
  `broadcast_message`, whose cost grows with every subscription filter on the broker. It
  writes at once, and registers a QoS 1 publish's PUBACK waiter before the PUBLISH is
  written (amqtt registers it after, so a fast device's PUBACK arrived first: "Received
  PUBACK for unknown pending message Id" and a 5 s timeout).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import amqtt.mqtt.protocol.broker_handler as amqtt_broker_handler
import amqtt.session as amqtt_session
from amqtt.adapters import BufferReader
from amqtt.broker import Broker, BrokerError
from amqtt.codecs_amqtt import read_or_raise
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import IDENTIFIER_REJECTED, NOT_AUTHORIZED, UNACCEPTABLE_PROTOCOL_VERSION, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.packet import (CONNECT, DISCONNECT, PINGREQ, PUBACK, PUBCOMP, PUBREC, PUBREL, SUBSCRIBE, UNSUBSCRIBE,
                               MQTTFixedHeader)
from amqtt.mqtt.pingresp import PingRespPacket
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket, PublishVariableHeader
from amqtt.session import Session
from amqtt.utils import gen_client_id
from transitions import MachineError

from otacore.protocol.credentials import DeviceId, parse_username
from otacore.log_hygiene import Burst, clean_field
from otacore.protocol.topics import filters_matching, is_ota_topic

log = logging.getLogger("ota.broker")
refused_log = logging.getLogger("ota.broker.refused")
refused_log.addFilter(Burst(("refused CONNECT",), burst=5, interval=10.0))
crowded_log = logging.getLogger("ota.broker.crowded")
crowded_log.addFilter(Burst(("closing the oldest connection of",), burst=5, interval=10.0))
# amqtt repeats each refusal as "Failed to initialize client session"; ours is the one line.
logging.getLogger("amqtt.broker").addFilter(Burst(("Failed to initialize client session",), burst=0))
_HARDENED = "_ota_hardened"
_CONSUMER = "_ota_upstream_consumer"
_KEEP_ALIVE = "_ota_keep_alive_watch"
_LIMITS = "_ota_limits"
_EDGE = "_ota_edge"
MAX_UNACKED = 64  # QoS 1 pushes per connection whose PUBACK we still match
MAX_SESSIONS_PER_DEVICE = 8  # client ids a device's stored sessions may use; the oldest offline go first


@dataclass(frozen=True)
class BrokerLimits:
    """What one client can make the broker hold (broker.yaml `limits.*`, see otacore.config.settings)."""

    connect_timeout: float = 10.0  # seconds from accepting a connection to its CONNECT
    max_unauthenticated: int = 1000  # connections without an accepted CONNECT; the oldest is dropped past it
    max_connections_per_device: int = 4  # live connections of one device's credentials; the oldest closes past it
    max_subscriptions: int = 100  # filters per device, over all its client ids
    max_retained_bytes: int = 64 * 1024  # retained topic+payload bytes per device
    session_expiry_seconds: float = 86400.0  # a disconnected clean_session=0 session is kept this long
    max_unsent: int = 1024 * 1024  # bytes unsent to a connection before it counts as not reading
    max_packet: int = 256 * 1024  # largest packet a client may send


def set_limits(broker: Broker, limits: BrokerLimits) -> None:
    setattr(broker, _LIMITS, limits)
    # amqtt's own session monitor (once a second) drops disconnected sessions this old.
    broker.config.session_expiry_interval = int(limits.session_expiry_seconds)


def limits_of(broker: Broker) -> BrokerLimits:
    return getattr(broker, _LIMITS, None) or BrokerLimits()


def set_tls_contexts(broker: Broker, make: Callable[[dict[str, Any]], Any]) -> None:
    """Listeners with `ssl: on` get their context from `make(listener)` (broker_plugin/tls.py)
    instead of amqtt's default server context, whose TLS 1.2 suites no RSA-only device
    stack shares. A missing or unreadable file stays amqtt's BrokerError, which says so."""
    def create(listener: Any) -> Any:
        try:
            return make(listener)
        except KeyError as exc:
            raise BrokerError(f"listener 'ssl: on' needs certfile and keyfile: {exc} is missing") from exc
        except (OSError, ValueError) as exc:
            raise BrokerError(f"cannot use the listener's certfile {listener.get('certfile')!r} or keyfile "
                              f"{listener.get('keyfile')!r}: {exc}") from exc
    broker._create_ssl_context = create  # type: ignore[method-assign]
_SUBSCRIPTION_REFUSED = 0x80  # SUBACK return code
T = TypeVar("T")

# Called with (session, topic, payload) for each QoS 0/1 PUBLISH before it is acknowledged:
# False when the message is not the consumer's (amqtt routes it); True when it consumed it;
# or an awaitable when it consumed it and the PUBACK must wait for it (a promise being written).
UpstreamConsumer = Callable[[Session, str, bytes], "bool | Awaitable[Any]"]


def set_upstream_consumer(broker: Broker, consumer: UpstreamConsumer | None) -> None:
    setattr(broker, _CONSUMER, consumer)


class AmqttInternalsChanged(RuntimeError):
    """amqtt moved a private detail we rely on; pin amqtt to 0.12.x or update this module."""


def broker_of(context: Any) -> Broker:
    broker = getattr(context, "_broker_instance", None)
    if not isinstance(broker, Broker):
        raise AmqttInternalsChanged("BrokerContext._broker_instance is gone; this amqtt is not 0.12.x")
    return broker


def check_internals(broker: Broker) -> None:
    """Fail loudly at start, not quietly under load, when amqtt's internals moved."""
    # plugins_manager is not set yet while plugins are built; it is looked up at call time.
    needed = ("_servers", "_sessions", "_subscriptions", "_retained_messages", "_authenticate", "_delete_session",
              "add_subscription", "_del_subscription", "_del_all_subscriptions",
              "_initialize_client_session", "_handle_client_session", "_publish_retained_messages_for_subscription",
              "_matches",
              "_topic_filtering", "_get_handler", "config", "retain_message", "_create_ssl_context")
    missing = [name for name in needed if not hasattr(broker, name)]
    session_hooks = ("_init_states", "_on_enter_connected", "_on_enter_disconnected")
    if not all(hasattr(Session, name) for name in session_hooks):
        raise AmqttInternalsChanged(f"amqtt Session lacks one of {session_hooks}; pin amqtt to 0.12.x")
    if missing or not all(hasattr(BrokerProtocolHandler, name) for name in (
            "init_from_connect", "handle_read_timeout", "handle_publish", "mqtt_publish")) \
            or not hasattr(Session, "next_packet_id"):
        raise AmqttInternalsChanged(f"amqtt Broker lacks {missing or 'handler hooks'}; pin amqtt to 0.12.x")


def mqtt_connections(broker: Broker) -> int:
    """Connections the broker's listeners hold now."""
    return sum(getattr(server, "conn_count", 0) for server in broker._servers.values())


def connections_replaced(broker: Broker) -> int:
    """Logged-in connections closed so far because their device logged in once too many."""
    return _edge(broker).replaced


def mqtt_listening_sockets(broker: Broker) -> list[Any]:
    return [sock for server in broker._servers.values()
            for sock in (getattr(getattr(server, "instance", None), "sockets", None) or ())]


def wire_client_id(session: Session) -> str | None:
    """The client id as the device sent it (inside the broker it is scoped to the device)."""
    return getattr(session, "ota_wire_client_id", session.client_id)


def session_device(session: Session | None) -> DeviceId | None:
    """The device a connected session authenticated as (its username is `{dn}&{pk}`)."""
    return parse_username(session.username) if session is not None else None


def harden(broker: Broker) -> None:
    """Replace the broker's CONNECT handling with one that authenticates first (idempotent)."""
    if getattr(broker, _HARDENED, False):
        return
    check_internals(broker)
    broker._initialize_client_session = _hardened_initializer(broker)  # type: ignore[method-assign]
    broker._handle_client_session = _noting_connection_end(broker)  # type: ignore[method-assign]
    broker._publish_retained_messages_for_subscription = _retained_for_own_filters(broker)  # type: ignore[method-assign]
    broker.retain_message = _bounded_retain(broker)  # type: ignore[method-assign]
    # amqtt logs `repr(self._subscriptions)` on every SUBSCRIBE, at any log level: with a
    # fleet that is every session's repr, per subscribe. Same dict, cheap repr, and an
    # index of the filters each client holds (see _SubscriptionTable).
    Session._init_states = _light_session_states  # type: ignore[method-assign]
    BrokerProtocolHandler.start = _start_with_waiter_first  # type: ignore[method-assign]
    # Four asyncio.Queues per connection (each four preallocated deques and an Event) were
    # another quarter of an idle connection's memory; these queues have one reader each.
    amqtt_session.Queue = LightQueue  # type: ignore[misc]
    amqtt_broker_handler.Queue = LightQueue  # type: ignore[misc]
    # amqtt reads a whole packet (up to 256 MB) into memory before anyone may refuse it, and
    # reads on where MQTT 3.1.1 closes (bugs 13 and 17): one check of every fixed header.
    MQTTFixedHeader.from_stream = _checked_fixed_header(MQTTFixedHeader.from_stream)  # type: ignore[method-assign]
    PublishVariableHeader.from_stream = _fatal_when_malformed(PublishVariableHeader.from_stream)  # type: ignore[method-assign]
    # Bugs (18)-(19): amqtt errs where nothing is wrong.
    BrokerProtocolHandler.init_from_connect = _conforming_connect(BrokerProtocolHandler.init_from_connect)  # type: ignore[method-assign]
    BrokerProtocolHandler.mqtt_publish = _quiet_when_unacknowledged(BrokerProtocolHandler.mqtt_publish)  # type: ignore[method-assign]
    table = _SubscriptionTable(broker._subscriptions)
    broker._subscriptions = table
    broker.add_subscription = _indexed_add_subscription(broker, table)  # type: ignore[method-assign]
    broker._del_all_subscriptions = _indexed_del_all_subscriptions(broker, table)  # type: ignore[method-assign]
    broker._del_subscription = _indexed_del_subscription(broker, table)  # type: ignore[method-assign]
    setattr(broker, _HARDENED, True)


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
        session.ota_wire_client_id = session.client_id  # as sent: signed passwords cover it
        if device is not None:
            session.client_id = f"{device.product_key}/{device.device_name}/{session.client_id}"
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
        await edge.stored(session)
        if session.keep_alive > 0:
            # Bug (3): amqtt never closes a silent client. MQTT allows 1.5x keep-alive.
            delay = broker.config.get("timeout-disconnect-delay", 0)
            allowed = math.ceil(session.keep_alive * 1.5) + (delay if isinstance(delay, int) else 0)
            _keep_alive_watch(broker).watch(handler, session, reader, allowed)
            # 0: amqtt reads without its per-packet timeout (a task and a timer per packet).
            session.keep_alive = 0
        handler.handle_publish = _consuming_publish(broker, handler, session)
        handler.handle_pingreq = _pingresp(broker, handler)
        return handler, session

    return initialize


def _abort(writer: Any) -> None:
    """Close a connection at once (RST): nothing more is owed to a client refused or gone."""
    transport = getattr(getattr(writer, "_writer", None), "transport", None)
    if transport is not None and not transport.is_closing():
        transport.abort()


class _Edge:
    """The connections not yet accepted, and the stored sessions of each device.

    - Connections without an accepted CONNECT are capped at `max_unauthenticated`: past
      it the oldest is dropped, so an attacker holding sockets open pushes out his own
      oldest sockets, while devices behind one NAT are never capped by address.
    - Refusals are logged in bursts with a count (a flood of refused CONNECTs is one line
      per interval, not one per attempt).
    - A device's stored sessions are capped: clean_session=0 with a new client id per
      connect (Aliyun's ids carry a timestamp) otherwise stores a session per connect.
    """

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._pending: collections.OrderedDict[Any, None] = collections.OrderedDict()
        # Scoped client id -> the connect of it in flight, done once registered or failed.
        self._turns: dict[str, asyncio.Future[None]] = {}
        # Connections whose amqtt loop runs -> a future for whoever waits for its end.
        self._loops: dict[BrokerProtocolHandler, asyncio.Future[None] | None] = {}
        # Plain dicts keep insertion order at a third of an OrderedDict's size (one per device).
        self._client_ids: dict[DeviceId, dict[str, None]] = {}
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

    async def stored(self, session: Session) -> None:
        """Note the session a device now uses; drop its oldest offline sessions past the cap."""
        device = session_device(session)
        if device is None or session.client_id is None:
            return
        ids = self._client_ids.setdefault(device, {})
        ids.pop(session.client_id, None)
        ids[session.client_id] = None
        if len(ids) <= MAX_SESSIONS_PER_DEVICE:
            return
        for client_id in list(ids):
            entry = self._broker._sessions.get(client_id)
            if entry is None:
                del ids[client_id]  # expired or cleaned already
            elif client_id != session.client_id and not entry[0].transitions.is_connected():
                del ids[client_id]
                await self._broker._delete_session(client_id)
            if len(ids) <= MAX_SESSIONS_PER_DEVICE:
                return


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


def _per_broker(broker: Broker, attribute: str, make: Callable[[Broker], T]) -> T:
    """The one `make(broker)` kept on this broker (made on first use)."""
    value = getattr(broker, attribute, None)
    if value is None:
        value = make(broker)
        setattr(broker, attribute, value)
    return value


def _edge(broker: Broker) -> _Edge:
    return _per_broker(broker, _EDGE, _Edge)


async def _start_with_waiter_first(self: BrokerProtocolHandler) -> None:
    """Bug (16): amqtt started the reader, then made the disconnect waiter; a client that
    closed right after its CONNECT (before reading the CONNACK) ended the reader first, the
    waiter was made afterwards and never resolved: a "connected" session and its socket
    held for good (with keep-alive 0), 900 of them and the listeners stopped."""
    if self._disconnect_waiter is None or self._disconnect_waiter.done():
        self._disconnect_waiter = asyncio.get_running_loop().create_future()
    await super(BrokerProtocolHandler, self).start()


class PacketTooLarge(Exception):
    """A client announced a packet over limits.max_packet_kb: its connection is closed."""


_PACKET_LIMIT: contextvars.ContextVar[int] = contextvars.ContextVar("ota_max_packet", default=256 * 1024)


class MalformedPacket(Exception):
    """A packet that breaks the protocol: its connection is closed (MQTT 3.1.1, 4.8)."""


def _fatal_when_malformed(from_stream: Any) -> Any:
    """amqtt discards a PUBLISH whose topic has a wildcard or is not UTF-8 and reads on from
    the middle of it: the connection went silent, answering nothing, for as long as the
    client held it. Such a packet now ends the connection."""
    if getattr(from_stream, "_ota_fatal", False):
        return from_stream

    async def checked(cls: Any, reader: Any, fixed_header: Any) -> Any:
        try:
            return await from_stream.__func__(cls, reader, fixed_header)
        except (MQTTError, UnicodeDecodeError, ValueError) as exc:
            raise MalformedPacket(f"malformed PUBLISH: {exc}") from None

    checked._ota_fatal = True  # type: ignore[attr-defined]
    return classmethod(checked)


def _pingresp(broker: Broker, handler: BrokerProtocolHandler) -> Any:
    """amqtt answers PINGREQ in a task that awaits the write: a client that pings and resets
    left an unretrieved task exception (an ERROR with a traceback) per ping."""
    async def handle_pingreq(_packet: Any) -> None:
        _write(handler, PingRespPacket.build().to_bytes(), limits_of(broker).max_unsent)

    return handle_pingreq


# What MQTT 3.1.1 fixes in the fixed header of each packet a client sends (2.2.2, 3.x.1): its
# name, its reserved flags and, for some, its remaining length. PUBLISH's flags are its own.
_CLIENT_PACKETS: dict[int, tuple[str, int, int | None]] = {
    CONNECT: ("CONNECT", 0b0000, None), PUBACK: ("PUBACK", 0b0000, 2), PUBREC: ("PUBREC", 0b0000, 2),
    PUBREL: ("PUBREL", 0b0010, 2), PUBCOMP: ("PUBCOMP", 0b0000, 2), SUBSCRIBE: ("SUBSCRIBE", 0b0010, None),
    UNSUBSCRIBE: ("UNSUBSCRIBE", 0b0010, None), PINGREQ: ("PINGREQ", 0b0000, 0), DISCONNECT: ("DISCONNECT", 0b0000, 0),
}


def _fixed_header_problem(header: MQTTFixedHeader) -> str | None:
    """Why this fixed header breaks MQTT 3.1.1 (the connection must close), or None."""
    rule = _CLIENT_PACKETS.get(header.packet_type)
    if rule is None:
        return None
    name, flags, length = rule
    if header.flags != flags:
        return f"malformed {name}: fixed-header flags {header.flags:#06b}, MQTT 3.1.1 requires {flags:#06b}"
    if length is not None and header.remaining_length != length:
        return f"malformed {name}: remaining length {header.remaining_length}, MQTT 3.1.1 requires {length}"
    return None


def _checked_fixed_header(from_stream: Any) -> Any:
    """Every fixed header a client sends, checked before its packet is read:
    - bug (13): a PUBLISH of 250 MB was read whole into memory (six connections of one
      device: 1.5 GB). A length over limits.max_packet_kb closes the connection.
    - bug (17): amqtt ignores the reserved flags of a packet and, for PINGREQ, DISCONNECT and
      the acknowledgements, its length: a SUBSCRIBE with flags 0 was answered, a PINGREQ with
      a payload answered and its payload read as the next packet, a DISCONNECT with one
      taken as a clean goodbye. MQTT 3.1.1 closes the connection (the will is published).
    One wrapper, so one coroutine frame per packet; marked, since harden() runs per broker."""
    if getattr(from_stream, "_ota_checked", False):
        return from_stream

    async def checked(cls: Any, reader: Any) -> Any:
        header = await from_stream.__func__(cls, reader)
        if header is None:
            return header
        limit = _PACKET_LIMIT.get()
        if header.remaining_length > limit:
            raise PacketTooLarge(f"a packet of {header.remaining_length} bytes is over limits.max_packet_kb "
                                 f"({limit // 1024} KiB); closing the connection")
        problem = _fixed_header_problem(header)
        if problem is not None:
            raise MalformedPacket(problem)
        return header

    checked._ota_checked = True  # type: ignore[attr-defined]
    return classmethod(checked)


class _Truncated(Exception):
    """A CONNECT shorter than its own fields say."""


class _Fields:
    """Reads a CONNECT's fields from its bytes, as MQTT 3.1.1 lays them out."""

    def __init__(self, data: bytes) -> None:
        self._data, self._at = data, 0

    def take(self, size: int) -> bytes:
        if self._at + size > len(self._data):
            raise _Truncated
        self._at += size
        return self._data[self._at - size:self._at]

    def field(self) -> bytes:
        """A two-byte length and that many bytes (a string or binary data)."""
        return self.take(int.from_bytes(self.take(2), "big"))

    @property
    def left(self) -> int:
        return len(self._data) - self._at


def _bad_string(raw: bytes) -> bool:
    """Not an MQTT UTF-8 string: undecodable (surrogates and overlong forms too) or with U+0000."""
    try:
        return "\0" in raw.decode("utf-8")
    except UnicodeDecodeError:
        return True


def _connect_problem(body: bytes) -> tuple[int | None, str] | None:
    """Why MQTT 3.1.1 refuses a CONNECT (its bytes after the fixed header): the CONNACK code to
    answer before closing (None: close without one) and the reason; None when it may go on."""
    fields = _Fields(body)
    try:
        name = fields.field()
        if name not in (b"MQTT", b"MQIsdp"):  # MQTT-3.1.2-1: may close without a CONNACK
            return None, f"protocol name {clean_field(repr(name))} is not MQTT"
        level = fields.take(1)[0]
        if name != b"MQTT" or level != 4:  # MQTT 3.1 ("MQIsdp", 3) and MQTT 5 are not spoken
            return UNACCEPTABLE_PROTOCOL_VERSION, (f"protocol level {level} ({name.decode()}): only MQTT 3.1.1 "
                                                   "(level 4) is spoken; answered CONNACK 1")
        flags = fields.take(1)[0]
        fields.take(2)  # keep-alive
        will = bool(flags & 0x04)
        if not will and flags & 0x38:  # MQTT-3.1.2-13, -15
            return None, "will QoS or will retain set without the will flag"
        if _bad_string(fields.field()):  # MQTT-1.5.3-1, -2; MQTT-3.1.3-9 answers CONNACK 2
            return IDENTIFIER_REJECTED, "client id is not UTF-8 or holds U+0000; answered CONNACK 2"
        if will:
            if _bad_string(fields.field()):
                return None, "will topic is not UTF-8 or holds U+0000"
            fields.field()  # will message
        if flags & 0x80 and _bad_string(fields.field()):
            return None, "username is not UTF-8 or holds U+0000"
        if flags & 0x40:
            fields.field()  # password
    except _Truncated:
        return None, "malformed CONNECT: shorter than its fields say"
    if fields.left:
        return None, f"malformed CONNECT: {fields.left} bytes after its last field"
    return None


def _conforming_connect(init_from_connect: Any) -> Any:
    """Bug (18): amqtt parses a CONNECT field by field, not by its length, and takes what it
    finds: an MQTT 5 CONNECT (its properties read as the client id's length) waited for bytes
    that never came and was closed at the connect deadline without the CONNACK 1 MQTT 3.1.1
    asks for; a client id with U+0000 or not UTF-8 was accepted (as the text "b'\\xff'"), and
    so were will QoS and retain bits without a will. The whole CONNECT is read first (within
    limits.max_packet_kb) and checked; amqtt then parses that copy. A refusal raises MQTTError,
    so the hardened initializer closes the socket and logs it with the other refused CONNECTs."""
    if getattr(init_from_connect, "_ota_conforming", False):
        return init_from_connect
    parse = init_from_connect.__func__

    @functools.wraps(parse)
    async def init(cls: Any, reader: Any, writer: Any, plugins_manager: Any, loop: Any = None) -> Any:
        header = await MQTTFixedHeader.from_stream(reader)
        if header is None:
            raise NoDataError("the connection closed before its CONNECT")
        peer = writer.get_peer_info() or ("?", 0)
        if header.packet_type != CONNECT:  # MQTT-3.1.0-1
            raise MQTTError(f"first packet from {peer[0]}:{peer[1]} is of type {header.packet_type}, not a CONNECT")
        body = await read_or_raise(reader, header.remaining_length) if header.remaining_length else b""
        refusal = _connect_problem(body)
        if refusal is not None:
            code, reason = refusal
            if code is not None:
                await ConnackPacket.build(0, code).to_stream(writer)
            raise MQTTError(f"CONNECT from {peer[0]}:{peer[1]}: {reason}")
        return await parse(cls, BufferReader(header.to_bytes() + body), writer, plugins_manager, loop)

    init._ota_conforming = True  # type: ignore[attr-defined]
    return classmethod(init)


def _quiet_when_unacknowledged(mqtt_publish: Any) -> Any:
    """Bug (19): a QoS 1 or 2 message amqtt publishes itself (a will, a broadcast, a retained
    message) to a subscriber that never acknowledges it raised TimeoutError in its task after
    5 s, or CancelledError when the connection closed first; each was logged as an ERROR with
    a traceback, at the next broadcast or at shutdown. Nothing resends it (MQTT 3.1.1 resends
    only on reconnect), so a delivery that ends unacknowledged ends quietly; a connection
    already gone is not written to and waited on for 5 s."""
    if getattr(mqtt_publish, "_ota_quiet", False):
        return mqtt_publish

    @functools.wraps(mqtt_publish)
    async def publish(self: BrokerProtocolHandler, topic: str, data: bytes | bytearray, qos: int | None,
                      retain: bool, ack_timeout: int | None = None) -> Any:
        if qos in (1, 2) and _connection_gone(self):
            log.debug("client %r is gone; QoS %s message on %r not sent", _client_of(self), qos, topic)
            return None
        try:
            return await mqtt_publish(self, topic, data, qos, retain, ack_timeout)
        except TimeoutError:
            if ack_timeout is not None:  # a caller that set its own deadline wants to know
                raise
            log.debug("client %r did not acknowledge a QoS %s message on %r", _client_of(self), qos, topic)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this task was cancelled, not just amqtt's waiter for the acknowledgement
            log.debug("client %r left before acknowledging a QoS %s message on %r", _client_of(self), qos, topic)
        return None

    publish._ota_quiet = True  # type: ignore[attr-defined]
    return publish


def _client_of(handler: BrokerProtocolHandler) -> str | None:
    return handler.session.client_id if handler.session is not None else None


def _connection_gone(handler: BrokerProtocolHandler) -> bool:
    writer = handler.writer
    if writer is None or getattr(writer, "is_closed", False):
        return True
    transport = getattr(getattr(writer, "_writer", None), "transport", None)
    return transport is not None and transport.is_closing()


def _consuming_publish(broker: Broker, handler: BrokerProtocolHandler, session: Session) -> Any:
    """The handler's PUBLISH entry, offering each message to the upstream consumer first.
    amqtt starts one task per packet in arrival order and this runs before its first await,
    so the consumer sees a device's messages in order, and before their PUBACK is sent."""
    routed = handler.handle_publish

    async def handle_publish(packet: PublishPacket) -> None:
        consumer: UpstreamConsumer | None = getattr(broker, _CONSUMER, None)
        topic, data, qos = packet.topic_name, packet.data, packet.qos
        problem = _publish_problem(topic, qos, session)
        if problem is not None:
            # Bug (15): amqtt raised in a task per such packet (an ERROR and a traceback
            # each: 190 MB of log in 10 s), or left the connection open and silent.
            log.info("client %r: %s; closing the connection", session.client_id, problem)
            _abort(handler.writer)
            return
        consumed = consumer is not None and topic is not None and data is not None \
            and consumer(session, topic, bytes(data))
        if consumed is False:
            await routed(packet)
            return
        if consumed is not True:
            await consumed  # e.g. a final state on its way to disk: acknowledged once kept
        if qos == 2:
            # amqtt's PUBREC/PUBREL/PUBCOMP exchange; the message it then hands the broker is
            # an upstream OTA topic, which the ACL keeps from everyone.
            await routed(packet)
        elif qos == 1 and packet.variable_header is not None:
            _write(handler, PubackPacket.build(packet.variable_header.packet_id).to_bytes(),
                   limits_of(broker).max_unsent)

    return handle_publish


MAX_QOS2_IN_FLIGHT = 64  # QoS 2 PUBLISHes of one connection waiting for their PUBREL


def _publish_problem(topic: str | None, qos: int | None, session: Session) -> str | None:
    """Why a PUBLISH breaks the protocol (MQTT 3.1.1 closes the connection for each)."""
    if qos not in (0, 1, 2):
        return f"PUBLISH with QoS {qos}"
    if not topic or "+" in topic or "#" in topic or "\0" in topic:
        return f"PUBLISH to an invalid topic name {topic!r}"
    if qos == 2 and len(session.inflight_in) >= MAX_QOS2_IN_FLIGHT:
        return f"over {MAX_QOS2_IN_FLIGHT} QoS 2 PUBLISHes without their PUBREL"
    return None


def _transport(handler: BrokerProtocolHandler) -> asyncio.WriteTransport | None:
    return _writer_transport(handler.writer)


def _writer_transport(writer: Any) -> asyncio.WriteTransport | None:
    """The transport of an amqtt writer adapter, or None once it is closed or closing."""
    stream = getattr(writer, "_writer", None) if writer is not None and not writer.is_closed else None
    transport = getattr(stream, "transport", None)
    return None if transport is None or transport.is_closing() else transport


def _write(handler: BrokerProtocolHandler, data: bytes, max_unsent: int) -> bool:
    """Write one packet's bytes now; False when the connection is gone.

    One write of the whole packet, so it never interleaves with another; no task, lock or
    drain per message. A device that stops reading gets `max_unsent` bytes buffered for it
    and is then disconnected: otherwise each push, PUBACK or block for it would wait in memory.
    """
    transport = _transport(handler)
    if transport is None:
        return False
    if transport.get_write_buffer_size() > max_unsent:
        session = handler.session
        log.warning("client %r does not read what it is sent (%d bytes waiting); disconnecting it",
                    session.client_id if session else None, transport.get_write_buffer_size())
        transport.abort()  # the reader sees the connection end; the will fires
        return False
    transport.write(data)
    return True


def _expect_puback(handler: BrokerProtocolHandler, session: Session) -> int:
    """A packet id for a QoS 1 PUBLISH, with a waiter amqtt's PUBACK handling will find
    (registered before the PUBLISH is written: see the module docstring). The server does
    not resend, so nobody awaits it; it is dropped when the PUBACK comes, or as the oldest
    of too many that never came."""
    packet_id = session.next_packet_id
    waiters = handler._puback_waiters
    waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    waiter.add_done_callback(lambda done: waiters.get(packet_id) is done and waiters.pop(packet_id))
    waiters[packet_id] = waiter
    while len(waiters) > MAX_UNACKED:
        waiters.pop(next(iter(waiters))).cancel()
    return packet_id


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


# The client id whose CONNECT the current task is handling (set by the hardened initializer).
_CONNECTING: contextvars.ContextVar[str | None] = contextvars.ContextVar("ota_connecting_client", default=None)


class _SubscriptionTable(dict):
    """amqtt's filter -> [(session, qos)] table, plus the filters each client id holds.

    amqtt walks every filter on the broker for each connect (offering retained messages)
    and for each session it deletes: O(fleet) per device, so at 10,000 devices (30,000
    filters) connects and reconnects cost milliseconds each. With the index, deleting a
    session visits only its own filters, and inside a connecting client's task iterating
    the table yields only that client's filters (the only ones whose retained messages it
    may get; see _retained_for_own_filters). `keys()`/`items()` still see every filter.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.held: dict[str, set[str]] = {}
        self.per_device: dict[DeviceId, int] = {}  # filters held, over the device's client ids
        self._device_of: dict[str, DeviceId | None] = {}

    def hold(self, client_id: str, topic_filter: str, device: DeviceId | None) -> None:
        filters = self.held.setdefault(client_id, set())
        if topic_filter not in filters:
            filters.add(topic_filter)
            self._device_of[client_id] = device
            if device is not None:
                self.per_device[device] = self.per_device.get(device, 0) + 1

    def release(self, client_id: str, topic_filter: str | None = None) -> list[str]:
        """Forget one filter of the client (or all of them); returns the filters forgotten."""
        filters = self.held.get(client_id)
        if filters is None:
            return []
        if topic_filter is None:
            gone = list(filters)
            del self.held[client_id]
        elif topic_filter in filters:
            filters.discard(topic_filter)
            gone = [topic_filter]
        else:
            return []
        device = self._device_of.get(client_id)
        if device is not None:
            left = self.per_device.get(device, 0) - len(gone)
            if left > 0:
                self.per_device[device] = left
            else:
                self.per_device.pop(device, None)
        if client_id not in self.held or not filters:
            self.held.pop(client_id, None)
            self._device_of.pop(client_id, None)
        return gone

    def __iter__(self) -> Any:
        client_id = _CONNECTING.get()
        if client_id is None:
            return super().__iter__()
        return iter([topic_filter for topic_filter in self.held.get(client_id, ()) if topic_filter in self])

    def items(self) -> Any:
        """A copy: amqtt's broadcast awaits (the ACL) while it iterates, and a client that
        subscribes or leaves meanwhile made it raise "dictionary changed size during
        iteration", dropping the message for the subscribers not reached yet (bug 14)."""
        return list(super().items())

    def clear(self) -> None:
        super().clear()
        self.held.clear()
        self.per_device.clear()
        self._device_of.clear()

    def __repr__(self) -> str:
        return f"<{len(self)} subscription filters>"


def _indexed_add_subscription(broker: Broker, table: _SubscriptionTable) -> Any:
    """Also caps the filters of one device (over all its client ids) at max_subscriptions:
    100,000 filters from one device made every later connect of every device slow."""
    add = broker.add_subscription

    async def add_subscription(subscription: tuple[str, int], session: Session) -> int:
        held = table.held.get(session.client_id or "", ())
        device = session_device(session)
        if subscription[0] not in held and device is not None:
            limit = limits_of(broker).max_subscriptions
            if table.per_device.get(device, 0) >= limit:
                log.info("SUBSCRIBE refused: %s: %r is over limits.max_subscriptions (%d)", device, subscription[0],
                         limit)
                return _SUBSCRIPTION_REFUSED
        qos = await add(subscription, session)
        if qos != _SUBSCRIPTION_REFUSED and session.client_id is not None:
            table.hold(session.client_id, subscription[0], device)
        return qos

    return add_subscription


def _indexed_del_subscription(broker: Broker, table: _SubscriptionTable) -> Any:
    """amqtt's UNSUBSCRIBE leaves an empty list under the filter for good; drop it, and the
    filter from the client's index."""
    delete = broker._del_subscription

    def del_subscription(topic_filter: str, session: Session) -> int:
        deleted = delete(topic_filter, session)
        if table.get(topic_filter, True) == []:
            del table[topic_filter]
        table.release(session.client_id or "", topic_filter)
        return deleted

    return del_subscription


def _indexed_del_all_subscriptions(broker: Broker, table: _SubscriptionTable) -> Any:
    async def del_all_subscriptions(session: Session) -> None:
        for topic_filter in table.release(session.client_id or ""):
            broker._del_subscription(topic_filter, session)

    return del_all_subscriptions


def _retained_for_own_filters(broker: Broker) -> Any:
    """Retained messages for a filter the session itself holds, allowed by the ACL.

    amqtt calls this on connect for every filter on the broker (with anyone's filters) and
    after each SUBSCRIBE; skipping filters the session does not hold closes the leak and
    makes a connect O(filters) dictionary lookups instead of O(filters x retained) matches.
    """
    async def publish_retained(subscription: tuple[str, int], session: Session) -> None:
        if not broker._retained_messages:
            return
        topic_filter = subscription[0]
        held = [qos for holder, qos in broker._subscriptions.get(topic_filter, ()) if holder.client_id == session.client_id]
        handler = broker._get_handler(session)
        if not held or handler is None:
            return
        for topic, retained in list(broker._retained_messages.items()):
            if broker._matches(topic, topic_filter) and \
                    await broker._topic_filtering(session, topic=topic, action=Action.RECEIVE):
                qos = min(held[0], retained.qos if retained.qos is not None else held[0])
                await handler.mqtt_publish(retained.topic, retained.data, qos, retain=True)

    return publish_retained


def _bounded_retain(broker: Broker) -> Any:
    """Retained messages from devices, bounded: never on an OTA topic (a retained fake push
    would be replayed to every later subscriber, a retained report would be stale), and at
    most max_retained_bytes (topic + payload) per device. amqtt kept any number of any size,
    for good, after the device left; a cleared topic also stayed as an empty entry."""
    retain = broker.retain_message
    sizes: dict[str, tuple[DeviceId, int]] = {}  # retained topic -> (device, bytes)
    per_device: dict[DeviceId, int] = {}

    def forget(topic: str) -> None:
        owner = sizes.pop(topic, None)
        if owner is not None:
            left = per_device.get(owner[0], 0) - owner[1]
            if left > 0:
                per_device[owner[0]] = left
            else:
                per_device.pop(owner[0], None)

    async def retain_message(source: Session | None, topic: str | None, data: Any, qos: int | None = None) -> None:
        device = session_device(source)
        if device is None or topic is None:  # the broker's own messages
            await retain(source, topic, data, qos)
            return
        if is_ota_topic(topic):
            log.info("retained message of %s on OTA topic %r not kept (OTA topics are never retained)", device, topic)
            return
        if not data:
            forget(topic)
            broker._retained_messages.pop(topic, None)
            return
        size = len(topic) + len(data)
        limit = limits_of(broker).max_retained_bytes
        held = per_device.get(device, 0) - (sizes[topic][1] if topic in sizes else 0)
        if held + size > limit:
            log.info("retained message of %s on %r not kept: over limits.max_retained_kb (%d bytes)",
                     device, topic, limit)
            return
        forget(topic)
        sizes[topic] = (device, size)
        per_device[device] = held + size
        await retain(source, topic, data, qos)

    return retain_message


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


class SessionDelivery:
    """Publishes the server's OTA messages straight to one device's live session."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        # Client ids each device connected with, latest last: a second connection with the
        # same credentials (a debugging mosquitto_sub) must not steal the device's messages.
        self._client_ids: dict[DeviceId, dict[str, None]] = {}

    def remember(self, device: DeviceId, client_id: str) -> None:
        """Call once a connection of `device` was accepted."""
        ids = self._client_ids.setdefault(device, {})
        ids.pop(client_id, None)
        ids[client_id] = None
        while len(ids) > 8:
            del ids[next(iter(ids))]

    def live_session(self, device: DeviceId) -> tuple[Session, Any] | None:
        """The device's most recent connection that is still up."""
        ids = self._client_ids.get(device, {})
        for client_id in reversed(list(ids)):
            entry = self.broker._sessions.get(client_id)
            if entry is None:
                del ids[client_id]
            elif entry[0].transitions.state == "connected" and session_device(entry[0]) == device:
                return entry
        return None

    def subscribed_qos(self, session: Session, device: DeviceId, topic: str) -> int | None:
        best = None
        subscriptions = self.broker._subscriptions
        for topic_filter in filters_matching(device, topic):
            for subscriber, qos in subscriptions.get(topic_filter, ()):
                if subscriber.client_id == session.client_id:
                    best = qos if best is None else max(best, qos)
        return best

    def is_online(self, device: DeviceId) -> bool:
        return self.live_session(device) is not None

    def online_devices(self) -> int:
        """Devices with at least one connected session now: a walk over the session table,
        for a metrics scrape, not for hot paths."""
        return len({device for session, _ in list(self.broker._sessions.values())
                    if session.transitions.state == "connected" and (device := session_device(session)) is not None})

    def send(self, device: DeviceId, topic: str, payload: bytes, qos: int) -> bool:
        """Publish one of the device's downstream OTA topics to its live session; False when
        it is not connected. Aliyun's broker subscribes every device to these topics itself,
        and SDKs such as linkkit rely on it (they never SUBSCRIBE to them): so without a
        subscription we deliver at `qos`, with one at the lower of the two."""
        entry = self.live_session(device)
        if entry is None:
            return False
        session, handler = entry
        sub_qos = self.subscribed_qos(session, device, topic)
        if sub_qos is not None:
            qos = min(qos, sub_qos)
        packet_id = _expect_puback(handler, session) if qos >= 1 else None
        return _write(handler, PublishPacket.build(topic, payload, packet_id, False, min(qos, 1), False).to_bytes(),
                      limits_of(self.broker).max_unsent)

    def drop_sessions(self, keep: Callable[[Session], bool]) -> int:
        """Disconnect every connected session that `keep` rejects; returns how many."""
        dropped = 0
        for session, handler in list(self.broker._sessions.values()):
            if session.transitions.state == "connected" and not keep(session):
                asyncio.ensure_future(handler.handle_connection_closed())
                dropped += 1
        return dropped

