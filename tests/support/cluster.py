"""The cluster mode as a user runs it (docs/cluster.md): `scripts/cluster-up` on loopback (two
RabbitMQ nodes, PostgreSQL, nginx, the OTA workers), its printed lines, the workers' processes,
and a device that rides out a node or a worker going away (clean_session=0, the other node, HTTP
retries). Worker k (1-based) runs with DIR/worker-k.yaml; without k, a method means worker 1.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import yaml
import yarl

from devicekit.signing import signed_login
from support.harness import PK, device_secret

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@dataclass
class Cluster:
    dir: Path
    mqtt_ports: list[int]
    http_url: str
    config: Path
    catalog: Path
    down: str
    lines: dict[str, str] = field(default_factory=dict)
    worker_urls: list[str] = field(default_factory=list)  # each worker's own http.bind, worker 1 first
    postgres: str = ""  # the workers' shared journal (OTA_CLUSTER_POSTGRES)

    def __post_init__(self) -> None:
        if not self.worker_urls:  # made by hand: the workers' configs cluster-up left in dir
            configs = sorted(self.dir.glob("worker-*.yaml"), key=lambda path: int(path.stem.split("-")[1]))
            self.worker_urls = [_worker_url(path) for path in configs or [self.config]]

    @property
    def admin_token(self) -> str:
        return (self.dir / "var" / "admin-token").read_text().strip()

    @property
    def workers(self) -> int:
        return len(self.worker_urls)

    def worker_config(self, k: int = 1) -> Path:
        """Worker k's broker.yaml (DIR/worker-k.yaml; DIR/broker.yaml is worker 1's)."""
        self._check(k)
        path = self.dir / f"worker-{k}.yaml"
        return path if path.exists() else self.config  # a DIR of the one-worker cluster-up

    def _pid_file(self, k: int) -> Path:
        path = self.dir / f"worker-{k}.pid"
        return path if k != 1 or path.exists() else self.dir / "worker.pid"

    def _check(self, k: int) -> None:
        if not 1 <= k <= self.workers:
            raise ValueError(f"no worker {k}: the cluster has {self.workers}")

    @property
    def worker_pids(self) -> list[int]:
        """The workers' PIDs now (start_worker changes them), worker 1 first."""
        return [int(self._pid_file(k).read_text()) for k in range(1, self.workers + 1)]

    @property
    def worker_pid(self) -> int:
        return self.worker_pids[0]

    def otactl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "otactl"), "--config", str(self.config), "--catalog", str(self.catalog),
                               *args], capture_output=True, text=True, timeout=60)

    def otactl_at(self, k: int, *args: str) -> subprocess.CompletedProcess[str]:
        """otactl against worker k's admin API. otactl finds "the" server through data_dir's
        server.json, which the workers share (the last one to start wrote it): it gets a
        data_dir of its own, DIR/otactl/worker-k, whose server.json names worker k and whose
        other entries link to the shared data_dir's (database, admin token, keys)."""
        self._check(k)
        view = self.dir / "otactl" / f"worker-{k}"
        view.mkdir(parents=True, exist_ok=True)
        shared = self.dir / "var"
        for entry in shared.iterdir():
            link = view / entry.name
            if entry.name in ("server.json", "ota-server.lock") or link.is_symlink() or link.exists():
                continue
            link.symlink_to(entry)
        info = {"http_url": self.worker_urls[k - 1], "pid": self.worker_pids[k - 1], "catalog": str(self.catalog)}
        (view / "server.json").write_text(json.dumps(info))
        return subprocess.run([str(BIN / "otactl"), "--config", str(self.worker_config(k)), "--catalog",
                               str(self.catalog), "--data-dir", str(view), *args],
                              capture_output=True, text=True, timeout=60)

    def rabbitmqctl(self, node: int, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(ROOT / "scripts" / "cluster" / "rabbitmq-nodes"), "ctl", str(self.dir / "rabbit"),
                               str(node), *args], capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)

    def kill_worker(self, k: int = 1) -> None:
        """SIGKILL worker k: a crash, nothing written on the way out."""
        self._check(k)
        pid = self.worker_pids[k - 1]
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

    def start_worker(self, k: int = 1) -> None:
        """Start worker k again as cluster-up does, with its config, appending to its log
        (cluster-down stops it by its PID file)."""
        self._check(k)
        log_path = self.dir / f"worker-{k}.log"
        if not log_path.exists() and k == 1 and (self.dir / "worker.log").exists():
            log_path = self.dir / "worker.log"  # a DIR of the one-worker cluster-up
        with open(log_path, "ab") as log:  # the child has its own copy
            process = subprocess.Popen([str(BIN / "ota-server"), "--config", str(self.worker_config(k))],
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        (self.dir / f"worker-{k}.pid").write_text(f"{process.pid}\n")
        if k == 1:
            (self.dir / "worker.pid").write_text(f"{process.pid}\n")

    async def admin(self, path: str, worker: int | None = None) -> Any:
        """GET an admin API path through nginx, or straight from worker `worker` (1-based)."""
        if worker is not None:
            self._check(worker)
        base = self.http_url if worker is None else self.worker_urls[worker - 1]
        async with aiohttp.ClientSession() as session:
            async with session.get(base + path,
                                   headers={"Authorization": f"Bearer {self.admin_token}"}) as response:
                assert response.status == 200, (path, response.status, await response.text())
                return await response.json()

    async def metrics(self) -> dict[str, float]:
        """Every worker's /metrics, unlabelled series by name, summed over the workers as
        Prometheus's sum() would: each worker counts only what it did itself (its pushes, its
        connects), so one worker's page says nothing of the others'."""
        totals: dict[str, float] = {}
        async with aiohttp.ClientSession() as session:
            for url in self.worker_urls:
                async with session.get(url + "/metrics",
                                       headers={"Authorization": f"Bearer {self.admin_token}"}) as response:
                    assert response.status == 200, (url, response.status)
                    text = await response.text()
                for line in text.splitlines():
                    name, _, value = line.partition(" ")
                    if line and not line.startswith("#") and "{" not in name:
                        totals[name] = totals.get(name, 0.0) + float(value)
        return totals

    async def reload(self) -> None:
        result = await asyncio.to_thread(self.otactl, "reload")
        assert result.returncode == 0, result.stdout + result.stderr


class CannotInstall(Exception):
    """RabbitMQ, PostgreSQL or nginx is missing and cannot be installed here (cluster-up's exit
    status 3)."""


def cluster_up(root: Path, catalog: Path, workers: int = 2) -> Cluster:
    """`scripts/cluster-up --dir root/cluster --catalog catalog --workers N`, its printed lines
    parsed."""
    result = subprocess.run([str(ROOT / "scripts" / "cluster-up"), "--dir", str(root / "cluster"),
                             "--catalog", str(catalog), "--workers", str(workers)],
                            capture_output=True, text=True, timeout=300)
    if result.returncode == 3:
        raise CannotInstall(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "exit status 3")
    if result.returncode != 0:
        raise RuntimeError(f"cluster-up failed ({result.returncode}): {result.stderr[-3000:]}")
    lines = dict(line.split("=", 1) for line in result.stdout.splitlines() if line.startswith("OTA_CLUSTER_"))
    folder = root / "cluster"
    count = len(lines["OTA_CLUSTER_WORKERS"].split(","))
    return Cluster(dir=folder, mqtt_ports=[int(a.rsplit(":", 1)[1]) for a in lines["OTA_CLUSTER_MQTT"].split(",")],
                   http_url=lines["OTA_CLUSTER_HTTP"], config=Path(lines["OTA_CLUSTER_CONFIG"]),
                   catalog=Path(lines["OTA_CLUSTER_CATALOG"]), down=lines["OTA_CLUSTER_DOWN"], lines=lines,
                   worker_urls=[_worker_url(folder / f"worker-{k}.yaml") for k in range(1, count + 1)],
                   postgres=lines["OTA_CLUSTER_POSTGRES"])


def _worker_url(config: Path) -> str:
    """http://HOST:PORT of a worker's config (its http.bind)."""
    options = yaml.safe_load(config.read_text())["plugins"]["broker_plugin.ota.OtaPlugin"]
    return f"http://{options['http']['bind']}"


def cluster_down(cluster: Cluster) -> None:
    subprocess.run(cluster.down, shell=True, capture_output=True, timeout=120)


class ResilientDevice:
    """A device that upgrades over HTTP however often its connections go: MQTT with
    clean_session=0 and a stable client id, to the next node when one goes; downloads resumed
    with Range after any failure. `steps` records what it did, for the test's verdict."""

    def __init__(self, cluster: Cluster, name: str, first_node: int, *, version: str = "1.0.0",
                 start_after: float = 0.0, install_seconds: float = 0.0) -> None:
        self.cluster, self.name = cluster, name
        self.start_after = start_after
        self.install_seconds = install_seconds  # between the download and its report, connected
        self.node = first_node
        self.version = version
        self.secret = device_secret(name)
        self.client_id, self.password = signed_login(self.secret, name, PK, None)
        self.steps: list[str] = []
        self.connects = 0
        self.pushes: list[dict[str, Any]] = []

    @property
    def upgrade_topic(self) -> str:
        return f"/ota/device/upgrade/{PK}/{self.name}"

    async def run(self, target: str, timeout: float = 120) -> None:
        await asyncio.sleep(self.start_after)
        deadline = time.monotonic() + timeout
        image = b""
        offer: dict[str, Any] | None = None
        announced = False  # the new version reported and acknowledged
        while not announced:
            assert time.monotonic() < deadline, f"{self.name}: not upgraded in {timeout:g} s: {self.steps[-8:]}"
            port = self.cluster.mqtt_ports[self.node % len(self.cluster.mqtt_ports)]
            try:
                async with aiomqtt.Client("127.0.0.1", port, identifier=self.client_id,
                                          username=f"{self.name}&{PK}", password=self.password,
                                          clean_session=False, timeout=10) as client:
                    self.connects += 1
                    self.steps.append(f"connected to {port}")
                    await client.subscribe(self.upgrade_topic, qos=1)
                    if self.version != target:
                        offer = await self._offer(client, offer)
                        if len(image) < int(offer["size"]):
                            image = await self._download(offer, image)
                            await asyncio.sleep(self.install_seconds)  # a node may go meanwhile
                        await self._publish(client, f"/ota/device/progress/{PK}/{self.name}",
                                            {"id": "2", "params": {"step": "100", "desc": ""}})
                        self.version = offer["version"]  # flashed: from now on it runs the new one
                    await self._publish(client, f"/ota/device/inform/{PK}/{self.name}",
                                        {"id": "3", "params": {"version": self.version}})
                    announced = True
                    self.steps.append(f"upgraded to {self.version}")
            except aiomqtt.MqttError as exc:
                self.steps.append(f"MQTT on {port}: {exc}")
                self.node += 1  # the other node
                await asyncio.sleep(0.3)

    async def _offer(self, client: aiomqtt.Client, offer: dict[str, Any] | None) -> dict[str, Any]:
        """The push (kept from an earlier connection, or asked for by reporting the version)."""
        while offer is None:
            await self._publish(client, f"/ota/device/inform/{PK}/{self.name}",
                                {"id": "1", "params": {"version": self.version}})
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    async for message in client.messages:
                        if str(message.topic) == self.upgrade_topic:
                            offer = json.loads(bytes(message.payload))["data"]
                            self.pushes.append(offer)
                            break
        return offer

    async def _publish(self, client: aiomqtt.Client, topic: str, payload: dict[str, Any]) -> None:
        await client.publish(topic, json.dumps(payload), qos=1)
        self.steps.append(f"published {topic.split('/')[3]}")

    async def _download(self, offer: dict[str, Any], image: bytes) -> bytes:
        """The whole file, resumed with Range after each failure (the worker or nginx gone)."""
        url = yarl.URL(offer["url"], encoded=True)
        async with aiohttp.ClientSession() as session:
            for attempt in range(200):
                try:
                    headers = {"Range": f"bytes={len(image)}-"} if image else {}
                    async with session.get(url, headers=headers) as response:
                        if response.status not in (200, 206):
                            raise aiohttp.ClientResponseError(response.request_info, (), status=response.status)
                        if response.status == 200:
                            image = b""
                        image += await response.read()
                    if len(image) >= int(offer["size"]):
                        break
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    self.steps.append(f"download attempt {attempt}: {exc!r}"[:200])
                    await asyncio.sleep(0.3)
        digest = hashlib.sha256 if str(offer.get("signMethod", "")).upper() == "SHA256" else hashlib.md5
        assert digest(image).hexdigest() == offer["sign"], f"{self.name}: image does not match its sign"
        return image
