"""The cluster worker's login and ACL endpoints (fileserver/broker_auth.py), asked over real HTTP
as RabbitMQ's `rabbitmq_auth_backend_http` and EMQX's HTTP authenticator/authorizer ask them,
and the topic <-> routing key rules (otacore/protocol/routing_keys.py). No RabbitMQ needed: the
worker runs with its nodes unreachable (the cluster tests, tests/test_cluster.py, run the rest)."""
from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from cluster_worker.runtime import WorkerRuntime
from devicekit.signing import signed_login
from otacore.config.settings import settings_from_mapping
from otacore.errors import ConfigError
from otacore.protocol.credentials import DeviceId
from otacore.protocol.routing_keys import parse_upstream_key, partition_key, routing_key, topic_of
from otacore.protocol.topics import FILE_DOWNLOAD, FIRMWARE_GET, INFORM, PROGRESS
from support.harness import PK, device_secret, free_port, write_catalog


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[tuple[WorkerRuntime, aiohttp.ClientSession, str]]:
    write_catalog(tmp_path)
    port = free_port()
    settings = settings_from_mapping({
        "catalog": str(tmp_path / "ota.yaml"), "data_dir": str(tmp_path / "var"),
        "http": {"bind": f"127.0.0.1:{port}", "public_url": f"http://127.0.0.1:{port}"},
        "cluster": {"amqp": [f"amqp://ota-worker:pw@127.0.0.1:{free_port()}/"]}}, tmp_path / "broker.yaml")
    runtime = WorkerRuntime(settings)
    await runtime.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield runtime, session, f"http://127.0.0.1:{port}/broker-auth"
    finally:
        await runtime.stop()


async def ask(session: aiohttp.ClientSession, url: str, **fields: str) -> str:
    async with session.post(url, data=fields) as response:
        assert response.status == 200
        return await response.text()


async def test_rabbitmq_login_checks_follow_the_embedded_rules(worker) -> None:  # type: ignore[no-untyped-def]
    runtime, session, base = worker
    secret = device_secret("ac-1")
    user = f"{base}/user"
    assert await ask(session, user, username=f"ac-1&{PK}", password=secret, client_id="ac-1", vhost="/") == "allow"
    client_id, password = signed_login(secret, "ac-1", PK, 1700000000000)
    assert await ask(session, user, username=f"ac-1&{PK}", password=password, client_id=client_id) == "allow"
    assert await ask(session, user, username=f"ac-1&{PK}", password=password, client_id="other") == "deny"
    assert await ask(session, user, username=f"ac-1&{PK}", password="wrong", client_id="ac-1") == "deny"
    assert await ask(session, user, username=f"ac-1&{PK}", password=secret) == "deny"  # AMQP: no client id
    assert await ask(session, user, username="guest", password="guest", client_id="x") == "deny"
    assert await ask(session, user, username=f"ac-1&{PK}", password=secret, client_id="a" * 5000) == "deny"
    dotted = "ac.1"
    assert await ask(session, user, username=f"{dotted}&{PK}", password=device_secret(dotted),
                     client_id=dotted) == "deny"  # its topics cannot cross RabbitMQ unchanged
    assert runtime.link.is_online(DeviceId(PK, "ac-1"))  # a login makes it present
    assert not runtime.link.is_online(DeviceId(PK, "ac.1"))
    async with session.post(user, data=b"\xff\xfe garbage", headers={"Content-Type": "text/plain"}) as response:
        assert await response.text() == "deny"


async def test_rabbitmq_resource_and_topic_checks(worker) -> None:  # type: ignore[no-untyped-def]
    _, session, base = worker
    good = {"username": f"ac-1&{PK}", "vhost": "/"}
    assert await ask(session, f"{base}/vhost", **good) == "allow"
    assert await ask(session, f"{base}/vhost", **{**good, "vhost": "other"}) == "deny"
    assert await ask(session, f"{base}/vhost", username="stranger&a1Test9", vhost="/") == "deny"
    resource = f"{base}/resource"
    for kind, name, permission, answer in (
            ("queue", "mqtt-subscription-ac-1qos1", "configure", "allow"),
            ("queue", "mqtt-subscription-ac-1qos0", "read", "allow"),
            ("exchange", "amq.topic", "write", "allow"),
            ("exchange", "amq.topic", "read", "allow"),
            ("exchange", "amq.topic", "configure", "deny"),
            ("queue", "ota.ingress", "read", "deny"),
            ("queue", "ota.partition.0", "configure", "deny"),
            ("exchange", "ota.partitions", "write", "deny"),
            ("exchange", "amq.direct", "write", "deny"),
            ("vhost", "/", "configure", "deny")):
        assert await ask(session, resource, **good, resource=kind, name=name, permission=permission) == answer, \
            (kind, name, permission)
    topic = {**good, "resource": "topic", "name": "amq.topic"}
    for permission, key, answer in (
            ("write", f".ota.device.inform.{PK}.ac-1", "allow"),  # the worker consumes it like any subscriber
            ("write", f".ota.device.progress.{PK}.ac-1", "allow"),
            ("write", f".sys.{PK}.ac-1.thing.ota.firmware.get", "allow"),
            ("write", f".sys.{PK}.ac-1.thing.file.download", "allow"),
            ("write", f".ota.device.inform.{PK}.ac-2", "deny"),  # another device's report
            ("write", f".ota.device.upgrade.{PK}.ac-1", "deny"),  # a forged push
            ("write", f".sys.{PK}.ac-1.thing.ota.firmware.get_reply", "deny"),
            ("write", f".sys.{PK}.ac-1.thing.file.download_reply", "deny"),
            ("read", f".ota.device.upgrade.{PK}.ac-1", "allow"),
            ("read", f".sys.{PK}.ac-1.#", "allow"),
            ("read", "#", "deny"),
            ("read", f".ota.device.upgrade.{PK}.*", "deny"),
            ("read", f".sys.{PK}.*.thing.#", "deny"),
            ("read", "", "deny")):
        assert await ask(session, f"{base}/topic", **topic, permission=permission, routing_key=key) == answer, \
            (permission, key)
    assert await ask(session, f"{base}/topic", **{**topic, "name": "amq.direct"}, permission="write",
                     routing_key=f".ota.device.inform.{PK}.ac-1") == "deny"


