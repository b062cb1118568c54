"""Several workers sharing one fleet through PostgreSQL (docs/cluster.md, "Several workers"):
`scripts/cluster-up --workers 3`, 300 devices on two rollouts whose rules are fleet-wide
(waves, a rate, an abort threshold), one worker killed with `kill -9` at a random moment and
started again. Marked `cluster`: `./scripts/test` runs it after the default suite."""
from __future__ import annotations

import asyncio
import base64
import json
import random
import time
import zlib
from collections.abc import Iterator
from typing import Any

import aiohttp
import aiomqtt
import asyncpg
import pytest

from devicekit.signing import signed_login
from otacore.catalog.rollout_policy import device_share
from otacore.protocol.credentials import DeviceId
from otacore.protocol.routing_keys import partition_of
from support.cluster import CannotInstall, Cluster, cluster_down, cluster_up
from support.harness import PK, device_secret, job_of, write_catalog

pytestmark = pytest.mark.cluster

WAVED = [f"w-{i:03d}" for i in range(240)]  # waves 10% then all, 100 starts a minute, 5% fail
ABORTED = [f"a-{i:03d}" for i in range(60)]  # seven in eight fail; halts at 40% of 10 finished
RATE = 100  # under the 240 devices that want to start in the first minute: the rest wait
# Devices alternate between the two nodes (even index, odd index), and one node's devices
# tend to report first: the failing ones are spread over both, or the 30 that start in
# the first minute can be mostly the succeeding ones (21 of 30 once) and never reach 40%.
FAILING = {name for i, name in enumerate(WAVED) if i % 20 == 7} | {name for i, name in enumerate(ABORTED) if i % 8}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("workers")
    catalog = write_catalog(root)
    try:
        running = cluster_up(root, catalog, workers=3)
    except CannotInstall as exc:
        pytest.skip(f"RabbitMQ, PostgreSQL or nginx cannot be installed here: {exc}")
    try:
        yield running
    finally:
        cluster_down(running)


class RolloutDevice:
    """Reports 1.0.0, waits for its push, then reports success (the new version) or a failed
    download, as it was told to. What it saw is the test's verdict."""

    def __init__(self, cluster: Cluster, name: str, port: int) -> None:
        self.cluster, self.name, self.port = cluster, name, port
        self.client_id, self.password = signed_login(device_secret(name), name, PK, None)
        self.pushed_jobs: set[int] = set()
        self.outcome = "no push"

    async def run(self, stop: asyncio.Event) -> None:
        topic = f"/ota/device/upgrade/{PK}/{self.name}"
        while not stop.is_set():
            try:
                async with aiomqtt.Client("127.0.0.1", self.port, identifier=self.client_id,
                                          username=f"{self.name}&{PK}", password=self.password,
                                          clean_session=False, timeout=10) as client:
                    await client.subscribe(topic, qos=1)
                    if self.outcome == "no push":
                        await self._publish(client, "inform", {"id": "1", "params": {"version": "1.0.0"}})
                    async for message in client.messages:
                        if self.outcome != "no push" or str(message.topic) != topic:
                            continue
                        self.pushed_jobs.add(job_of(json.loads(bytes(message.payload))))
                        await asyncio.sleep(random.uniform(0.2, 1.0))  # downloading, flashing
                        if self.name in FAILING:
                            await self._publish(client, "progress", {"id": "2", "params": {"step": "-2",
                                                                                           "desc": "download failed"}})
                            self.outcome = "failed"
                        else:
                            await self._publish(client, "progress", {"id": "2", "params": {"step": "100"}})
                            await self._publish(client, "inform", {"id": "3", "params": {"version": "1.1.0"}})
                            self.outcome = "upgraded"
            except aiomqtt.MqttError:
                await asyncio.sleep(0.5)

    async def _publish(self, client: aiomqtt.Client, kind: str, payload: dict[str, Any]) -> None:
        await client.publish(f"/ota/device/{kind}/{PK}/{self.name}", json.dumps(payload), qos=1)


async def _until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        await asyncio.sleep(0.5)


