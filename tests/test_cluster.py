"""Cluster mode end to end (docs/cluster.md): `scripts/cluster-up` brings up two RabbitMQ nodes,
nginx and the OTA worker on loopback; devices connect to either node's MQTT port and download
through nginx. Marked `cluster`: `./scripts/test` (no arguments) runs them after the default
suite; `./scripts/test -m cluster` alone."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import aiomqtt
import pytest

from devicekit.signing import signed_login
from devicekit.simulator import DeviceConfig, run_fleet
from support import c_link_sdk
from support.cluster import CannotInstall, Cluster, ResilientDevice, cluster_down, cluster_up
from support.harness import PK, PRODUCT_SECRET, Device, OtaServer, device_secret, write_catalog
from support.processes import linkkit_python

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
LINKKIT = ROOT / "scripts" / "interop" / "linkkit_device.py"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    catalog = write_catalog(root)
    try:
        running = cluster_up(root, catalog)
    except CannotInstall as exc:
        pytest.skip(f"RabbitMQ or nginx cannot be installed here: {exc}")
    try:
        yield running
    finally:
        cluster_down(running)


def batches(cluster: Cluster, yaml_text: str) -> None:
    """Replace the catalog's batches (the files stay) with `yaml_text`."""
    write_catalog(cluster.catalog.parent, yaml_text)


def device_list(names: list[str]) -> str:
    return "[" + ", ".join(names) + "]"


async def test_300_devices_over_both_nodes_by_http_through_nginx_and_by_mqtt_blocks(cluster: Cluster) -> None:
    http_names = [f"h-{i:03d}" for i in range(150)]
    mqtt_names = [f"m-{i:03d}" for i in range(150)]
    batches(cluster, f"""
    - {{name: by-http, package: fw-1.1.0, type: upgrade, protocol: http, mode: dynamic, push: true,
       devices: {device_list(http_names)}}}
    - {{name: by-mqtt, package: fw-1.1.0, type: upgrade, protocol: mqtt, mode: dynamic, push: true,
       devices: {device_list(mqtt_names)}}}
    """)
    await cluster.reload()
    configs = [DeviceConfig(name, product_key=PK, product_secret=PRODUCT_SECRET, mqtt_port=cluster.mqtt_ports[i % 2],
                            timeout=90, chunk=32768)
               for i, name in enumerate(http_names + mqtt_names)]
    results = await run_fleet(configs, concurrency=50)
    failed = [r.summary() for r in results if r.outcome != "upgraded"]
    assert not failed, failed[:10]
    assert {r.protocol for r in results[:150]} == {"http"} and {r.protocol for r in results[150:]} == {"mqtt"}
    await _one_job_each(cluster, "by-http", http_names)
    await _one_job_each(cluster, "by-mqtt", mqtt_names)
    # nginx sent the HTTP bytes and told the worker how many (a log line per request, as it
    # ends): each job was served whole.
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        rows = (await cluster.admin("/admin/api/batches/by-http?limit=200"))["devices"]
        short = [(row["device"], row["served_percent"]) for row in rows if row["served_percent"] != 100]
        if not short:
            break
        assert asyncio.get_running_loop().time() < deadline, short
        await asyncio.sleep(0.2)


