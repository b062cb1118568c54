"""MQTT topics as a RabbitMQ cluster names them (docs/cluster.md): its MQTT plugin (3.10) turns
a topic into an AMQP routing key on `amq.topic` by writing `/` as `.` (and a filter's `+` as
`*`), and a routing key back into a topic the other way round.

Nothing escapes a `.` inside a level, so a device whose product key or name holds one could
not be told apart from another device's topics, and would receive its pushes on a topic it
never subscribed to: the cluster refuses such devices at login (`name_fits`). RabbitMQ also
reads a `:` in an MQTT username as `vhost:user`, so a name holding one never reaches the
device's vhost: refused too.
"""
from __future__ import annotations

import zlib

from otacore.protocol.credentials import DeviceId
from otacore.protocol.topics import OtaTopic, parse_upstream

# The upstream OTA topics as binding keys on amq.topic: what the worker's ingress queue takes.
# `#` spans the levels a Link SDK topic puts between product key and its fixed tail.
UPSTREAM_BINDINGS = (
    ".ota.device.inform.*.*",
    ".ota.device.progress.*.*",
    ".sys.*.*.thing.ota.firmware.get",
    ".sys.*.*.thing.file.download",
)


def name_fits(device: DeviceId) -> bool:
    """Can this device log in and its topics cross the cluster unchanged?"""
    return not any(mark in name for mark in ".:" for name in (device.product_key, device.device_name))


def routing_key(topic: str) -> str:
    """The routing key a device topic travels under (a push is published with it)."""
    return topic.replace("/", ".")


def topic_of(key: str) -> str:
    """The MQTT topic, or filter, a routing key or binding key stands for."""
    return key.replace(".", "/").replace("*", "+")


def partition_key(device: DeviceId) -> str:
    """What a device's partition is worked out from: the device alone, so all its topics land
    on one partition (hashing the routing key would split them by topic kind)."""
    return f"{device.product_key}/{device.device_name}"


def partition_of(device: DeviceId, partitions: int) -> int:
    """The device's partition, 0..partitions-1: the worker re-keys its messages to that
    partition's queue, and the journal stores it beside the device's rows, so a worker that
    takes the partition loads exactly those devices."""
    return zlib.crc32(partition_key(device).encode()) % partitions


def parse_upstream_key(key: str) -> OtaTopic | None:
    """The OTA topic an upstream routing key carries; None for anything else."""
    ota_topic = parse_upstream(topic_of(key))
    return ota_topic if ota_topic is not None and name_fits(ota_topic.device) else None