async def test_three_workers_keep_fleet_wide_rules_through_a_kill(cluster: Cluster) -> None:
    write_catalog(cluster.catalog.parent, f"""
    - name: waved
      package: fw-1.1.0
      mode: dynamic
      push: true
      devices: [{", ".join(WAVED)}]
      waves: [{{percent: 10, success_percent: 80}}, {{percent: 100}}]
      rate_per_minute: {RATE}
      abort: {{failure_percent: 50, min_finished: 20}}
    - name: aborted
      package: fw-1.1.0
      mode: dynamic
      push: true
      devices: [{", ".join(ABORTED)}]
      rate_per_minute: 30
      abort: {{failure_percent: 40, min_finished: 10}}
    """)
    await cluster.reload()
    devices = [RolloutDevice(cluster, name, cluster.mqtt_ports[i % len(cluster.mqtt_ports)])
               for i, name in enumerate(WAVED + ABORTED)]
    stop = asyncio.Event()
    running = [asyncio.create_task(device.run(stop)) for device in devices]
    victim = random.randint(1, 3)
    kill_after = random.uniform(3, 20)
    await asyncio.sleep(kill_after)
    cluster.kill_worker(victim)
    await asyncio.sleep(10)
    cluster.start_worker(victim)
    db = await asyncpg.connect(cluster.postgres)
    try:
        # Within the first minute: every device told has finished, the others wait for the
        # rate (the test does not wait a minute more for them).
        async def settled() -> bool:
            told = {d.name for d in devices if d.pushed_jobs}
            return all(d.outcome != "no push" for d in devices if d.name in told) and \
                await _open_jobs(db, "waved") == 0 and await _open_jobs(db, "aborted") == 0
        await _until(settled, 40, f"every device told upgraded or failed (worker {victim} killed at "
                                  f"{kill_after:.1f} s)")
        await asyncio.sleep(1)
        assert await _open_jobs(db, "waved") == await _open_jobs(db, "aborted") == 0
        await _check_devices_saw_what_the_database_says(db, devices)
        queued = await db.fetchval("SELECT count(*) FROM jobs WHERE batch = 'waved' AND state = 'queued'")
        assert queued > 0, "the rate held nothing back: the test shows nothing about it"
        await _check_rate(db, "waved", RATE)
        await _check_rate(db, "aborted", 30)
        await _check_waves(db)
        await _check_halt(db, devices)
        await _check_status_agrees(cluster)
    finally:
        stop.set()
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await db.close()


async def _open_jobs(db: asyncpg.Connection, batch: str) -> int:
    """Jobs whose device was told and has not finished."""
    return int(await db.fetchval("SELECT count(*) FROM jobs WHERE batch = $1 AND state = ANY($2::text[])",
                                 batch, ["notified", "in_progress", "installed"]))


async def _check_devices_saw_what_the_database_says(db: asyncpg.Connection, devices: list[RolloutDevice]) -> None:
    """Every device ends in the state it saw: one job per device and batch, never two pushes
    naming two jobs, and the job's state is what the device did."""
    rows = await db.fetch("SELECT id, batch, device_name, state, superseded FROM jobs ORDER BY id")
    jobs: dict[str, list[Any]] = {}
    for row in rows:
        jobs.setdefault(row["device_name"], []).append(row)
    wrong = []
    for device in devices:
        mine = jobs.get(device.name, [])
        expected = {"upgraded": "succeeded", "failed": "failed"}.get(device.outcome)
        if len(mine) > 1 or len(device.pushed_jobs) > 1:
            wrong.append((device.name, "two jobs", [(r["id"], r["state"]) for r in mine], device.pushed_jobs))
        elif expected is not None and (not mine or mine[0]["state"] != expected
                                       or device.pushed_jobs != {mine[0]["id"]}):
            wrong.append((device.name, device.outcome, [(r["id"], r["state"]) for r in mine], device.pushed_jobs))
        elif expected is None and mine and mine[0]["state"] not in ("queued", "canceled"):
            wrong.append((device.name, "never pushed", [(r["id"], r["state"]) for r in mine]))
    assert not wrong, wrong[:10]


async def _check_rate(db: asyncpg.Connection, batch: str, rate: int) -> None:
    """No 60 s window holds more than `rate` starts (a job leaving `queued`), fleet-wide."""
    starts = [row["at"] for row in await db.fetch(
        "SELECT e.at FROM job_events e JOIN jobs j ON j.id = e.job_id WHERE j.batch = $1 AND e.from_state = 'queued' "
        "AND e.to_state = 'notified' ORDER BY e.at", batch)]
    crowded = [(a, b) for a, b in zip(starts, starts[rate:]) if b - a < 60]
    assert not crowded, f"{batch}: over {rate} starts within 60 s: {crowded[:3]}"