async def test_linkkit_sdk_device_upgrades_through_the_cluster(cluster: Cluster, tmp_path: Path) -> None:
    """Aliyun's Python linkkit never subscribes to its OTA topics (Aliyun's cloud delivers
    without a subscription); it subscribes to its application's topic. The worker binds its
    OTA topics to the queue that subscription made, and the push and the firmware/get reply
    reach it unchanged."""
    batches(cluster, "- {name: linkkit, package: fw-1.1.0, type: upgrade, protocol: http, mode: dynamic, push: true}\n")
    await cluster.reload()
    python = await asyncio.to_thread(linkkit_python)
    result = await asyncio.to_thread(
        subprocess.run, [str(python), str(LINKKIT), "lk-c1", "--port", str(cluster.mqtt_ports[1]),
                         "--product", PK, "--product-secret", PRODUCT_SECRET],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "lk-c1 linkkit: 1.0.0 -> 1.1.0 ok" in result.stdout


async def _upgrade_all(devices: list[ResilientDevice], disrupt: asyncio.Future[None] | None = None) -> None:
    await asyncio.gather(*(device.run("1.1.0") for device in devices))


async def _one_job_each(cluster: Cluster, batch: str, names: list[str]) -> None:
    """Each device's one job succeeded. A device's PUBACK comes from RabbitMQ once it holds the
    message; the worker decides a moment later, so the last reports may still be on their way."""
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        report = await cluster.admin(f"/admin/api/batches/{batch}?limit=500")
        states = {row["device"]: row["state"] for row in report["devices"]}
        if {states.get(name) for name in names} == {"succeeded"}:
            break
        assert asyncio.get_running_loop().time() < deadline, {name: states.get(name) for name in names}
        await asyncio.sleep(0.2)
    # Each worker reads the whole fleet for views at most a second apart (docs/cluster.md): the
    # one answering may show the reports a moment after the one that answered above.
    for name in names:
        while True:
            detail = await cluster.admin(f"/admin/api/devices/{PK}/{name}")
            if detail["versions"]["default"]["version"] == "1.1.0":
                break
            assert asyncio.get_running_loop().time() < deadline + 5, detail
            await asyncio.sleep(0.2)
        assert detail["jobs_total"] == 1, (name, detail["jobs"])  # nothing given twice


async def test_the_worker_killed_and_restarted_loses_no_promise(cluster: Cluster) -> None:
    names = [f"wk-{i:02d}" for i in range(40)]
    batches(cluster, "- {name: worker-kill, package: fw-1.1.0, type: upgrade, protocol: http, mode: dynamic, "
                     "push: true}\n")
    await cluster.reload()
    devices = [ResilientDevice(cluster, name, first_node=i % 2, start_after=i * 0.1) for i, name in enumerate(names)]
    rollout = asyncio.ensure_future(_upgrade_all(devices))
    await asyncio.sleep(1.5)
    cluster.kill_worker()
    await asyncio.sleep(2.0)  # devices keep publishing into the queues; downloads fail at nginx
    cluster.start_worker()
    await asyncio.wait_for(rollout, 120)
    await _one_job_each(cluster, "worker-kill", names)
    # Every push a device received named the one job it has: none was promised twice.
    for device in devices:
        assert len({push["url"].split("job=")[1].split("&")[0] for push in device.pushes}) == 1, device.pushes


async def test_rabbitmq_asks_the_worker_and_nginx_does_not_pass_the_questions_on(cluster: Cluster) -> None:
    """A wrong secret and a topic of another device, through a real node: RabbitMQ refuses the
    login, and closes the connection of a device that publishes where it may not. The auth
    endpoints are a password oracle: nginx answers them 404."""
    refused = subprocess.run(
        [sys.executable, "-c", PROBE, str(cluster.mqtt_ports[1]), f"pr-1&{PK}", "wrong-secret", "pr-1", ""],
        capture_output=True, text=True, timeout=60)
    assert refused.stdout.startswith("connack 13"), refused.stdout + refused.stderr  # 134/135: refused
    forged = subprocess.run(
        [sys.executable, "-c", PROBE, str(cluster.mqtt_ports[1]), f"pr-1&{PK}", device_secret("pr-1"), "pr-1",
         f"/ota/device/upgrade/{PK}/pr-2"], capture_output=True, text=True, timeout=60)
    assert forged.stdout.strip() == "connack 0|closed", forged.stdout + forged.stderr
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{cluster.http_url}/broker-auth/user",
                                data={"username": f"pr-1&{PK}", "password": device_secret("pr-1"),
                                      "client_id": "pr-1"}) as response:
            assert response.status == 404


