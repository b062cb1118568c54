"""GET /metrics: the server's figures in the Prometheus text format (docs/metrics.md).

Hot paths only bump plain ints and dicts: bytes served in otacore/downloads/serving.py, pushes and
reloads in otacore/engine.py, MQTT messages in broker_plugin/ota.py, /files/ answers by
status in fileserver/app.py. `OtaCollector` reads them, and walks the fleet's state for the
per-batch figures, at scrape time only, in the event loop (nothing changes under it).

Each server has its own CollectorRegistry, with prometheus_client's process and platform
collectors, never the global one: tests run many servers in one process.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from otacore.engine import OtaEngine
from otacore.views.fleet_figures import EngineFigures
from otacore.protocol.topics import FILE_DOWNLOAD, FIRMWARE_GET, INFORM, PROGRESS

# The classic text format (0.0.4), which every Prometheus reads, whatever the Accept header.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# MQTT upstream topic kind -> the `kind` label of ota_mqtt_messages_received_total.
MESSAGE_KINDS = {INFORM: "version", PROGRESS: "progress", FIRMWARE_GET: "firmware", FILE_DOWNLOAD: "block"}
# What otacore.fleet.rollout.rollout_view says a running batch is doing.
ROLLOUT_STATES = ("active", "paused", "halted", "scheduled", "ended", "outside_window", "rate_limited")


@dataclass
class BrokerFigures:
    """What the broker side knows, read at scrape time (broker_plugin/runtime.py supplies it;
    an app without a broker, as in some tests, shows zeros)."""

    mqtt_connections: Callable[[], int] = lambda: 0
    devices_online: Callable[[], int] = lambda: 0
    messages: Mapping[str, int] = field(default_factory=dict)  # upstream topic kind -> received
    tls_failures: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (endpoint, reason) -> handshakes
    connections_replaced: Callable[[], int] = lambda: 0  # past limits.max_connections_per_device
    # Cluster mode only (cluster_worker/): the worker's AMQP side and the broker's auth checks.
    cluster: Callable[[], "ClusterFigures"] | None = None


@dataclass(frozen=True)
class ClusterFigures:
    connected: bool  # to one of the cluster's nodes now
    connects: int
    rekeyed: int  # ingress messages copied onto a partition
    consumed: int  # partition messages handed to the engine
    ignored: int  # messages on no OTA topic the worker can name a device for
    published: int  # pushes and replies published
    returned: int  # of those, taken by no subscription
    sessions_bound: int  # session queues given the OTA topics of a device that did not subscribe them
    auth_answers: Mapping[tuple[str, str], int]  # (check, allow|deny) -> answers
    # Several workers (cluster.postgres): None for a worker alone.
    partitions_held: int | None = None
    coordinator: bool = False
    partition_moves: int = 0  # partitions taken or released by this worker
    forwarded: int = 0  # HTTP requests passed to the worker that answers them


class OtaCollector(Collector):
    def __init__(self, engine: OtaEngine, broker: BrokerFigures, download_statuses: Mapping[int, int],
                 package_handles: Callable[[], int] = lambda: 0) -> None:
        self._package_handles = package_handles  # open package files (fileserver/app.py OpenPackageFiles)
        self._engine = engine
        self._broker = broker
        self._statuses = download_statuses  # HTTP status -> /files/ answers (fileserver/app.py)

    def collect(self) -> Iterator[Metric]:
        engine, broker = self._engine, self._broker
        yield GaugeMetricFamily("ota_mqtt_connections", "MQTT connections the broker's listeners hold now.",
                                value=broker.mqtt_connections())
        yield GaugeMetricFamily("ota_devices_online", "Devices with at least one connected MQTT session now.",
                                value=broker.devices_online())
        messages = CounterMetricFamily("ota_mqtt_messages_received",
                                       "Device OTA messages received over MQTT, by kind (version report, progress "
                                       "report, firmware request, block request).", labels=["kind"])
        for kind, label in MESSAGE_KINDS.items():
            messages.add_metric([label], broker.messages.get(kind, 0))
        yield messages
        tls = CounterMetricFamily("ota_tls_handshake_failures", "TLS handshakes that failed, by endpoint (mqtt, "
                                  "https) and reason (no_shared_cipher, protocol_version, unknown_ca, "
                                  "bad_certificate, plain_text, other).", labels=["endpoint", "reason"])
        for (endpoint, reason), count in sorted(broker.tls_failures.items()):
            tls.add_metric([endpoint, reason], count)
        yield tls
        yield CounterMetricFamily("ota_mqtt_connections_replaced", "Logged-in MQTT connections closed because "
                                  "their device's credentials logged in again past "
                                  "limits.max_connections_per_device (a leaked or cloned secret, or a device "
                                  "reconnecting without closing).", value=broker.connections_replaced())
        yield GaugeMetricFamily("ota_package_handles_open", "Package files the file server holds open now: one "
                                "per package file being served, and retired ones until their transfers end.",
                                value=self._package_handles())
        figures = engine.figures()
        yield CounterMetricFamily("ota_pushes_sent", "Upgrade pushes handed to a device's live MQTT session.",
                                  value=figures.pushes_sent)
        served = CounterMetricFamily("ota_bytes_served", "Package bytes sent to devices: completed HTTP "
                                     "transfers and MQTT blocks.", labels=["protocol"])
        for protocol, count in figures.bytes_served.items():
            served.add_metric([protocol], count)
        yield served
        statuses = CounterMetricFamily("ota_download_requests", "Answers to GET/HEAD /files/... requests, by "
                                       "HTTP status.", labels=["status"])
        for status, count in sorted(self._statuses.items()):
            statuses.add_metric([str(status)], count)
        yield statuses
        reloads = CounterMetricFamily("ota_reloads", "Catalog reloads (start, SIGHUP, otactl reload, the admin "
                                      "API), by result.", labels=["result"])
        for result, count in figures.reloads.items():
            reloads.add_metric([result], count)
        yield reloads
        yield from self._batches(figures)
        if broker.cluster is not None:
            yield from _cluster(broker.cluster())

    def _batches(self, figures: EngineFigures) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("ota_jobs", "Devices per batch and job state, each counted once by its latest "
                                 "job in the batch.", labels=["batch", "state"])
        failed = GaugeMetricFamily("ota_failed_jobs", "Devices per batch whose latest job there failed, by how "
                                   "it failed.", labels=["batch", "kind"])
        for batch in figures.batches:
            for job_state, count in batch.jobs.items():
                jobs.add_metric([batch.batch, job_state.value], count)
            for kind, count in batch.failures.items():
                failed.add_metric([batch.batch, kind], count)
        yield jobs
        yield failed
        rollout = GaugeMetricFamily("ota_batch_rollout_state", "1 for what each running batch's rollout is doing "
                                    "now (active, paused, halted, ...), 0 for the other states.",
                                    labels=["batch", "state"])
        for batch_name, now_doing in figures.rollouts.items():
            for rollout_state in ROLLOUT_STATES:
                rollout.add_metric([batch_name, rollout_state], 1 if now_doing == rollout_state else 0)
        yield rollout


def _cluster(figures: ClusterFigures) -> Iterator[Metric]:
    yield GaugeMetricFamily("ota_cluster_connected", "1 while the worker is connected to a RabbitMQ node.",
                            value=1 if figures.connected else 0)
    for name, value, text in (
            ("connects", figures.connects, "Connections made to a RabbitMQ node (the first, then each failover)."),
            ("rekeyed", figures.rekeyed, "Device messages copied from ota.ingress onto their device's partition."),
            ("consumed", figures.consumed, "Device messages taken from the partition queues and decided."),
            ("ignored", figures.ignored, "Messages on no OTA topic the worker can name a device for (dropped)."),
            ("published", figures.published, "Pushes and replies published to amq.topic."),
            ("returned", figures.returned, "Pushes and replies that no subscription of their device took "
                                           "(a device away with clean_session=1, or one that subscribes to "
                                           "nothing)."),
            ("sessions_bound", figures.sessions_bound, "Device sessions whose queue the worker bound to the OTA "
                                                       "topics the device did not subscribe to itself.")):
        yield CounterMetricFamily(f"ota_cluster_{name}", text, value=value)
    if figures.partitions_held is not None:
        yield GaugeMetricFamily("ota_cluster_partitions_held", "Device partitions this worker holds now.",
                                value=figures.partitions_held)
        yield GaugeMetricFamily("ota_cluster_coordinator", "1 while this worker is the coordinator (it decides "
                                "for batches).", value=1 if figures.coordinator else 0)
        yield CounterMetricFamily("ota_cluster_partition_moves", "Partitions this worker took or released.",
                                  value=figures.partition_moves)
        yield CounterMetricFamily("ota_cluster_forwarded", "HTTP requests this worker passed to the worker that "
                                  "answers them (the device's, the client id's, the coordinator).",
                                  value=figures.forwarded)
    answers = CounterMetricFamily("ota_cluster_auth_answers", "The broker's login and ACL checks answered, by check "
                                  "(user, vhost, resource, topic, emqx_authn, emqx_authz) and answer.",
                                  labels=["check", "answer"])
    for (check, answer), count in sorted(figures.auth_answers.items()):
        answers.add_metric([check, answer], count)
    yield answers


def metrics_registry(engine: OtaEngine, broker: BrokerFigures, download_statuses: Mapping[int, int],
                     package_handles: Callable[[], int] = lambda: 0) -> CollectorRegistry:
    """A registry of its own for one server: its figures and the process's."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(OtaCollector(engine, broker, download_statuses, package_handles))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry's metrics as text, for CONTENT_TYPE."""
    return generate_latest(registry)
