"""OTA topics for devices that never subscribe to them (docs/cluster.md).

Aliyun's cloud delivers a device's OTA topics (upgrade push, firmware/get reply, block reply)
whether or not it subscribed to them, and Aliyun's SDKs rely on it: linkkit and the C Link SDK
4.x subscribe only to the topics of the application. A standard broker delivers only what a
subscription takes. RabbitMQ's MQTT plugin gives each session a queue once it subscribes to
anything (`mqtt-subscription-{client id}qos0` or `qos1`): the worker binds the device's OTA
topics to that queue, so they arrive on the device's connection like on Aliyun's.

It learns of a subscription from RabbitMQ's topic check (auth endpoint, permission `read`),
which comes just before the queue exists, so it looks for the queue a few times. It binds
only the OTA topics the device has not subscribed to itself (it would get them twice), and
only to one of its queues. A device that subscribes to nothing at all has no queue: it is out
of reach of pushes and replies, and gets its upgrade through the HTTP device API.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import aiormq
from aiormq.abc import AbstractChannel, AbstractConnection
from pamqp.commands import Queue

from otacore.protocol.credentials import DeviceId
from otacore.protocol.routing_keys import routing_key
from otacore.protocol.topics import download_reply_topic, filters_matching, firmware_get_reply_topic, upgrade_topic

from .link import AmqpLink
from .topology import TOPIC_EXCHANGE

log = logging.getLogger("ota.cluster")

# After the topic check: when to look for the queue (RabbitMQ makes it once it has our answer,
# and asks about the SUBSCRIBE's other filters first: by the first look the device's own OTA
# subscriptions are known, and a device that subscribed to all three costs nothing).
BIND_DELAYS = (0.2, 0.3, 0.5, 1.0, 2.0)
SESSION_QUEUES = ("mqtt-subscription-{client_id}qos1", "mqtt-subscription-{client_id}qos0")  # RabbitMQ 3.10's names
MAX_TRACKED = 200_000  # client ids remembered; the oldest are forgotten past it


class SessionBindings:
    def __init__(self, link: AmqpLink, connection: Callable[[], AbstractConnection | None]) -> None:
        self._link = link
        self._connection = connection  # the worker's, while connected
        # client id -> the downstream OTA topics the device subscribed to itself, and whether
        # a queue of its session was bound already (one is enough).
        self._own: dict[str, set[str]] = {}
        self._bound: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # One channel at a time for all bindings: a missing queue's 404 closes the channel, and
        # channels opened and closed concurrently by the hundred made aiormq reuse a number
        # RabbitMQ still held open ("second 'channel.open' seen"), which closes the connection.
        self._lock = asyncio.Lock()
        self._channel: AbstractChannel | None = None
        self.bound = 0

    def subscribed(self, device: DeviceId, client_id: str, topic_filter: str) -> None:
        """RabbitMQ allowed the device's session to subscribe to `topic_filter`."""
        own = self._own.setdefault(client_id, set())
        if len(self._own) > MAX_TRACKED:
            oldest = next(iter(self._own))
            self._own.pop(oldest)
            self._bound.discard(oldest)
        for topic in _downstream(device):
            if topic_filter in filters_matching(device, topic):
                own.add(topic)
        if client_id in self._bound or len(own) == len(_downstream(device)):
            return
        self._bound.add(client_id)
        task = asyncio.get_running_loop().create_task(self._bind(device, client_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def logged_in(self, client_id: str) -> None:
        """A new connection with this client id: its subscriptions are checked anew."""
        self._own.pop(client_id, None)
        self._bound.discard(client_id)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._channel is not None and not self._channel.is_closed:
            with contextlib.suppress(Exception):
                await self._channel.close()

    async def _bind(self, device: DeviceId, client_id: str) -> None:
        self._link.binding(device)  # a push coming back meanwhile is sent again once bound
        ok = False
        try:
            ok = await self._bind_queue(device, client_id)
        finally:
            self._link.bound(device, ok)
            if not ok:
                self._bound.discard(client_id)

    async def _bind_queue(self, device: DeviceId, client_id: str) -> bool:
        for delay in BIND_DELAYS:
            await asyncio.sleep(delay)
            own = self._own.get(client_id, set())
            keys = [routing_key(topic) for topic in _downstream(device) if topic not in own]
            if not keys:
                return True  # it subscribed to them all itself meanwhile
            async with self._lock:
                for name in SESSION_QUEUES:
                    outcome = await self._try_bind(device, name.format(client_id=client_id), keys)
                    if outcome is not None:
                        return outcome
        return False

    async def _try_bind(self, device: DeviceId, queue: str, keys: list[str]) -> bool | None:
        """True: bound; False: give up; None: no such queue (yet)."""
        channel = self._channel
        if channel is None or channel.is_closed:
            connection = self._connection()
            if connection is None:
                return False
            try:
                channel = self._channel = await connection.channel(publisher_confirms=False)
            except Exception:  # the connection is going: the next subscription binds again
                return False
        try:
            await channel.rpc(_DeclareAnyName(queue=queue, passive=True))
            for key in keys:
                await channel.rpc(_BindAnyName(queue=queue, exchange=TOPIC_EXCHANGE, routing_key=key))
            self.bound += 1
            return True
        except aiormq.exceptions.ChannelNotFoundEntity:
            # RabbitMQ closed the channel: wait until aiormq has too, before the next opens.
            self._channel = None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(channel.closing), 5)
            return None
        except Exception as exc:
            log.info("cluster: cannot bind %s's OTA topics to its session queue: %r", device, exc)
            self._channel = None
            return False


def _downstream(device: DeviceId) -> tuple[str, str, str]:
    return upgrade_topic(device), firmware_get_reply_topic(device), download_reply_topic(device)


# pamqp holds queue names to the AMQP 0-9-1 grammar (letters, digits, `-_.:`); RabbitMQ takes
# any UTF-8 name, and its MQTT plugin names a session's queue after the client id, which
# Aliyun's SDKs fill with `&|,=`. These two frames skip that check and nothing else.
class _DeclareAnyName(Queue.Declare):
    def validate(self) -> None:
        pass


class _BindAnyName(Queue.Bind):
    def validate(self) -> None:
        pass
