"""The queues and exchanges the worker declares, and why each has its shape (docs/cluster.md).

    amq.topic --(upstream OTA bindings)--> ota.ingress          one queue, single active consumer
    ota.ingress --(re-keyed by device)--> ota.partition.0..N-1  single active consumer each

A device's topics differ by kind, so hashing routing keys would put one device's report and
its progress on different partitions. The worker holding `ota.ingress` republishes each
message to its device's partition queue (`routing_keys.partition_of`, through the default
exchange; its topic in a header) and acknowledges it once RabbitMQ confirmed the copy: every
message of a device then lands on one partition, in the order the device sent them. The
partition is the one the journal stores beside the device's rows, so the worker that holds a
partition (cluster_worker/membership.py) loads exactly its devices. One consumer takes a
partition at a time (single active consumer), so a worker that lost its partition but still
runs cannot take messages from the one that has it now.
"""
from __future__ import annotations

from typing import Any

from aiormq.abc import AbstractChannel

from otacore.protocol.routing_keys import UPSTREAM_BINDINGS

TOPIC_EXCHANGE = "amq.topic"  # where RabbitMQ's MQTT plugin publishes, and devices' queues bind
INGRESS_QUEUE = "ota.ingress"
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
    for number in range(partitions):
        await channel.queue_declare(partition_queue(number), durable=True, arguments=_queue_arguments(queue_type))