# A paho client: CONNECT, then optionally one QoS 1 PUBLISH; prints what the broker did.
PROBE = """
import sys, time, paho.mqtt.client as mqtt
port, user, password, cid, topic = sys.argv[1:6]
events = []
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid)
c.username_pw_set(user, password)
c.on_connect = lambda cl, u, f, rc, p: events.append(f"connack {rc.value}")
c.on_disconnect = lambda *a: events.append("closed")
c.connect("127.0.0.1", int(port)); c.loop_start(); time.sleep(1)
if topic and events == ["connack 0"]:
    c.publish(topic, b"{}", qos=1); time.sleep(2)
c.loop_stop()
print(*dict.fromkeys(events), sep="|")
"""


async def test_hostile_clients_against_the_cluster_change_nothing(cluster: Cluster) -> None:
    """scripts/hostile_clients.py against a node and nginx while an honest device upgrades:
    wrong secrets, wills and forged pushes on other devices' topics, floods, 1,000 filters,
    retained fakes, path tricks. The honest device gets its one real push and upgrades."""
    batches(cluster, "- {name: siege, package: fw-1.1.0, type: upgrade, protocol: http, mode: dynamic, push: true}\n")
    await cluster.reload()
    nginx_port = int(cluster.http_url.rsplit(":", 1)[1])
    hostile = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "hostile_clients.py"), "--json", "--mqtt-port",
         str(cluster.mqtt_ports[0]), "--http-port", str(nginx_port), "--product", PK, "--product-secret",
         PRODUCT_SECRET, "--device", "evil-1", "--device", "evil-2", "--impersonate", "victim-1",
         "--clients", "6", "--duration", "8", "--hold", "3", "--max-payload-mb", "1",
         "--attacks", "refused_connect,bad_will,publish_flood,evil_progress,retained_big,subscribe_1000,"
                      "session_churn,http_bad_range,http_path_tricks,http_bad_auth"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        await asyncio.sleep(2)
        victim = ResilientDevice(cluster, "victim-1", first_node=0)
        await victim.run("1.1.0", timeout=60)
    finally:
        output, errors = await asyncio.to_thread(hostile.communicate, timeout=90)
    assert hostile.returncode in (0, 2), errors[-2000:]
    report = json.loads(output)
    assert report, errors[-2000:]
    assert len(victim.pushes) == 1, victim.pushes  # no forged push reached it
    await _one_job_each(cluster, "siege", ["victim-1"])
    await _forge_a_log_line(cluster, "forger-1")
    os.kill(cluster.worker_pid, 0)  # the worker is still there


async def _forge_a_log_line(cluster: Cluster, name: str) -> None:
    """A failure report whose `desc` holds a newline and a terminal escape is logged by the
    worker on one line, escaped, as by the embedded server."""
    client_id, password = signed_login(device_secret(name), name, PK, None)
    async with aiomqtt.Client("127.0.0.1", cluster.mqtt_ports[0], identifier=client_id,
                              username=f"{name}&{PK}", password=password, timeout=10) as client:
        await client.subscribe(f"/ota/device/upgrade/{PK}/{name}", qos=1)
        await client.publish(f"/ota/device/inform/{PK}/{name}", json.dumps({"id": "1", "params": {"version": "1.0.0"}}),
                             qos=1)
        async with asyncio.timeout(30):
            await anext(aiter(client.messages))
        forged = {"id": "2", "params": {"step": "-2", "desc": "disk\nFAKE 00:00 INFO ota: all is well\x1b[2J"}}
        await client.publish(f"/ota/device/progress/{PK}/{name}", json.dumps(forged), qos=1)
    def logs() -> str:  # the device's holder logs it: whichever worker that is
        return "".join(path.read_text(errors="replace") for path in cluster.dir.glob("worker*.log"))
    async with asyncio.timeout(30):
        while "FAKE 00:00" not in logs():
            await asyncio.sleep(0.2)
    lines = logs().splitlines()
    assert not [line for line in lines if line.startswith("FAKE") or "\x1b" in line], "a device wrote the log"


