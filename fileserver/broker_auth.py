"""Device login and topic ACL for a RabbitMQ cluster, in `rabbitmq_auth_backend_http`'s format
(docs/cluster.md): RabbitMQ asks `POST /broker-auth/{user,vhost,resource,topic}` with form
fields and reads `allow` or `deny` back. The rules are the embedded broker's (otacore/protocol/
access.py), with one difference: the worker consumes the upstream OTA topics from the broker
like any subscriber, so a device may publish its own.

- user: an MQTT login (RabbitMQ sends the client id) by a device of the live catalog, with an
  Aliyun signed password or, where allowed, its plain secret. AMQP logins by devices (no
  client id) are refused: devices speak MQTT. A product key or device name holding `.` or
  `:` is refused (otacore/protocol/routing_keys.py says why). A client id belongs to the
  first device that logs in with it, until that device has not used it for 30 days (or the
  worker restarts): RabbitMQ hands a client id's session (its subscriptions, its queued
  pushes) to whoever logs in with it, so another device's login on it is refused.
- vhost: the devices' vhost only (`cluster.vhost`).
- resource: what RabbitMQ's MQTT plugin does for a device: publish to and bind from
  `amq.topic`, and its own `mqtt-subscription-*` queues; nothing else (not the worker's).
- topic: the device's own topics, never a downstream OTA topic.

EMQX's HTTP authenticator and authorizer ask the same questions in JSON: `POST
/broker-auth/emqx/authn` (username, password, client_id) and `/broker-auth/emqx/authz`
(username, client_id, topic with `/`, action publish|subscribe), answered `{"result": ...}`.

These endpoints answer a password oracle's questions and bind a session's queue, so nginx
does not pass them on (config/nginx), and with `cluster.auth_token` they live under
`/broker-auth/{token}/`, which only RabbitMQ's configuration knows.
"""
from __future__ import annotations

import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from aiohttp import web

from otacore.engine import OtaEngine
from otacore.protocol.access import Access, device_may
from otacore.protocol.credentials import DeviceId, parse_username
from otacore.protocol.routing_keys import name_fits, topic_of

log = logging.getLogger("ota.mqtt")  # one line per refused login: burst-limited (log_hygiene)

PREFIX = "/broker-auth"
MQTT_QUEUE_PREFIX = "mqtt-subscription-"  # RabbitMQ 3.10's MQTT plugin names each client's queues so
DEVICE_EXCHANGE = "amq.topic"
MAX_FIELD = 1024  # any field longer than this is no device's
MAX_CLIENT_IDS = 1_000_000  # client ids remembered with their device; the least recently used go first
CLIENT_ID_HELD_SECONDS = 30 * 86400  # a client id unused this long may go to another device