async def _check_waves(db: asyncpg.Connection) -> None:
    """Wave 2 opened once 80% of wave 1 had succeeded, and no wave-2 device started before."""
    control = json.loads(await db.fetchval("SELECT control FROM batches WHERE name = 'waved'"))
    assert control.get("wave") == 1, control
    met = control["wave_met"]["0"]
    first = [row for row in await db.fetch(
        "SELECT j.device_name, min(e.at) AS at FROM jobs j JOIN job_events e ON e.job_id = j.id "
        "WHERE j.batch = 'waved' GROUP BY j.device_name")]
    early = [row["device_name"] for row in first
             if device_share("waved", row["device_name"]) >= 10 and row["at"] < met]
    assert not early, f"wave-2 devices given a job before wave 1 was met: {early[:5]}"


async def _check_halt(db: asyncpg.Connection, devices: list[RolloutDevice]) -> None:
    """`aborted` halted on its failure share, as one worker would: at least 40% of at least 10
    finished jobs; the devices not started then were never pushed."""
    control = json.loads(await db.fetchval("SELECT control FROM batches WHERE name = 'aborted'"))
    assert control.get("paused") and control.get("by") == "abort", control
    figures = control["figures"]
    assert figures["finished"] >= 10 and figures["failure_percent"] >= 40, figures
    never = [d for d in devices if d.name in ABORTED and d.outcome == "no push"]
    assert never, "the halt stopped nothing: every device of `aborted` was pushed"
    waved = json.loads(await db.fetchval("SELECT control FROM batches WHERE name = 'waved'"))
    assert not waved.get("paused"), waved  # 5% failures: under its threshold


async def _check_status_agrees(cluster: Cluster) -> None:
    """`otactl status` asked of each worker says the same."""
    outputs = []
    for k in range(1, 4):
        result = await asyncio.to_thread(cluster.otactl_at, k, "status")
        assert result.returncode == 0, result.stdout + result.stderr
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1] == outputs[2], outputs
    assert "waved" in outputs[0] and "aborted" in outputs[0]


