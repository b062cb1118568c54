"""The worker's AMQP side: connect to one of the cluster's nodes (the next when it goes),
declare the topology, re-key the ingress queue onto the partitions, and hand each partition's
messages to the device messages in order, acknowledging each once its promises are committed
(the rule the embedded broker's PUBACK follows).

Acknowledgements are at least once: a message whose acknowledgement did not reach RabbitMQ
(the worker killed, a node stopped) is delivered again, and the engine's answer to a repeated
report is the answer it gave the first time.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import aiormq
from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage
from pamqp.commands import Basic

from otacore.config.settings import Settings
from otacore.messaging import DeviceMessages
from otacore.protocol.codec import MAX_JSON_BYTES
from otacore.protocol.credentials import DeviceId
from otacore.protocol.routing_keys import parse_upstream_key, partition_of, topic_of

from .link import AmqpLink
from .topology import INGRESS_QUEUE, TOPIC_HEADER, declare, partition_queue

log = logging.getLogger("ota.cluster")

INGRESS_PREFETCH = 256  # re-keyed in batches of up to this many, one confirm round trip each
PARTITION_PREFETCH = 256  # per partition: messages decided and waiting for their commit
RECONNECT_SECONDS = (0.2, 0.5, 1, 2, 5)  # after each failed round over every node
CONNECT_TIMEOUT = 5.0


def node_name(url: str) -> str:
    """host:port of an AMQP URL, without its credentials (for logs and /metrics)."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5672}"


