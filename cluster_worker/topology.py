"""The queues and exchanges the worker declares, and why each has its shape (docs/cluster.md).

    amq.topic --(upstream OTA bindings)--> ota.ingress          one queue, single active consumer
    ota.ingress --(re-keyed "pk/dn")--> ota.partitions          x-consistent-hash exchange
    ota.partitions --(weight 1 each)--> ota.partition.0..N-1    single active consumer each

RabbitMQ's consistent-hash exchange hashes the whole routing key, and a device's topics differ
by kind, so binding it to amq.topic directly would put one device's report and its progress on
different partitions. The worker holding `ota.ingress` republishes each message with the
device as routing key (its topic in a header) and acknowledges it once RabbitMQ confirmed the
copy: every message of a device then lands on one partition, in the order the device sent
them. One worker holds a partition at a time (single active consumer); the next issue spreads
the partitions over several workers, and a standby takes a dead worker's queues.
"""
from __future__ import annotations

from typing import Any

from aiormq.abc import AbstractChannel

from otacore.protocol.routing_keys import UPSTREAM_BINDINGS

TOPIC_EXCHANGE = "amq.topic"  # where RabbitMQ's MQTT plugin publishes, and devices' queues bind
INGRESS_QUEUE = "ota.ingress"
PARTITION_EXCHANGE = "ota.partitions"
TOPIC_HEADER = "ota-topic"  # the routing key the device published under, kept across the re-key


def partition_queue(number: int) -> str:
    return f"ota.partition.{number}"


def _queue_arguments(queue_type: str) -> dict[str, Any]:
    return {"x-single-active-consumer": True, "x-queue-type": queue_type}


async def declare(channel: AbstractChannel, partitions: int, queue_type: str) -> None:
    """Make sure every queue, exchange and binding exists (idempotent: each worker, each connect)."""
    await channel.queue_declare(INGRESS_QUEUE, durable=True, arguments=_queue_arguments(queue_type))
    for key in UPSTREAM_BINDINGS:
        await channel.queue_bind(INGRESS_QUEUE, TOPIC_EXCHANGE, routing_key=key)
    await channel.exchange_declare(PARTITION_EXCHANGE, exchange_type="x-consistent-hash", durable=True)
    for number in range(partitions):
        await channel.queue_declare(partition_queue(number), durable=True, arguments=_queue_arguments(queue_type))
        await channel.queue_bind(partition_queue(number), PARTITION_EXCHANGE, routing_key="1")