class ClientIds:
    """Which device each client id belongs to: the first to log in with it, for as long as it
    keeps using it (and `ttl` seconds after)."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.time) -> None:
        self._ttl = ttl
        self._clock = clock
        self._owners: OrderedDict[str, tuple[DeviceId, float]] = OrderedDict()

    def claim(self, client_id: str, device: DeviceId) -> bool:
        """May `device` log in with `client_id`? If so it is its own from now on."""
        now = self._clock()
        held = self._owners.get(client_id)
        if held is not None and held[0] != device and now - held[1] < self._ttl:
            return False
        self.take(client_id, device)
        return True

    def take(self, client_id: str, device: DeviceId) -> None:
        """`device` owns `client_id` (the shared database said so)."""
        self._owners[client_id] = (device, self._clock())
        self._owners.move_to_end(client_id)
        if len(self._owners) > MAX_CLIENT_IDS:
            self._owners.popitem(last=False)

    def owner(self, client_id: str) -> DeviceId | None:
        held = self._owners.get(client_id)
        return held[0] if held is not None else None


class BrokerAuth:
    def __init__(self, engine: OtaEngine, vhost: str, logged_in: Callable[[DeviceId, str], None],
                 subscribed: Callable[[DeviceId, str, str], None] = lambda device, client_id, topic: None,
                 token: str | None = None) -> None:
        self._engine = engine
        self._vhost = vhost
        self._token = token
        self.client_ids = ClientIds(CLIENT_ID_HELD_SECONDS)
        # Several workers: who owns a client id is kept in the shared database (a partition
        # moving must not forget it); (client id, device) -> may it log in with it.
        self.shared_claim: Callable[[str, DeviceId], Awaitable[bool]] | None = None
        self._logged_in = logged_in  # (device, client id): present now
        self._subscribed = subscribed  # (device, client id, filter): its session has a queue now
        self.answers: dict[tuple[str, str], int] = {}  # (check, allow|deny) -> count, for /metrics

    def add_routes(self, app: web.Application) -> None:
        base = PREFIX if self._token is None else PREFIX + "/{token}"
        for check, handler in (("user", self.user), ("vhost", self.vhost), ("resource", self.resource),
                               ("topic", self.topic)):
            app.router.add_route("POST", f"{base}/{check}", self._answering(check, handler))
            app.router.add_route("GET", f"{base}/{check}", self._answering(check, handler))
        app.router.add_post(f"{base}/emqx/authn", self._emqx("emqx_authn", self.emqx_authn))
        app.router.add_post(f"{base}/emqx/authz", self._emqx("emqx_authz", self.emqx_authz))

    def _known_caller(self, request: web.Request) -> bool:
        return self._token is None or hmac.compare_digest(request.match_info.get("token", ""), self._token)
    def _answering(self, check: str, decide: Callable[[dict[str, str]], bool]):  # type: ignore[no-untyped-def]
        async def handler(request: web.Request) -> web.Response:
            if not self._known_caller(request):
                raise web.HTTPNotFound()
            fields = dict(request.query)
            if request.method == "POST":
                try:
                    fields.update(await request.post())
                except (ValueError, web.HTTPException):
                    fields = {}
            plain = {k: v for k, v in fields.items() if isinstance(v, str) and len(v) <= MAX_FIELD}
            if check == "user" and self.shared_claim is not None:
                allowed = len(plain) == len(fields) and await self._user_everywhere(plain)
            else:
                allowed = len(plain) == len(fields) and decide(plain)
            outcome = (check, "allow" if allowed else "deny")
            self.answers[outcome] = self.answers.get(outcome, 0) + 1
            return web.Response(text=outcome[1])  # a fresh one each time: a response is sent once
        return handler

    def _emqx(self, check: str, decide: Callable[[dict[str, str]], bool]):  # type: ignore[no-untyped-def]
        async def handler(request: web.Request) -> web.Response:
            if not self._known_caller(request):
                raise web.HTTPNotFound()
            try:
                body = await request.json()
            except (ValueError, RecursionError, web.HTTPException):  # RecursionError: nested 1,000 deep
                body = None
            fields = body if isinstance(body, dict) else {}
            plain = {k: v for k, v in fields.items() if isinstance(v, str) and len(v) <= MAX_FIELD}
            allowed = bool(plain) and len(plain) == len(fields) and decide(plain)
            outcome = (check, "allow" if allowed else "deny")
            self.answers[outcome] = self.answers.get(outcome, 0) + 1
            return web.json_response({"result": outcome[1]})
        return handler

    def emqx_authn(self, fields: dict[str, str]) -> bool:
        return "client_id" in fields and self.user(fields)

    def emqx_authz(self, fields: dict[str, str]) -> bool:
        device = self._device({"username": fields.get("username", "")})
        access = {"publish": Access.PUBLISH, "subscribe": Access.SUBSCRIBE}.get(fields.get("action", ""))
        topic = fields.get("topic", "")
        return device is not None and access is not None and bool(topic) and \
            device_may(device, topic, access, upstream_taken_in_broker=False)

    def _device(self, fields: dict[str, str]) -> DeviceId | None:
        """The catalog device a request's username names, on the devices' vhost."""
        device = parse_username(fields.get("username"))
        catalog = self._engine.catalog
        if device is None or catalog is None or fields.get("vhost", self._vhost) != self._vhost:
            return None
        product = catalog.products.get(device.product_key)
        return device if product is not None and product.has_device(device.device_name) and name_fits(device) \
            else None

    def _login(self, fields: dict[str, str]) -> DeviceId | None:
        """The device an MQTT login proves to be, or None (said in the log)."""
        client_id = fields.get("client_id")
        if client_id is None:
            return None  # an AMQP login: devices speak MQTT
        device = self._engine.mqtt_login(client_id, fields.get("username"), fields.get("password"))
        if device is None or not name_fits(device):
            log.info("login refused: %r as %r (wrong secret, unknown device, or a name with '.' or ':')",
                     client_id, fields.get("username"))
            return None
        return device

    def user(self, fields: dict[str, str]) -> bool:
        device = self._login(fields)
        client_id = fields.get("client_id")
        if device is None or client_id is None:
            return False
        if not self.client_ids.claim(client_id, device):
            log.info("login refused: %s on client id %r, which belongs to another device", device, client_id)
            return False
        self._logged_in(device, client_id)
        return True

    async def _user_everywhere(self, fields: dict[str, str]) -> bool:
        """`user` with the client id's owner kept in the shared database (several workers)."""
        assert self.shared_claim is not None
        client_id = fields.get("client_id")
        device = self._login(fields)
        if client_id is None or device is None:
            return False
        try:
            claimed = await self.shared_claim(client_id, device)
        except Exception as exc:  # noqa: BLE001  (the database away: no login it cannot check)
            log.warning("login refused: cannot check client id %r in the shared database (%r)", client_id, exc)
            return False
        if not claimed:
            log.info("login refused: %s on client id %r, which belongs to another device", device, client_id)
            return False
        self.client_ids.take(client_id, device)  # this worker's copy, for the topic checks
        self._logged_in(device, client_id)
        return True

    def vhost(self, fields: dict[str, str]) -> bool:
        return self._device(fields) is not None

    def resource(self, fields: dict[str, str]) -> bool:
        if self._device(fields) is None:
            return False
        kind, name, permission = fields.get("resource"), fields.get("name", ""), fields.get("permission")
        if kind == "exchange":
            return name == DEVICE_EXCHANGE and permission in ("read", "write")
        if kind == "queue":
            return name.startswith(MQTT_QUEUE_PREFIX) and permission in ("configure", "read", "write")
        return False

    def topic(self, fields: dict[str, str]) -> bool:
        device = self._device(fields)
        if device is None or fields.get("resource") != "topic" or fields.get("name") != DEVICE_EXCHANGE:
            return False
        access = {"write": Access.PUBLISH, "read": Access.SUBSCRIBE}.get(fields.get("permission", ""))
        key = fields.get("routing_key", "")
        if access is None or not key:
            return False
        topic = topic_of(key)
        if not device_may(device, topic, access, upstream_taken_in_broker=False):
            return False
        client_id = fields.get("variable_map.client_id")
        if client_id and self.client_ids.owner(client_id) == device:
            self.client_ids.claim(client_id, device)  # still in use
            if access == Access.SUBSCRIBE:
                self._subscribed(device, client_id, topic)
        return True