class ClusterWorker:
    def __init__(self, settings: Settings, messages: DeviceMessages, link: AmqpLink,
                 seen: Callable[[DeviceId], None], admits: Callable[[DeviceId], bool],
                 fatal: Callable[[str], None]) -> None:
        self._settings = settings
        self._messages = messages
        self._link = link
        self._seen = seen  # a message from the device: it is alive
        self._admits = admits  # the device is in the live catalog
        self._fatal = fatal  # a misconfiguration no reconnect can cure: stop the worker
        self._task: asyncio.Task[None] | None = None
        self.node: str | None = None  # the node connected to now
        self.connects = 0
        self.rekeyed = 0
        self.consumed = 0
        self.ignored = 0  # not an OTA topic the worker can name a device for
        self.connected = asyncio.Event()
        self.connection: AbstractConnection | None = None  # while connected
        # The partitions this worker consumes: all of them for a worker alone; with a
        # PostgreSQL journal, the ones its membership holds (consume / stop_consuming).
        self.consuming: set[int] = set(range(settings.cluster_partitions)) if settings.cluster_postgres is None \
            else set()
        self._consumers: dict[int, str] = {}  # partition -> consumer tag, while connected
        self._partition_channel: AbstractChannel | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ota-cluster")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    # -- connection ----------------------------------------------------------------------------
    async def _run(self) -> None:
        urls = self._settings.cluster_amqp
        failures = 0
        while True:
            for url in urls:
                try:
                    connection = await asyncio.wait_for(aiormq.connect(url), CONNECT_TIMEOUT)
                except (asyncio.TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
                    log.warning("cluster: cannot connect to %s: %r", node_name(url), exc)
                    continue
                connects = self.connects
                try:
                    await self._serve(connection, node_name(url))
                except asyncio.CancelledError:
                    await self._close(connection)
                    raise
                except WrongPartitions as exc:
                    await self._close(connection)
                    self._fatal(str(exc))
                    return
                except Exception as exc:  # the node or the connection went: the next node
                    log.warning("cluster: connection to %s lost: %r; trying the next node", node_name(url), exc)
                finally:
                    self.connected.clear()
                    self._link.attach(None)
                    self.connection = None
                    self.node = None
                await self._close(connection)
                if self.connects > connects:
                    failures = 0  # it served: a fresh loss, not a node that keeps refusing
            await asyncio.sleep(RECONNECT_SECONDS[min(failures, len(RECONNECT_SECONDS) - 1)])
            failures += 1

    @staticmethod
    async def _close(connection: AbstractConnection) -> None:
        try:
            await asyncio.wait_for(connection.close(), 2)
        except Exception:  # already gone
            pass

    async def _serve(self, connection: AbstractConnection, node: str) -> None:
        settings = self._settings
        setup = await connection.channel(publisher_confirms=False)
        await declare(setup, settings.cluster_partitions, settings.cluster_queue_type)
        await setup.close()
        await self._check_no_more_partitions(connection, settings.cluster_partitions)
        # Pushes and replies: confirmed, and what no queue takes comes back to the link.
        outgoing = await connection.channel(publisher_confirms=True, on_return_raises=False)
        ingress = await connection.channel(publisher_confirms=True)
        await ingress.basic_qos(prefetch_count=INGRESS_PREFETCH)
        partitions = await connection.channel(publisher_confirms=False)
        await partitions.basic_qos(prefetch_count=PARTITION_PREFETCH)
        self._link.attach(outgoing)
        self.connection = connection
        waiting: deque[DeliveredMessage] = deque()
        arrived = asyncio.Event()

        async def on_ingress(message: DeliveredMessage) -> None:
            waiting.append(message)  # before any await: in delivery order
            arrived.set()

        await ingress.basic_consume(INGRESS_QUEUE, on_ingress)
        self._consumers = {}
        self._partition_channel = partitions
        for number in sorted(self.consuming):
            await self._consume(number)
        self.node, self.connects = node, self.connects + 1
        self.connected.set()
        log.info("cluster: connected to %s; consuming %s and %d partition queue(s)", node, INGRESS_QUEUE,
                 len(self.consuming))
        rekey = asyncio.get_running_loop().create_task(self._rekey(ingress, waiting, arrived))
        closing = asyncio.ensure_future(connection.closing)
        try:
            done, _ = await asyncio.wait({rekey, closing}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # the reason it ended
            raise ConnectionError("connection closed")
        finally:
            self._partition_channel = None
            self._consumers = {}
            rekey.cancel()
            closing.cancel()
            await asyncio.gather(rekey, return_exceptions=True)

    # -- which partitions -----------------------------------------------------------------------
    async def consume(self, number: int) -> None:
        """Start taking partition `number`'s messages (now, or at the next connect)."""
        self.consuming.add(number)
        if self._partition_channel is not None and number not in self._consumers:
            try:
                await self._consume(number)
            except Exception as exc:  # noqa: BLE001
                # The take goes on (its lock held, its devices loaded) and the next connect
                # consumes it with the others. Failing the take instead gave up its lock but left it
                # in `consuming`: at the next connect this worker took a partition another held.
                log.warning("cluster: cannot consume partition %d (%r); connecting again", number, exc)
                if self.connection is not None:
                    await self._close(self.connection)

    async def stop_consuming(self, number: int) -> None:
        """Take no more of partition `number`'s messages. Those delivered before have been
        decided when this returns (each is decided as it arrives); their acknowledgements
        follow their commits."""
        self.consuming.discard(number)
        tag = self._consumers.pop(number, None)
        channel = self._partition_channel
        if tag is not None and channel is not None and not channel.is_closed:
            try:
                await channel.basic_cancel(tag)
            except Exception as exc:  # the channel went: nothing more comes from it anyway
                log.info("cluster: cancel of partition %d: %r", number, exc)

    async def _consume(self, number: int) -> None:
        channel = self._partition_channel
        assert channel is not None
        ok = await channel.basic_consume(partition_queue(number), self._on_partition)
        self._consumers[number] = ok.consumer_tag

    @staticmethod
    async def _check_no_more_partitions(connection: AbstractConnection, partitions: int) -> None:
        """A queue past the last partition means the cluster's queues were made with more: the
        devices the hash sends there would wait for ever."""
        probe = await connection.channel(publisher_confirms=False)
        try:
            await probe.queue_declare(partition_queue(partitions), passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return  # as it should be (and the 404 closed the probe channel)
        await probe.close()
        raise WrongPartitions(
            f"cluster.partitions is {partitions} but queue {partition_queue(partitions)} exists: the cluster's queues "
            f"were made with more partitions, and devices hashed there would never be answered; set "
            f"cluster.partitions back, or stop every worker and delete the ota.partition.* queues")

    # -- ingress: re-key onto the partitions ----------------------------------------------------
    async def _rekey(self, channel: AbstractChannel, waiting: deque[DeliveredMessage],
                     arrived: asyncio.Event) -> None:
        while True:
            await arrived.wait()
            arrived.clear()
            while waiting:
                batch = [waiting.popleft() for _ in range(len(waiting))]
                confirms = []
                for message in batch:
                    key = message.routing_key or ""
                    ota_topic = parse_upstream_key(key)
                    if ota_topic is None or len(message.body) > MAX_JSON_BYTES:  # no OTA message is larger
                        self.ignored += 1
                        continue
                    properties = Basic.Properties(delivery_mode=2, headers={TOPIC_HEADER: key})
                    # Created in order: aiormq writes the frames in that order (FIFO lock).
                    # To the device's partition queue through the default exchange: the same
                    # partition_of the journal stores with its rows.
                    queue = partition_queue(partition_of(ota_topic.device, self._settings.cluster_partitions))
                    confirms.append(asyncio.ensure_future(channel.basic_publish(
                        message.body, exchange="", routing_key=queue, properties=properties)))
                for confirm in await asyncio.gather(*confirms):
                    if not isinstance(confirm, Basic.Ack):
                        raise ConnectionError(f"RabbitMQ did not take a re-keyed message: {confirm!r}")
                self.rekeyed += len(confirms)
                await channel.basic_ack(batch[-1].delivery_tag, multiple=True)

    # -- partitions: decide ---------------------------------------------------------------------
    async def _on_partition(self, message: DeliveredMessage) -> None:
        # Runs to its first await in delivery order: `receive` decides synchronously.
        self.consumed += 1
        headers = message.header.properties.headers or {}
        key = headers.get(TOPIC_HEADER)
        ota_topic = parse_upstream_key(key) if isinstance(key, str) else None
        if ota_topic is None or not self._admits(ota_topic.device):
            self.ignored += 1
            await self._ack(message)
            return
        if partition_of(ota_topic.device, self._settings.cluster_partitions) not in self.consuming:
            # Delivered just before this worker let the partition go: its new holder decides it.
            await self._requeue(message)
            return
        device = ota_topic.device
        self._seen(device)
        answer = self._messages.receive(device, ota_topic.kind, topic_of(key), message.body)
        if answer is not True:
            await _committed(answer)
        await self._ack(message)

    @staticmethod
    async def _requeue(message: DeliveredMessage) -> None:
        try:
            await message.channel.basic_reject(message.delivery.delivery_tag, requeue=True)
        except Exception as exc:  # the channel went: RabbitMQ delivers it again anyway
            log.info("cluster: requeue lost (%r); the message comes again", exc)

    @staticmethod
    async def _ack(message: DeliveredMessage) -> None:
        try:
            await message.channel.basic_ack(message.delivery.delivery_tag)
        except Exception as exc:  # the channel went: RabbitMQ delivers it again, decided the same
            log.info("cluster: acknowledgement lost (%r); the message comes again", exc)


class WrongPartitions(Exception):
    """The cluster's partition queues do not match cluster.partitions."""


async def _committed(answer: bool | Awaitable[None]) -> None:
    if not isinstance(answer, bool):
        await answer