async def test_c_link_sdk_sequence_through_the_cluster_and_the_limit_without_subscriptions(
        cluster: Cluster, tmp_path: Path) -> None:
    """tests/test_c_link_sdk.py's packet sequence (trailing commas, fileToken "default", step
    "0") through a node, MQTT blocks and all, by a device that, like the C Link SDK 4.x,
    subscribes to its application's topic and never to its OTA topics: the worker binds them
    to its session. Then the limit docs/cluster.md states: a device that subscribes to nothing
    has no session queue and gets no push; the HTTP device API covers it."""
    batches(cluster, "- {name: c-sdk, package: fw-1.1.0, type: upgrade, protocol: mqtt, mode: dynamic, push: true}\n")
    await cluster.reload()
    node = OtaServer(tmp_path, mqtt_port=cluster.mqtt_ports[1], http_port=int(cluster.http_url.rsplit(":", 1)[1]))
    async with Device(node, "c-sdk-1", subscribe=False) as device:
        await device.subscribe(f"/{PK}/c-sdk-1/user/get")
        await device.inform("1.0.0")
        push = (await device.next_push(timeout=10))["data"]
        await device.publish(f"/ota/device/progress/{PK}/c-sdk-1", c_link_sdk.STARTED)
        # The SDK's first request names stream 1 (the first job of a fresh server); here the
        # pushed one, with every byte of the SDK's format kept.
        await c_link_sdk.download(device, push, timeout=10)
        await device.progress(100)
        await device.inform("1.1.0")
    await _one_job_each(cluster, "c-sdk", ["c-sdk-1"])

    async with Device(node, "c-sdk-2", subscribe=False) as silent:
        await silent.inform("1.0.0")
        await silent.expect_nothing(2.0)  # the push is published; no subscription takes it
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{cluster.http_url}/base-api/api/v1/get_ota_info",
                                   params={"productKey": PK, "deviceKey": "c-sdk-2"},
                                   headers={"Authorization": "Basic " + base64.b64encode(
                                       f"c-sdk-2&{PK}:{device_secret('c-sdk-2')}".encode()).decode()}) as response:
                offer = (await response.json())["data"]
        assert offer["version"] == "1.1.0" and offer["dProtocol"] == "mqtt", offer
    metrics = await cluster.metrics()
    assert metrics["ota_cluster_returned_total"] >= 1
    assert metrics["ota_cluster_sessions_bound_total"] >= 1




async def test_a_node_stopped_mid_rollout_its_devices_and_the_worker_finish_on_the_other(cluster: Cluster) -> None:
    """Node 1 stops: the devices connected to it reconnect to node 2 with clean_session=0 and
    find their session there; the worker, connected to node 1 too, moves to node 2 and takes
    its queues' mirrors there. Every device finishes, with one job."""
    names = [f"ns-{i:02d}" for i in range(40)]
    batches(cluster, "- {name: node-stop, package: fw-1.1.0, type: upgrade, protocol: http, mode: dynamic, push: true}\n")
    await cluster.reload()
    connects = (await cluster.metrics())["ota_cluster_connects_total"]
    devices = [ResilientDevice(cluster, name, first_node=i % 2, start_after=i * 0.1, install_seconds=2.0)
               for i, name in enumerate(names)]
    rollout = asyncio.ensure_future(_upgrade_all(devices))
    await asyncio.sleep(2.0)  # some are installing, some have their push or are downloading, some not connected yet
    stopped = await asyncio.to_thread(cluster.rabbitmqctl, 1, "stop_app")
    assert stopped.returncode == 0, stopped.stderr
    # Node 1 stays stopped: this is the module's last test (a node rejoining takes RabbitMQ a
    # minute and more here, and nothing after needs it).
    await asyncio.wait_for(rollout, 120)
    await _one_job_each(cluster, "node-stop", names)
    assert (await cluster.metrics())["ota_cluster_connects_total"] > connects  # the worker moved
    moved = [d for d in devices if d.connects > 1]
    assert len(moved) >= 3, "too few devices were on the stopped node when it stopped"