async def test_emqx_authenticator_and_authorizer(worker) -> None:  # type: ignore[no-untyped-def]
    runtime, session, base = worker
    secret = device_secret("ex-1")

    async def emqx(check: str, body: object) -> str:
        async with session.post(f"{base}/emqx/{check}", json=body) as response:
            assert response.status == 200
            return (await response.json())["result"]

    assert await emqx("authn", {"username": f"ex-1&{PK}", "password": secret, "client_id": "ex-1"}) == "allow"
    assert await emqx("authn", {"username": f"ex-1&{PK}", "password": "no", "client_id": "ex-1"}) == "deny"
    assert await emqx("authn", {"username": f"ex-1&{PK}", "password": secret}) == "deny"
    assert await emqx("authn", ["not", "a", "mapping"]) == "deny"
    assert await emqx("authn", {"username": f"ex-1&{PK}", "password": 7, "client_id": "ex-1"}) == "deny"
    base_fields = {"username": f"ex-1&{PK}", "client_id": "ex-1"}
    assert await emqx("authz", {**base_fields, "topic": f"/ota/device/inform/{PK}/ex-1", "action": "publish"}) == "allow"
    assert await emqx("authz", {**base_fields, "topic": f"/ota/device/upgrade/{PK}/ex-1", "action": "publish"}) == "deny"
    assert await emqx("authz", {**base_fields, "topic": f"/ota/device/upgrade/{PK}/ex-1",
                                "action": "subscribe"}) == "allow"
    assert await emqx("authz", {**base_fields, "topic": "#", "action": "subscribe"}) == "deny"
    assert await emqx("authz", {**base_fields, "topic": f"/ota/device/inform/{PK}/ex-2", "action": "publish"}) == "deny"
    async with session.get(runtime.http_url + "/metrics",
                           headers={"Authorization": f"Bearer {runtime.admin_token}"}) as response:
        text = await response.text()
    assert "ota_cluster_connected 0.0" in text
    async with session.get(runtime.http_url + "/healthz") as response:  # no node reachable
        assert response.status == 503 and "RabbitMQ" in (await response.json())["reason"]
    assert 'ota_cluster_auth_answers_total{answer="deny",check="emqx_authz"} 3.0' in text


def test_topics_and_routing_keys() -> None:
    device = DeviceId(PK, "dev-1")
    assert routing_key(f"/ota/device/inform/{PK}/dev-1") == f".ota.device.inform.{PK}.dev-1"
    assert topic_of(".sys.a1Test.*.thing.#") == "/sys/a1Test/+/thing/#"
    for topic, kind in ((f"/ota/device/inform/{PK}/dev-1", INFORM), (f"/ota/device/progress/{PK}/dev-1", PROGRESS),
                        (f"/sys/{PK}/dev-1/thing/ota/firmware/get", FIRMWARE_GET),
                        (f"/sys/{PK}/dev-1/thing/file/download", FILE_DOWNLOAD)):
        parsed = parse_upstream_key(routing_key(topic))
        assert parsed is not None and parsed.kind == kind and parsed.device == device
    assert parse_upstream_key(f".ota.device.inform.{PK}.dev.1") is None  # a dotted name: ambiguous
    assert parse_upstream_key(f".ota.device.upgrade.{PK}.dev-1") is None
    assert partition_key(device) == f"{PK}/dev-1"  # one device, one partition, whatever the topic


@pytest.mark.parametrize("cluster, message", [
    ({"amqp": []}, "cluster.amqp"),
    ({"amqp": ["http://x:1/"]}, "cluster.amqp"),
    ({"amqp": "amqp://u:p@127.0.0.1:5672/", "partitions": 0}, "cluster.partitions"),
    ({"amqp": ["amqp://u:p@127.0.0.1:5672/"], "queue_type": "stream"}, "cluster.queue_type"),
    ({"amqp": ["amqp://u:p@127.0.0.1:5672/"], "vhost": ""}, "cluster.vhost"),
    ({"amqp": ["amqp://u:p@127.0.0.1:5672/"], "nodes": 3}, "cluster.nodes"),
])
def test_bad_cluster_settings_are_one_line_errors(tmp_path: Path, cluster: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        settings_from_mapping({"cluster": cluster}, tmp_path / "broker.yaml")
    assert message in error.value.one_line() and "\n" not in error.value.one_line()
