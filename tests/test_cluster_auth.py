"""The cluster worker's login and ACL endpoints (fileserver/broker_auth.py), asked over real HTTP
as RabbitMQ's `rabbitmq_auth_backend_http` and EMQX's HTTP authenticator/authorizer ask them,
and the topic <-> routing key rules (otacore/protocol/routing_keys.py). No RabbitMQ needed: the
worker runs with its nodes unreachable (the cluster tests, tests/test_cluster.py, run the rest)."""
from __future__ import annotations

import contextlib
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


@contextlib.asynccontextmanager
async def running_worker(root: Path, **cluster: str) -> AsyncIterator[tuple[WorkerRuntime, aiohttp.ClientSession, str]]:
    """A worker whose RabbitMQ nodes are unreachable; (runtime, session, its /broker-auth base)."""
    write_catalog(root)
    port = free_port()
    settings = settings_from_mapping({
        "catalog": str(root / "ota.yaml"), "data_dir": str(root / "var"),
        "http": {"bind": f"127.0.0.1:{port}", "public_url": f"http://127.0.0.1:{port}"},
        "cluster": {"amqp": [f"amqp://ota-worker:pw@127.0.0.1:{free_port()}/"], **cluster}}, root / "broker.yaml")
    runtime = WorkerRuntime(settings)
    await runtime.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield runtime, session, f"http://127.0.0.1:{port}/broker-auth"
    finally:
        await runtime.stop()


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[tuple[WorkerRuntime, aiohttp.ClientSession, str]]:
    async with running_worker(tmp_path) as running:
        yield running


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
    for odd in ("ac.1", "ac:1"):  # its topics cannot cross RabbitMQ unchanged; RabbitMQ reads `:` as a vhost
        assert await ask(session, user, username=f"{odd}&{PK}", password=device_secret(odd), client_id=odd) == "deny"
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


async def test_a_client_id_belongs_to_the_first_device_that_logs_in_with_it(worker) -> None:  # type: ignore[no-untyped-def]
    """RabbitMQ hands a client id's session (its subscriptions, queued pushes, the OTA bindings)
    to whoever logs in with it: another device's valid login on it is refused."""
    runtime, session, base = worker
    user = f"{base}/user"
    victim = {"username": f"v-1&{PK}", "password": device_secret("v-1"), "client_id": "v-1|securemode=2|"}
    assert await ask(session, user, **victim) == "allow"
    thief = {"username": f"t-1&{PK}", "password": device_secret("t-1"), "client_id": "v-1|securemode=2|"}
    assert await ask(session, user, **thief) == "deny"
    assert await ask(session, user, **victim) == "allow"  # its own again
    # A topic check naming the victim's client id for another device binds nothing.
    bound: list[tuple[DeviceId, str, str]] = []
    runtime.auth._subscribed = lambda *args: bound.append(args)  # what the sessions would bind
    topic = {"resource": "topic", "name": "amq.topic", "permission": "read", "vhost": "/",
             "variable_map.client_id": "v-1|securemode=2|"}
    assert await ask(session, f"{base}/topic", **topic, username=f"t-1&{PK}", routing_key=f".{PK}.t-1.user.get") == "allow"
    assert bound == []
    assert await ask(session, f"{base}/topic", **topic, username=f"v-1&{PK}", routing_key=f".{PK}.v-1.user.get") == "allow"
    assert bound == [(DeviceId(PK, "v-1"), "v-1|securemode=2|", f"/{PK}/v-1/user/get")]


async def test_with_an_auth_token_only_its_paths_answer(tmp_path: Path) -> None:
    async with running_worker(tmp_path, auth_token="s3cret-token-0123456789") as (_, session, base):
        fields = {"username": f"tk-1&{PK}", "password": device_secret("tk-1"), "client_id": "tk-1"}
        async with session.post(f"{base}/user", data=fields) as response:
            assert response.status == 404
        async with session.post(f"{base}/wrong-token-0123456789/user", data=fields) as response:
            assert response.status == 404
        assert await ask(session, f"{base}/s3cret-token-0123456789/user", **fields) == "allow"
        deep = "[" * 5000 + "]" * 5000  # nested past Python's recursion limit: a deny, not a 500
        async with session.post(f"{base}/s3cret-token-0123456789/emqx/authn", data=deep,
                                headers={"Content-Type": "application/json"}) as response:
            assert response.status == 200 and (await response.json())["result"] == "deny"


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
    ({"amqp": ["amqp://u:p@127.0.0.1:5672/"], "auth_token": "short"}, "cluster.auth_token"),
    ({"amqp": ["amqp://u:p@127.0.0.1:5672/"], "auth_token": "has/a/slash/in/it/xx"}, "cluster.auth_token"),
])
def test_bad_cluster_settings_are_one_line_errors(tmp_path: Path, cluster: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        settings_from_mapping({"cluster": cluster}, tmp_path / "broker.yaml")
    assert message in error.value.one_line() and "\n" not in error.value.one_line()