async def _post(cluster: Cluster, worker: int, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.post(cluster.worker_urls[worker - 1] + path, json=body,
                                headers={"Authorization": f"Bearer {cluster.admin_token}"}) as response:
            return response.status, await response.json(content_type=None)


async def _coordinator(cluster: Cluster) -> int:
    for k in range(1, 4):
        async with aiohttp.ClientSession() as session:
            async with session.get(cluster.worker_urls[k - 1] + "/metrics",
                                   headers={"Authorization": f"Bearer {cluster.admin_token}"}) as response:
                if "\nota_cluster_coordinator 1.0" in await response.text():
                    return k
    raise AssertionError("no worker says it is the coordinator")


async def test_admin_actions_and_reloads_work_from_any_worker(cluster: Cluster) -> None:
    names = [f"d-{i:02d}" for i in range(20)]
    write_catalog(cluster.catalog.parent, f"- {{name: adm, package: fw-1.1.0, mode: dynamic, push: true, "
                                          f"devices: [{', '.join(names)}]}}\n")
    others = [k for k in range(1, 4) if k != await _coordinator(cluster)]
    result = await asyncio.to_thread(cluster.otactl_at, others[0], "reload")  # at a worker that does not decide
    assert result.returncode == 0, result.stdout + result.stderr
    clients = []
    for i, name in enumerate(names):  # report 1.0.0 and stay: their jobs wait, told
        client_id, password = signed_login(device_secret(name), name, PK, None)
        client = aiomqtt.Client("127.0.0.1", cluster.mqtt_ports[i % 2], identifier=client_id,
                                username=f"{name}&{PK}", password=password)
        await client.__aenter__()
        clients.append(client)
        await client.publish(f"/ota/device/inform/{PK}/{name}", json.dumps({"id": "1", "params": {"version": "1.0.0"}}),
                             qos=1)
    try:
        async def all_told() -> bool:
            rows = (await cluster.admin("/admin/api/batches/adm?limit=50", worker=others[1]))["devices"]
            return len(rows) == 20 and all(row["state"] == "notified" for row in rows)
        await _until(all_told, 30, "20 devices told")
        status, body = await _post(cluster, others[0], "/admin/api/batches/adm/pause")
        assert status == 200 and body["rollout"]["state"] == "paused", body
        async def paused_everywhere() -> bool:  # each worker's reading of the fleet is a second old at most
            views = [(await cluster.admin("/admin/api/batches/adm", worker=k))["batch"] for k in range(1, 4)]
            return all(view.get("rollout", {}).get("state") == "paused" for view in views)
        await _until(paused_everywhere, 5, "paused, as every worker shows")
        status, body = await _post(cluster, others[1], "/admin/api/batches/adm/cancel", {"devices": names[:5]})
        assert (status, body.get("canceled")) == (200, 5), body  # each worker canceled the ones it holds
        status, body = await _post(cluster, others[1], "/admin/api/batches/adm/resume")
        assert status == 200 and body["rollout"]["state"] == "active", body
        write_catalog(cluster.catalog.parent, "- {name: adm, package: no-such-package}\n")
        result = await asyncio.to_thread(cluster.otactl_at, others[1], "reload")
        assert result.returncode != 0 and "no-such-package" in result.stdout + result.stderr
        await asyncio.sleep(1.5)  # every worker's reading of the fleet is newer than the cancel
        reports = [await cluster.admin("/admin/api/batches/adm?limit=50", worker=k) for k in range(1, 4)]
        states = [sorted((row["device"], row["state"]) for row in report["devices"]) for report in reports]
        assert states[0] == states[1] == states[2]  # the refused reload changed nothing anywhere
        assert sum(state == "canceled" for _, state in states[0]) == 5
        assert reports[0]["batch"]["rollout"]["state"] == "active"
    finally:
        for client in clients:
            await client.__aexit__(None, None, None)


async def test_client_ids_and_device_calls_stay_with_their_worker_when_partitions_move(cluster: Cluster) -> None:
    """Who owns a client id is kept fleet-wide: a device that takes another's client id is
    refused even by the worker that took the client id's partition from a killed one. A
    device call that claims to have been passed on by a worker is answered only by the
    device's holder (nginx strips the claim; a worker that does not hold the device says so)."""
    write_catalog(cluster.catalog.parent, "- {name: ids, package: fw-1.1.0, mode: dynamic, devices: [d-12]}\n")
    await cluster.reload()
    owner_secret, thief_secret = device_secret("d-10"), device_secret("d-11")
    client_id, owner_password = signed_login(owner_secret, "d-10", PK, None, client_id="shared-cid")
    _, thief_password = signed_login(thief_secret, "d-11", PK, None, client_id="shared-cid")
    async with aiomqtt.Client("127.0.0.1", cluster.mqtt_ports[0], identifier=client_id, username=f"d-10&{PK}",
                              password=owner_password):
        pass
    db = await asyncpg.connect(cluster.postgres)
    try:
        live = "seen_at > extract(epoch from clock_timestamp()) - 3"  # rows of killed workers stay a while
        partitions = len(await db.fetch(f"SELECT 1 FROM ota_workers, unnest(partitions) WHERE {live}"))
        holder_url = await db.fetchval(f"SELECT url FROM ota_workers WHERE $1 = ANY(partitions) AND {live}",
                                       zlib.crc32(client_id.encode()) % partitions)
        victim = cluster.worker_urls.index(holder_url) + 1
        cluster.kill_worker(victim)

        async def taken_over() -> bool:
            held = await db.fetchval(f"SELECT count(*) FROM ota_workers, unnest(partitions) WHERE url <> $1 AND {live}",
                                     holder_url)
            return held == partitions
        await _until(taken_over, 20, "the killed worker's partitions taken by the others")
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", cluster.mqtt_ports[1], identifier=client_id,
                                      username=f"d-11&{PK}", password=thief_password, timeout=10):
                pass
        owner = await db.fetchrow("SELECT product_key, device_name FROM ota_client_ids WHERE client_id = $1", client_id)
        assert (owner["product_key"], owner["device_name"]) == (PK, "d-10")
        # A device call claiming to come from a worker, at a worker that does not hold the device.
        device = DeviceId(PK, "d-12")
        holder = await db.fetchval(f"SELECT url FROM ota_workers WHERE $1 = ANY(partitions) AND {live}",
                                   partition_of(device, partitions))
        elsewhere = next(url for url in cluster.worker_urls if url not in (holder, holder_url))
        auth = "Basic " + base64.b64encode(f"d-12&{PK}:{device_secret('d-12')}".encode()).decode()
        query = f"?productKey={PK}&deviceKey=d-12&version=1.0.0"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{elsewhere}/base-api/api/v1/get_ota_info{query}",
                                   headers={"Authorization": auth, "X-Ota-Forwarded": "1"}) as response:
                assert response.status == 503, await response.text()
            async with session.get(f"{cluster.http_url}/base-api/api/v1/get_ota_info{query}",
                                   headers={"Authorization": auth, "X-Ota-Forwarded": "1"}) as response:
                assert response.status == 200, await response.text()  # nginx drops the claim: passed to the holder
        rows = await db.fetch("SELECT id FROM jobs WHERE device_name = 'd-12' AND batch = 'ids'")
        assert len(rows) == 1, rows
    finally:
        cluster.start_worker(victim)
        await db.close()
