"""Cluster benchmark: the cluster mode (docs/cluster.md) beside the embedded ota-server, in one run.

Everything runs on this machine over 127.0.0.1. The cluster is `scripts/cluster-up --workers N`
(two RabbitMQ nodes with MQTT, PostgreSQL as the workers' shared journal, N OTA workers sharing
the fleet, nginx with the X-Accel-Redirect hand-off) in a temporary folder, stopped with
`scripts/cluster-down`, once per N of `--workers` (default 1,2,3) and per part; the embedded
server, mosquitto and nginx are started as anchors.py starts them. The measurements are
anchors.py's and fleet.py's, imported, not copied:

1. Control plane: "version report -> upgrade push" round trips at QoS 1 by 50 active devices
   while N idle devices (default 1,000) sit connected; anchors.py's client processes
   (anchor_lib.py). Embedded ota-server; the cluster with each worker count, with every client
   process's devices spread over both nodes' MQTT ports (device i on node i % 2); mosquitto +
   anchors.py's paho responder as the reference. Round trips/s, p50/p99, the idle fleet's
   connect rate, CPU of each process over the window (PostgreSQL and nginx as process trees).
2. Range downloads: one random file (default 512 MiB, cached under /tmp/ota-anchor-cache; the
   cluster worker's default limits.max_file_mb is 1000) fetched with wrk as anchors.py does
   (random aligned 1 MiB and 64 KiB ranges, whole file) through the signed URL a device is
   pushed: (a) the embedded server sending it, (b) the cluster (the first --workers count):
   nginx asks a worker for every request and sends the bytes after its X-Accel-Redirect, (c)
   plain nginx serving the file (the anchor).
3. The fleet (fleet.py's method, default 10,000 devices, 1 MiB image): every device connects,
   reports 1.0.0, takes the push of a batch started by a reload, downloads in 64 KiB Range
   requests, reports progress and 1.1.0. Against the embedded server and a fresh cluster per
   worker count (devices split over both nodes, downloads through nginx), each capped at
   `--fleet-timeout` (default 900 s; the batch starts when all have reported or half the cap
   has gone; at the cap the devices are stopped and the upgraded count is read from the
   database). Wall time, upgrades/s, server-side CPU per upgraded device by process group
   (/proc/PID/stat of the process trees, with their ended children: OTA workers summed,
   RabbitMQ nodes, PostgreSQL, nginx; the simulated devices apart, not server cost), peak RSS
   per worker (VmHWM), RSS per connected device (workers and nodes: before the fleet vs all
   reported), and what the journal wrote: PostgreSQL's pg_stat_database / pg_stat_user_tables
   (commits, rows inserted + updated + deleted, WAL bytes) before and after, less the idle
   rate (heartbeats, ticks) measured just before.

Prints a markdown table (cluster cells carry their ratio to the embedded server and, for the
control plane, to mosquitto) and notes; `--json PATH` keeps the raw results. A full run takes
about an hour on 2 cores (six cluster start-ups of ~25 s, the 10,000-device fleets most of it);
`--quick` (200 devices, workers 1,2) about 4 minutes. Interrupted (Ctrl-C, SIGTERM), it stops
what it started and reports what it measured.

    .venv/bin/python scripts/bench/cluster.py --quick                                  # development
    .venv/bin/python scripts/bench/cluster.py --lock /tmp/bench.lock --json /tmp/cluster.json
    .venv/bin/python scripts/bench/cluster.py --only control,fleet --workers 1,3 --devices 2000

`--lock PATH` waits for a quiet machine (no other bench lock, no pytest/hostile_clients/
device_sim process, 1-minute load average under 1.5), then holds PATH (our PID in it) for the
whole run.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import anchor_lib
import anchors as A
import fleet
from devicekit import simulator
from devicekit.loopback import ServerProcess, free_port

SCRIPTS = A.ROOT / "scripts"
OTHERS = "pytest|hostile_clients|device_sim"  # what --lock waits for


# ---------------------------------------------------------------------------- the cluster


@dataclass
class Cluster:
    """What `scripts/cluster-up --dir DIR` started, read from its printed lines and pid files."""

    dir: Path
    mqtt_ports: list[int]
    http_url: str
    workers: list[int]  # the OTA workers' PIDs, worker 1 first
    postgres: str  # the workers' shared journal (DSN)

    def pids(self) -> dict[str, list[int]]:
        """The server side by part, as the roots of process trees (cpu_of and hwm_of add their
        children): the OTA workers, the RabbitMQ nodes (beam.smp), PostgreSQL's postmaster (its
        backends), nginx's master (its workers)."""
        return {"worker": list(self.workers),
                "rabbitmq": [int(p.read_text()) for p in sorted((self.dir / "rabbit").glob("n*/pid"))],
                "postgres": [int((self.dir / "postgres" / "postmaster.pid").read_text().split()[0])],
                "nginx": [int((self.dir / "nginx" / "nginx.pid").read_text())]}


@contextlib.contextmanager
def cluster_up(folder: Path, catalog: Path, mirror: bool = True, workers: int = 1) -> Iterator[Cluster]:
    """`scripts/cluster-up --dir folder --catalog catalog --workers N`; `scripts/cluster-down folder`
    on the way out. `mirror=False`: without the mirroring of queues on both nodes that cluster-up's
    policies ask for."""
    try:
        done = subprocess.run([str(SCRIPTS / "cluster-up"), "--dir", str(folder), "--catalog", str(catalog),
                               "--workers", str(workers)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"cluster-up failed ({done.returncode}): {done.stderr[-2000:]}")
        lines = dict(line.split("=", 1) for line in done.stdout.splitlines() if line.startswith("OTA_CLUSTER_"))
        ports = [int(address.rsplit(":", 1)[1]) for address in lines["OTA_CLUSTER_MQTT"].split(",")]
        cluster = Cluster(folder, ports, lines["OTA_CLUSTER_HTTP"],
                          [int(pid) for pid in lines["OTA_CLUSTER_WORKERS"].split(",")], lines["OTA_CLUSTER_POSTGRES"])
        if not mirror:
            drop_mirroring(folder / "rabbit")
        for pid in cluster.pids()["rabbitmq"] + cluster.pids()["worker"]:
            A.wait_quiet(pid, limit=60)  # the nodes settle for a few seconds after they start
        yield cluster
    finally:
        with signals_held():
            try:  # nodes holding 10,000 sessions take minutes to stop
                subprocess.run([str(SCRIPTS / "cluster-down"), str(folder)], capture_output=True, timeout=900)
            except subprocess.TimeoutExpired:
                print(f"# cluster-down {folder} did not finish in 900 s: check pgrep -af 'beam.smp|postgres -D'",
                      file=sys.stderr)


def drop_mirroring(rabbit: Path) -> None:
    """cluster-up's policies again without their `ha-*` keys: each queue on one node only."""
    def ctl(*args: str) -> str:
        return subprocess.run([str(SCRIPTS / "cluster" / "rabbitmq-nodes"), "ctl", str(rabbit), "1", "-q", *args],
                              capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL, timeout=120).stdout
    for policy in json.loads(ctl("list_policies", "--formatter", "json")):
        definition = {k: v for k, v in json.loads(policy["definition"]).items() if not k.startswith("ha-")}
        if definition:
            ctl("set_policy", policy["name"], policy["pattern"], json.dumps(definition), "--apply-to",
                policy["apply-to"], "--priority", str(policy["priority"]))
        else:
            ctl("clear_policy", policy["name"])


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGTERM and SIGINT wait until the block is done: a cleanup half done leaves processes behind."""
    held = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


@contextlib.contextmanager
def device_processes(count: int) -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    """The processes the simulated fleet runs in (simulator.run_fleet_split's pool). Killed if we
    leave early: a device waiting on a dead connection would keep them until its timeout."""
    pool = concurrent.futures.ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield pool
    except BaseException:
        for process in list(pool._processes.values()):  # no public way to stop them before 3.14
            process.kill()
        raise
    finally:
        pool.shutdown(cancel_futures=True)


def nginx_figures(cluster: Cluster) -> dict[str, float]:
    """The worker's ota_nginx_* series from /metrics (through nginx): hand-offs settled and
    abandoned, log lines ignored."""
    token = (cluster.dir / "var" / "admin-token").read_text().strip()
    request = urllib.request.Request(cluster.http_url + "/metrics", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback
        text = response.read().decode()
    return {name: float(value) for name, value in (line.split()[:2] for line in text.splitlines()
                                                    if line.startswith("ota_nginx_"))}


class Ours:
    """From now on: how much CPU the whole machine spent beyond the server side (given), this
    process and the children it waited for (wrk, the simulated devices): someone else's load."""

    def __init__(self) -> None:
        self.machine, self.own, self.children = A.machine_busy_seconds(), time.process_time(), \
            fleet.children_cpu_seconds()

    def others(self, server_cpu: float) -> float:
        return (A.machine_busy_seconds() - self.machine - server_cpu - (time.process_time() - self.own)
                - (fleet.children_cpu_seconds() - self.children))


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listening socket's accept queue was
    full (whole machine, since boot): a server that cannot keep up with new connections."""
    head, values = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()[:2]]
    return int(dict(zip(head, values))["ListenOverflows"])


def others_running() -> list[str]:
    """Tests or simulators someone else started (the processes the bench lock keeps out)."""
    found = subprocess.run(["pgrep", "-af", OTHERS], capture_output=True, text=True).stdout.splitlines()
    return [line[:160] for line in found if int(line.split()[0]) != os.getpid()]


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, now (a PostgreSQL postmaster and its backends)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(parents.get(found[-1], []))
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of `pid` and every process below it, with what their children
    that ended used (cutime + cstime): a PostgreSQL backend that came and went is counted."""
    total = 0.0
    for one in descendants(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def cpu_of(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds used so far by each part: the process trees under its PIDs (/proc/PID/stat)."""
    return {part: sum(tree_cpu(pid) for pid in group) for part, group in pids.items()}


def hwm_of(pids: dict[str, list[int]]) -> dict[str, float]:
    """Peak RSS (VmHWM, MiB) of each part, summed over its processes (and the trees under them)."""
    return {part: sum(A.proc_status(one, "VmHWM") for pid in group for one in descendants(pid))
            for part, group in pids.items()}


def rss_of(pids: list[int]) -> list[float]:
    """RSS now (VmRSS, MiB) of each process."""
    return [A.proc_status(pid, "VmRSS") for pid in pids]


class Pid:
    """A process cluster-up started, as much of a Popen as anchors.control_plane asks for."""

    def __init__(self, pid: int) -> None:
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        return None if Path(f"/proc/{self.pid}").exists() else 1


def spread_client_role(ports: list[int]) -> Any:
    """anchors.client_role, but the client process is `cluster.py client`: anchor_lib's role with
    device i connected to node i % len(ports)."""
    def client_role(children: A.Children, role: str, port: int, *extra: str, stdin: int | None = None) \
            -> subprocess.Popen[str]:
        return children.start([A.PYTHON, str(Path(__file__).resolve()), "client", ",".join(map(str, ports)), role, "--port", str(port),
                               "--pk", A.PK, "--product-secret", A.PRODUCT_SECRET, *extra],
                              stdin=stdin, stdout=subprocess.PIPE, text=True)
    return client_role


def client_main(ports: list[int], argv: list[str]) -> None:
    """`cluster.py client P1,P2 ROLE ARGS...`: anchor_lib's main with its devices spread over the nodes."""
    connect = anchor_lib.open_device

    async def open_on_node(port: int, pk: str, dn: str, *rest: Any) -> Any:
        return await connect(ports[int(dn.rsplit("-", 1)[1]) % len(ports)], pk, dn, *rest)

    anchor_lib.open_device = open_on_node
    sys.argv = [anchor_lib.__file__, *argv]
    anchor_lib.main()


# ---------------------------------------------------------------------------- 1 + 2: on the anchors' catalog


def cluster_control(children: A.Children, cluster: Cluster, args: argparse.Namespace) -> list[dict[str, Any]]:
    """anchors.py's control plane against the cluster: its client processes spread their devices
    over the nodes; CPU watched over the round-trip window: each worker, each node, PostgreSQL
    (the postmaster's tree) and nginx (master and workers)."""
    pids = cluster.pids()
    worker = A.Server(Pid(pids["worker"][0]), cluster.mqtt_ports[0])  # type: ignore[arg-type]
    watch = {**{f"worker{k + 1}": pid for k, pid in enumerate(pids["worker"])},
             **{f"rabbit{k + 1}": pid for k, pid in enumerate(pids["rabbitmq"])},
             "postgres": pids["postgres"][0], "nginx": pids["nginx"][0]}
    trees, one = {pids["postgres"][0], pids["nginx"][0]}, A.cpu_seconds

    def cpu_seconds(pid: int) -> float:  # anchors.py watches one process; these two are trees
        return tree_cpu(pid) if pid in trees else one(pid)

    with mock.patch.object(A, "client_role", spread_client_role(cluster.mqtt_ports)), \
            mock.patch.object(A, "cpu_seconds", cpu_seconds):
        return A.control_plane(children, worker, args, watch)


def downloads(children: A.Children, tools: A.Tools, root: Path, package: Path, cluster: Cluster,
              args: argparse.Namespace) -> dict[str, Any]:
    """anchors.py's wrk cases, each against the embedded server, the cluster (through its nginx)
    and plain nginx in turn; the two servers' URLs are the ones a device is pushed."""
    ours = A.start_ours(children, root / "ours", package)  # the control plane's data_dir: hashes cached
    nginx = A.start_nginx(children, tools, root, package.parent, args.nginx_workers)
    try:
        urls = {"embedded": asyncio.run(A.signed_url(ours.port))[0],
                "cluster": asyncio.run(A.signed_url(cluster.mqtt_ports[1]))[0],
                "nginx": f"http://127.0.0.1:{nginx.port}/{package.name}"}
        with package.open("rb") as f:
            f.seek(A.MIB)
            sample = f.read(4096)
        for url in urls.values():
            A.check_range(url, sample, A.MIB)
        pids = {"embedded": {"ota-server": [ours.pid]}, "cluster": cluster.pids(),
                "nginx": {"nginx": A.tree_pids(nginx.pid)}}
        rss = {"embedded": [(ours.pid, False)], "nginx": [(nginx.pid, True)],
               "cluster": [(pids["cluster"]["worker"][0], False), (pids["cluster"]["nginx"][0], True)]}
        results: dict[str, Any] = {"urls": urls, "cases": {}}
        for name, chunk in A.CASES:
            results["cases"][name] = {}
            for target, url in urls.items():
                before, ours_before = cpu_of(pids[target]), Ours()
                with contextlib.ExitStack() as stack:
                    samplers = [stack.enter_context(A.RssSampler(pid, tree)) for pid, tree in rss[target]]
                    run = A.run_wrk(tools, root, url, package.stat().st_size, chunk, args)
                run["cpu_s"] = {part: now - before[part] for part, now in cpu_of(pids[target]).items()}
                run["others_pct"] = 100 * ours_before.others(sum(run["cpu_s"].values())) / run["seconds"]
                run["rss_peak_mib"] = sum(sampler.peak for sampler in samplers)
                results["cases"][name][target] = run
            results["cases"][name]["cluster"]["nginx_metrics"] = nginx_figures(cluster)
            print(f"#   {name}: " + ", ".join(f"{target} {run['mb_per_s']:.0f} MB/s"
                                              for target, run in results["cases"][name].items()), file=sys.stderr)
        return results
    finally:
        children.stop(nginx.process)
        children.stop(ours.process, timeout=60)


# ---------------------------------------------------------------------------- 3: the fleet


UPGRADED = "SELECT count(*) FROM jobs WHERE batch = 'bench' AND state = 'succeeded'"
PG_STATS = """SELECT xact_commit, tup_inserted, tup_updated, tup_deleted,
                     pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8 AS wal_bytes
              FROM pg_stat_database WHERE datname = current_database()"""
PG_TABLES = "SELECT relname, n_tup_ins + n_tup_upd + n_tup_del AS rows FROM pg_stat_user_tables"


class FleetDb:
    """Where the bench reads the fleet's progress: the embedded server's SQLite (root/var), or
    the cluster's PostgreSQL, whose statistics also count what the journal wrote."""

    def __init__(self, root: Path, dsn: str | None = None) -> None:
        self.root, self.dsn, self.conn, self.queries = root, dsn, None, 0

    async def __aenter__(self) -> FleetDb:
        if self.dsn:
            import asyncpg  # the cluster's dependency; the embedded runs do not need it
            self.conn = await asyncpg.connect(self.dsn)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.conn is not None:
            await self.conn.close()

    async def scalar(self, sql: str) -> int:
        if self.conn is None:
            return (await asyncio.to_thread(fleet.db_scalar, self.root, sql))[0]
        self.queries += 1  # each a transaction of ours, not the journal's
        return await self.conn.fetchval(sql)

    async def stats(self) -> dict[str, Any] | None:
        """PostgreSQL's counters now: commits, rows inserted/updated/deleted (all tables and per
        table), WAL bytes; None on SQLite."""
        if self.conn is None:
            return None
        row = dict(await self.conn.fetchrow(PG_STATS))
        row["tables"] = {r["relname"]: r["rows"] for r in await self.conn.fetch(PG_TABLES)}
        self.queries += 2
        row.update(at=time.perf_counter(), ours=self.queries)
        return row


def pg_delta(before: dict[str, Any], after: dict[str, Any], idle: dict[str, float]) -> dict[str, Any]:
    """What the journal wrote between two readings, less the idle rate (`idle`: per second, the
    workers' heartbeats and the coordinator's ticks) and less our own queries' commits."""
    seconds = after["at"] - before["at"]
    out = {key: after[key] - before[key] - idle.get(key, 0.0) * seconds
           for key in ("xact_commit", "tup_inserted", "tup_updated", "tup_deleted", "wal_bytes")}
    out["xact_commit"] -= after["ours"] - before["ours"]
    out["rows"] = out["tup_inserted"] + out["tup_updated"] + out["tup_deleted"]
    out["tables"] = {name: rows - before["tables"].get(name, 0) - idle.get("table:" + name, 0.0) * seconds
                     for name, rows in after["tables"].items()}
    out["seconds"] = seconds
    return out


def pg_rate(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Per second between two idle readings: the background the runs' figures leave out."""
    seconds = after["at"] - before["at"]
    rate = {key: (after[key] - before[key]) / seconds
            for key in ("xact_commit", "tup_inserted", "tup_updated", "tup_deleted", "wal_bytes")}
    rate["xact_commit"] -= (after["ours"] - before["ours"]) / seconds
    rate.update({"table:" + name: (rows - before["tables"].get(name, 0)) / seconds
                 for name, rows in after["tables"].items()})
    return rate


def kill_pool(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    for process in list(pool._processes.values()):  # no public way to stop them before 3.14
        with contextlib.suppress(OSError):
            process.kill()


def reload_at(url: str, token: str) -> None:
    """POST /admin/api/reload (through the cluster's nginx, which passes it on to the coordinator)."""
    request = urllib.request.Request(f"{url}/admin/api/reload", method="POST",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=300) as response:  # noqa: S310 - loopback
        assert response.status == 200


async def upgrade_fleet(root: Path, ports: list[int], pids: dict[str, list[int]], args: argparse.Namespace,
                        db: FleetDb, reload: Any) -> dict[str, Any]:
    """fleet.py's run, against a server already running on fleet.write_config's catalog in `root`,
    with device i on MQTT port i % len(ports). Capped at args.fleet_timeout from the first
    connect: the batch starts when every device has reported (or half the cap has gone), and
    what is not upgraded at the cap counts as not done (the devices are stopped)."""
    cfgs = [simulator.DeviceConfig(device_name=f"bench-{i:05d}", product_key="a1Bench", product_secret="bench-secret",
                                   mqtt_port=ports[i % len(ports)], chunk=args.chunk, timeout=args.timeout)
            for i in range(args.devices)]
    servers = pids.get("worker") or pids["ota-server"]  # the processes that hold devices in memory
    brokers = [one for pid in pids.get("rabbitmq", []) for one in descendants(pid)]
    idle: dict[str, float] = {}
    first = await db.stats()
    if first is not None:  # the background write rate, to take off the run's figures
        await asyncio.sleep(args.baseline)
        stats_before = await db.stats()
        idle = pg_rate(first, stats_before)
    else:
        stats_before = None
    rss_idle, brokers_idle = rss_of(servers), sum(rss_of(brokers))
    cpu_before, ours_before, overflows = cpu_of(pids), Ours(), listen_overflows()
    timeline: list[tuple[float, int]] = []
    results = None
    with device_processes(args.procs) as pool:
        started = time.perf_counter()
        deadline = started + args.fleet_timeout
        run = asyncio.ensure_future(simulator.run_fleet_split(cfgs, args.concurrency, args.procs, pool))
        reported = 0
        while not run.done() and time.perf_counter() < started + args.fleet_timeout / 2:
            reported = await db.scalar("SELECT count(*) FROM device_versions")
            if reported >= args.devices:
                break
            await asyncio.sleep(0.5)
        connected = time.perf_counter() - started
        rss_connected, brokers_connected = rss_of(servers), sum(rss_of(brokers))
        stats_connected = await db.stats()
        fleet.add_batch(root, "http")
        batch_started = time.time()
        await asyncio.to_thread(reload)
        reload_seconds = time.time() - batch_started
        while not run.done() and time.perf_counter() < deadline:
            await asyncio.wait({run}, timeout=min(5.0, max(0.1, deadline - time.perf_counter())))
            timeline.append((round(time.time() - batch_started, 1), await db.scalar(UPGRADED)))
        timed_out = not run.done()
        if timed_out:
            kill_pool(pool)
        wall = time.perf_counter() - started
        cpu = {part: now - cpu_before[part] for part, now in cpu_of(pids).items()}
        hwm = hwm_of(pids)
        worker_hwm = [A.proc_status(pid, "VmHWM") for pid in servers]
        try:
            results = await run
        except Exception:  # noqa: BLE001 - the processes we killed
            results = None
    upgraded_db = await db.scalar(UPGRADED)
    stats_after = None
    if stats_before is not None:
        await asyncio.sleep(args.settle)  # backends report their counters within a second or so
        stats_after = await db.stats()
    if results is not None:
        upgraded = sum(r.outcome == "upgraded" for r in results)
        pushes = sorted(r.offer_at - batch_started for r in results if r.offer_at is not None)
        times = sorted(r.seconds for r in results)
        reasons = Counter(re.sub(r"(?<!HTTP )(?<!HTTP \d)(?<!HTTP \d\d)\d+", "N", f"{r.outcome} {r.reason}")[:110] for r in results
                          if r.outcome != "upgraded")
    else:
        upgraded, pushes, times = upgraded_db, [], []
        reasons = Counter({f"not upgraded within --fleet-timeout {args.fleet_timeout:g} s": args.devices - upgraded})
    nan = float("nan")
    per = 1000 / upgraded if upgraded else nan
    server_cpu = {part: seconds for part, seconds in cpu.items()}
    out = {
        "devices": args.devices, "workers": len(pids.get("worker", [])) or None, "upgraded": upgraded,
        "upgraded_in_db": upgraded_db, "failed": args.devices - upgraded, "timed_out": timed_out,
        "fleet_timeout_s": args.fleet_timeout, "reported_at_batch": reported,
        "wall_s": wall, "connected_s": connected, "reload_s": reload_seconds,
        "upgrades_per_s": upgraded / max(1e-9, wall - connected),
        "pushes_within_s": pushes[-1] if pushes else nan,
        "device_p50_s": times[len(times) // 2] if times else nan,
        "device_p99_s": times[int(len(times) * 0.99) - 1] if times else nan,
        "server_cpu_s": sum(server_cpu.values()), "cpu_by_part_s": server_cpu,
        "cpu_ms_per_upgrade": per * sum(server_cpu.values()),
        "cpu_ms_per_upgrade_by_part": {part: per * seconds for part, seconds in server_cpu.items()},
        "rss_peak_by_part_mib": hwm, "rss_peak_mib": sum(hwm.values()),
        "worker_rss_idle_mib": rss_idle, "worker_rss_connected_mib": rss_connected, "worker_rss_peak_mib": worker_hwm,
        "worker_kib_per_device": 1024 * (sum(rss_connected) - sum(rss_idle)) / max(1, reported),
        "rabbitmq_rss_idle_mib": brokers_idle, "rabbitmq_rss_connected_mib": brokers_connected,
        "rabbitmq_kib_per_device": 1024 * (brokers_connected - brokers_idle) / max(1, reported) if brokers else nan,
        "devices_cpu_s": fleet.children_cpu_seconds() - ours_before.children,  # the pool's, reaped above
        "others_cpu_s": ours_before.others(sum(server_cpu.values())),
        "listen_overflows": listen_overflows() - overflows,
        "failure_reasons": dict(reasons.most_common(8)), "timeline": timeline,
    }
    out["devices_cpu_ms_per_upgrade"] = per * out["devices_cpu_s"]
    if stats_before is not None and stats_connected is not None and stats_after is not None:
        out["pg"] = {"idle_per_s": idle, "connect": pg_delta(stats_before, stats_connected, idle),
                     "run": pg_delta(stats_before, stats_after, idle)}
        run_pg = out["pg"]["run"]
        out["pg_rows_per_upgrade"] = run_pg["rows"] / upgraded if upgraded else nan
        out["pg_commits_per_upgrade"] = run_pg["xact_commit"] / upgraded if upgraded else nan
        out["pg_wal_kib_per_upgrade"] = run_pg["wal_bytes"] / 1024 / upgraded if upgraded else nan
    return out


def problems_in(paths: list[Path], pattern: str, skip: str = "$^") -> dict[str, Any]:
    """Log entries with a line matching `pattern` (not `skip`) in these logs: how many (the lines
    of one multi-line entry share its timestamp), and the first."""
    found = [(line, lines[k + 1] if k + 1 < len(lines) else "") for path in paths if path.exists()
             for lines in [path.read_text(errors="replace").splitlines()] for k, line in enumerate(lines)
             if re.search(pattern, line) and not re.search(skip, line)]
    first = f"{found[0][0][:200]} {found[0][1].strip()[:200]}" if found else ""  # with its next line
    return {"count": len(dict.fromkeys(line[:48] for line, _ in found)), "first": first}


def fleet_embedded(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    root.mkdir()
    mqtt_port, http_port = free_port(), free_port()
    config = fleet.write_config(root, mqtt_port, http_port, args.size)
    server = ServerProcess(config, mqtt_port, log=root / "server.log", extra_args=("--log-level", "WARNING"))
    server.start(timeout=60)

    async def go() -> dict[str, Any]:
        async with FleetDb(root) as db:
            return await upgrade_fleet(root, [mqtt_port], {"ota-server": [server.pid]}, args, db,
                                       lambda: fleet.reload(root))
    try:
        result = asyncio.run(go())
    finally:
        server.stop()
    result["log"] = {"ota-server": problems_in([root / "server.log"], r" WARNING | ERROR |Traceback",
                                               "No data to decode MQTT packet fixed header")}
    return result


def fleet_cluster(root: Path, args: argparse.Namespace, workers: int = 1) -> dict[str, Any]:
    """A fresh cluster of `workers` workers whose folder is `root` (its data_dir root/var, its
    journal PostgreSQL)."""
    root.mkdir()
    fleet.write_config(root, 0, 0, args.size)  # the catalog; cluster-up writes its own broker.yaml here
    with cluster_up(root, root / "ota.yaml", args.mirror, workers) as cluster:
        token = (root / "var" / "admin-token").read_text().strip()

        async def go() -> dict[str, Any]:
            async with FleetDb(root, cluster.postgres) as db:
                return await upgrade_fleet(root, cluster.mqtt_ports, cluster.pids(), args, db,
                                           lambda: reload_at(cluster.http_url, token))
        result = asyncio.run(go())
    result["log"] = {
        "worker": problems_in(sorted(root.glob("worker-*.log")), r" WARNING | ERROR |Traceback"),
        "nginx": problems_in([root / "nginx" / "error.log"], r"\[(warn|error|crit|alert|emerg)\]"),
        "rabbitmq": problems_in(sorted(root.glob("rabbit/n*/log/*.log")), r"\[error\]"),
        "postgres": problems_in([root / "postgres" / "server.log"], r"ERROR|FATAL|PANIC",
                                r"administrator command|shutting down"),
    }
    return result


# ---------------------------------------------------------------------------- report


def label(workers: int) -> str:
    """The results' key of the cluster with `workers` workers."""
    return f"cluster {workers}w"


def clusters(part: dict[str, Any]) -> list[str]:
    """The cluster configurations measured in a part, in the order run."""
    return [key for key in part if key.startswith("cluster ")]


def heading(key: str) -> str:
    workers = int(key.split()[1].rstrip("w"))
    return f"cluster, {workers} worker{'s' if workers > 1 else ''}"


def cells(values: list[float], digits: int, base: float | None, anchor: float | None) -> list[str]:
    """Cluster cells: the value, then its ratio to the embedded server (and to the anchor)."""
    out = []
    for value in values:
        ratios = [f"{A.ratio(value, base)} emb"] if base is not None else []
        ratios += [f"{A.ratio(value, anchor)} anchor"] if anchor is not None else []
        out.append(A.fmt(value, digits) + (f" ({', '.join(ratios)})" if ratios and value == value else ""))
    return out


def row(label_: str, emb: float | str | None, clu: list[Any], anchor: float | None, width: int,
        digits: int = 0, ratios: bool = True) -> tuple[str, ...]:
    """A row: embedded, one cell per cluster configuration, anchor, embedded/anchor."""
    if isinstance(emb, str) or emb is None or not ratios:
        texts = [v if isinstance(v, str) else A.fmt(v, digits) for v in clu]
        first = emb if isinstance(emb, str) else ("" if emb is None else A.fmt(emb, digits))
        return (label_, first, *texts, *[""] * (width - len(clu)),
                A.fmt(anchor, digits) if anchor is not None else "", "")
    return (label_, A.fmt(emb, digits), *cells(clu, digits, emb, anchor), *[""] * (width - len(clu)),
            A.fmt(anchor, digits) if anchor is not None else "", A.ratio(emb, anchor) if anchor is not None else "")


def control_rows(results: dict[str, Any], keys: list[str], width: int) -> Iterator[tuple[str, ...]]:
    control = results["control"]
    for k, (emb, mos) in enumerate(zip(control["ours"], control["mosquitto"])):
        clu = [control[key][k] for key in keys]
        n = f"{emb['idle']:,} idle"
        yield row(f"round trips/s, 50 active + {n}", emb["per_second"], [c["per_second"] for c in clu],
                  mos["per_second"], width)
        yield row(f"p50 round trip ms, {n}", emb["p50_ms"], [c["p50_ms"] for c in clu], mos["p50_ms"], width, 1)
        yield row(f"p99 round trip ms, {n}", emb["p99_ms"], [c["p99_ms"] for c in clu], mos["p99_ms"], width, 1)
        yield row(f"idle connects/s (CONNECT + SUBSCRIBE), {n}", emb["connect"]["per_second"],
                  [c["connect"]["per_second"] for c in clu], mos["connect"]["per_second"], width)
        yield row("server CPU, % of a core, round-trip window", server_pct(emb), [server_pct(c) for c in clu],
                  server_pct(mos), width)
        yield row("server CPU ms per round trip", cpu_ms_per_trip(emb), [cpu_ms_per_trip(c) for c in clu],
                  cpu_ms_per_trip(mos), width, 2)


def server_pct(row_: dict[str, Any]) -> float:
    return sum(pct for name, pct in row_.get("cpu_pct", {}).items() if name != "whole machine")


def cpu_ms_per_trip(row_: dict[str, Any]) -> float:
    return 10 * server_pct(row_) / row_["per_second"] if row_["per_second"] else float("nan")


def data_rows(results: dict[str, Any], width: int) -> Iterator[tuple[str, ...]]:
    cases = results["data"]["cases"]
    for name, _ in A.CASES:
        emb, clu, nginx = (cases[name][target] for target in ("embedded", "cluster", "nginx"))
        yield row(f"{name}: MB/s", emb["mb_per_s"], [clu["mb_per_s"]], nginx["mb_per_s"], width)
        if name != "whole file":
            yield row(f"{name}: requests/s", emb["req_per_s"], [clu["req_per_s"]], nginx["req_per_s"], width)
    peak = {target: max(cases[name][target]["rss_peak_mib"] for name in cases) for target in ("embedded", "cluster",
                                                                                               "nginx")}
    yield row("server RSS peak MiB (cluster: worker + nginx)", peak["embedded"], [peak["cluster"]], peak["nginx"],
              width)


def fleet_rows(results: dict[str, Any], keys: list[str], width: int) -> Iterator[tuple[str, ...]]:
    runs = results["fleet"]
    emb = runs.get("embedded")
    clu = [runs[key] for key in keys]
    nan = float("nan")

    def done(run: dict[str, Any]) -> str:
        text = f"{run['upgraded']:,} / {run['devices']:,}"
        return text + (f" (cap {run['fleet_timeout_s']:g} s reached)" if run.get("timed_out") else "")

    yield row("upgraded / devices", done(emb) if emb else "", [done(c) for c in clu], None, width)
    rows = (("wall time s, first connect to last upgrade (or the cap)", "wall_s", 1),
            ("all connected and reported after s", "connected_s", 1),
            ("reload answered in s", "reload_s", 2),
            ("pushes all received within s of the reload", "pushes_within_s", 1),
            ("upgrades/s after the batch started", "upgrades_per_s", 1),
            ("device time p50 s", "device_p50_s", 1), ("device time p99 s", "device_p99_s", 1),
            ("server CPU s", "server_cpu_s", 1), ("**server CPU ms per upgraded device**", "cpu_ms_per_upgrade", 1))
    for text, key, digits in rows:
        yield row(text, emb[key] if emb else None, [c[key] for c in clu], None, width, digits)
    for part, text in (("worker", "  of which OTA workers (summed)"), ("rabbitmq", "  of which RabbitMQ nodes"),
                       ("postgres", "  of which PostgreSQL"), ("nginx", "  of which nginx")):
        yield row(text, None, [c["cpu_ms_per_upgrade_by_part"].get(part, nan) for c in clu], None, width, 1)
    yield row("simulated devices' CPU ms per upgraded device (not server cost)",
              emb["devices_cpu_ms_per_upgrade"] if emb else None, [c["devices_cpu_ms_per_upgrade"] for c in clu],
              None, width, 1, ratios=False)
    yield row("peak RSS MiB per worker (embedded: the server)", A.fmt(emb["rss_peak_mib"]) if emb else "",
              [" / ".join(A.fmt(v) for v in c["worker_rss_peak_mib"]) for c in clu], None, width)
    yield row("worker RSS KiB per connected device (summed over workers)", emb["worker_kib_per_device"] if emb else None,
              [c["worker_kib_per_device"] for c in clu], None, width, 1, ratios=False)
    yield row("RabbitMQ peak RSS MiB (both nodes) / KiB per connected device", None,
              [f"{A.fmt(c['rss_peak_by_part_mib'].get('rabbitmq', nan))} / {A.fmt(c['rabbitmq_kib_per_device'], 1)}"
               for c in clu], None, width)
    yield row("PostgreSQL rows written per upgrade / commits per upgrade / WAL KiB per upgrade", None,
              [f"{A.fmt(c.get('pg_rows_per_upgrade', nan), 1)} / {A.fmt(c.get('pg_commits_per_upgrade', nan), 2)} / "
               f"{A.fmt(c.get('pg_wal_kib_per_upgrade', nan), 1)}" for c in clu], None, width)
    yield row("connections dropped: a listener's accept queue full", emb["listen_overflows"] if emb else None,
              [c["listen_overflows"] for c in clu], None, width, ratios=False)
    yield row("CPU s of processes we did not start (should be ~0)", emb["others_cpu_s"] if emb else None,
              [c["others_cpu_s"] for c in clu], None, width, 1, ratios=False)


def notes(results: dict[str, Any]) -> list[str]:
    out = []
    for name, rows in results.get("control", {}).items():
        if not isinstance(rows, list):
            continue
        for row_ in rows:
            cpu = ", ".join(f"{part} {pct:.0f}%" for part, pct in row_.get("cpu_pct", {}).items())
            others = row_.get("cpu_pct", {}).get("whole machine", 0.0) - row_["client_cpu_pct"] - server_pct(row_)
            if others > 25:
                cpu += f" (~{others:.0f}% of a core went to processes we did not start: these figures read low)"
            errors = {**row_.get("errors", {}), **{f"connect: {k}": v for k, v in row_["connect"]["errors"].items()}}
            out.append(f"- control plane, {name}, {row_['idle']:,} idle: CPU over the window (100% = one core): "
                       f"active client {row_['client_cpu_pct']:.0f}%, {cpu}; idle fleet connected "
                       f"{row_['connect']['connected']:,}/{row_['idle']:,} in {row_['connect']['seconds']:.1f} s"
                       + (f"; errors {errors}" if errors else "") + (f"; {row_['error']}" if "error" in row_ else ""))
    for name, runs in results.get("data", {}).get("cases", {}).items():
        cpu = ", ".join(f"{target}: " + " + ".join(f"{part} {100 * seconds / run['seconds']:.0f}%"
                                                   for part, seconds in run["cpu_s"].items())
                        for target, run in runs.items())
        worker = runs["cluster"]["cpu_s"]["worker"] / max(1, runs["cluster"]["requests"])
        out.append(f"- {name}: server CPU over the window (100% = one core): {cpu}; the cluster's worker "
                   f"{1e6 * worker:.0f} us per request")
        figures = runs["cluster"].get("nginx_metrics", {})
        if figures:
            out.append("  the worker's hand-off figures after it (cumulative): " + ", ".join(
                f"{name.replace('ota_nginx_', '')} {value:,.0f}" for name, value in figures.items()))
    if results.get("data"):
        out += A.wrk_notes(results["data"])
        busy = [f"{name}, {target} {run['others_pct']:.0f}%" for name, runs in results["data"]["cases"].items()
                for target, run in runs.items() if run["others_pct"] > 25]
        if busy:
            out.append("- downloads: processes we did not start took CPU (% of a core; these figures read low): "
                       + "; ".join(busy))
    for name, run in results.get("fleet", {}).items():
        if run.get("reported_at_batch", run["devices"]) < run["devices"]:
            out.append(f"- fleet, {name}: only {run['reported_at_batch']:,} of {run['devices']:,} had reported when "
                       f"the batch started (half the cap)")
        if run.get("timeline"):
            step = max(1, len(run["timeline"]) // 8)
            out.append(f"- fleet, {name}: upgraded (s after the reload: count): " + ", ".join(
                f"{t:.0f}: {n:,}" for t, n in run["timeline"][::step]))
        pg = run.get("pg", {}).get("run")
        if pg and run["upgraded"]:
            tables = ", ".join(f"{table} {rows / run['upgraded']:.2f}" for table, rows in
                               sorted(pg["tables"].items(), key=lambda item: -item[1]) if rows / run["upgraded"] >= 0.05)
            out.append(f"- fleet, {name}: PostgreSQL rows written per upgraded device by table: {tables}; background "
                       f"(heartbeats, ticks) left out: {run['pg']['idle_per_s']['xact_commit']:.1f} commits/s")
        for reason, count in run["failure_reasons"].items():
            out.append(f"- fleet, {name}: {count} devices: {reason}")
        for part, found in run["log"].items():
            if found["count"]:
                out.append(f"- fleet, {name}: {found['count']} warning/error entries in the {part} log, first: "
                           f"{found['first']}")
    return out


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    meta = results["meta"]
    head = [f"# Cluster benchmark ({meta['date']}, ota-server at {meta['git']})", "",
            f"Machine: nproc {meta['nproc']} ({meta['cpu']}), {meta['uname']}, Python {meta['python']}; load "
            f"average at start {' '.join(meta['loadavg_at_start'])}. {meta['tools'].get('rabbitmq', '')}; "
            f"{meta['tools'].get('postgres', '')}; {meta['tools']['nginx']}; {meta['tools']['mosquitto']}; "
            f"{meta['tools']['wrk']}." if "tools" in meta else "",
            f"Cluster (scripts/cluster-up): 2 RabbitMQ nodes{'' if args.mirror else ' (no mirroring)'}, "
            f"PostgreSQL, nginx, {'/'.join(map(str, args.workers))} workers. "
            f"Control plane: {args.active} active devices, QoS 1, {args.warmup:g} s warm-up + {args.seconds:g} s. "
            f"Downloads: {args.size_mib} MiB file, wrk -t{args.threads} -c{args.connections} -d{args.http_seconds}s "
            f"(cluster: {args.workers[0]} worker{'s' if args.workers[0] > 1 else ''}). "
            f"Fleet: {args.devices:,} devices, {args.size:,} B image, {args.chunk // 1024} KiB ranges, cap "
            f"{args.fleet_timeout:g} s per configuration.", "", ""]
    wanted = [label(n) for n in args.workers]
    control, runs = results.get("control", {}), results.get("fleet", {})
    complete = {"control": {"ours", "mosquitto", *wanted} <= control.keys(),
                "data": len(results.get("data", {}).get("cases", {})) == len(A.CASES),
                "fleet": {"embedded", *wanted} <= runs.keys()}
    keys = list(dict.fromkeys(wanted + clusters(control) + clusters(runs)))
    width = len(keys)
    rows: list[tuple[str, ...]] = [("what", "embedded", *map(heading, keys), "anchor", "embedded/anchor")]

    def section(title: str) -> tuple[str, ...]:
        return (title, *[""] * (width + 3))
    measured = [key for key in keys if key in control]
    if {"ours", "mosquitto"} <= control.keys() and measured:
        rows.append(section("**control plane** (anchor: mosquitto + paho responder; in brackets: x embedded, "
                            "x anchor)"))
        rows.extend(control_rows(results, measured, width))
    if complete["data"]:
        rows.append(section(f"**Range downloads** (anchor: nginx static; cluster: nginx + X-Accel-Redirect, "
                            f"{heading(label(args.workers[0]))})"))
        rows.extend(data_rows(results, width))
    measured = [key for key in keys if key in runs]
    if runs:
        rows.append(section("**fleet upgrade** (no anchor; in brackets: x embedded)"))
        rows.extend(fleet_rows(results, measured, width))
    if "interrupted" in meta:
        head.insert(2, f"INTERRUPTED ({meta['interrupted']}): only the configurations measured whole are below; the "
                       f"rest is in --json. Whole: {', '.join(part for part in complete if complete[part]) or 'none'}.")
    others = [f"- after {phase}: someone else's tests or simulators were running: {'; '.join(found[:3])}"
              for phase, found in meta.get("others_seen", {}).items()]
    others += [f"- {name}: FAILED, no figures: {error.splitlines()[-1] if error else ''}"
               for name, error in meta.get("errors", {}).items()]
    tail = ["", *notes(results), *others, f"\nTotal run time {meta['run_seconds']:.0f} s."]
    return "\n".join(head) + A.markdown(rows) + "\n" + "\n".join(tail)


# ---------------------------------------------------------------------------- lock, main


@contextlib.contextmanager
def bench_lock(path: Path | None) -> Iterator[None]:
    """Wait for a quiet machine (no other holder of `path`, no test or simulator process, load
    average under 1.5), then hold `path` with our PID in it."""
    if path is None:
        yield
        return
    waited, started = 0, time.monotonic()
    while True:
        busy = []
        with contextlib.suppress(OSError, ValueError, IndexError):  # IndexError: empty (a flock(1) user's file)
            if Path(f"/proc/{int(path.read_text().split()[0])}").exists():
                busy.append(f"{path} held")
        if others_running():
            busy.append("tests running")
        if float(Path("/proc/loadavg").read_text().split()[0]) >= 1.5:
            busy.append("load average >= 1.5")
        if not busy:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a stale lock: its process is gone
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                continue
        if time.monotonic() - started >= waited:
            print(f"# waiting for a quiet machine: {', '.join(busy)}", file=sys.stderr)
            waited += 60
        time.sleep(5)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


FULL = {"idle": "1000", "seconds": 10.0, "warmup": 2.0, "size_mib": 512, "http_seconds": 10,
        "devices": 10000, "size": 1024 * 1024, "workers": "1,2,3", "fleet_timeout": 900.0, "baseline": 10.0,
        "settle": 5.0}
QUICK = {"idle": "100", "seconds": 3.0, "warmup": 1.0, "size_mib": 64, "http_seconds": 3,
         "devices": 200, "size": 256 * 1024, "workers": "1,2", "fleet_timeout": 120.0, "baseline": 3.0,
         "settle": 2.0}
PARTS = ("control", "data", "fleet")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 idle, 3 s windows, 64 MiB file, 200 devices with "
                                                             "a 256 KiB image, workers 1,2, a 120 s fleet cap (flags "
                                                             "given explicitly still win)")
    parser.add_argument("--only", help="run only these of control, data, fleet (comma separated)")
    parser.add_argument("--workers", help="the cluster's worker counts, one configuration each, comma separated "
                                          "(default 1,2,3); downloads use the first")
    parser.add_argument("--json", type=Path, help="write raw results here")
    parser.add_argument("--no-mirror", dest="mirror", action="store_false",
                        help="the cluster without the mirroring of every queue on both nodes that cluster-up's "
                             "policies ask for (what that replication costs)")
    parser.add_argument("--lock", type=Path, help="wait for a quiet machine, then hold this lock file (e.g. "
                                                  "/tmp/bench.lock) during the run")
    control = parser.add_argument_group("control plane (anchors.py)")
    control.add_argument("--idle", help=f"idle fleet sizes, comma separated (default {FULL['idle']})")
    control.add_argument("--active", type=int, default=50)
    control.add_argument("--seconds", type=float, help="measured window (default 10)")
    control.add_argument("--warmup", type=float, help="warm-up (default 2)")
    control.add_argument("--connect-concurrency", type=int, default=100)
    control.add_argument("--idle-procs", type=int, default=2)
    data = parser.add_argument_group("downloads (anchors.py)")
    data.add_argument("--size-mib", type=int, help="file size (default 512; at most 999 for the cluster worker's "
                                                   "default limits.max_file_mb)")
    data.add_argument("--http-seconds", type=int, help="wrk duration per case (default 10)")
    data.add_argument("--connections", type=int, default=50)
    data.add_argument("--threads", type=int, default=2)
    data.add_argument("--nginx-workers", default="auto", help="the anchor nginx's worker_processes")
    group = parser.add_argument_group("fleet (fleet.py)")
    group.add_argument("--devices", type=int, help="fleet size (default 10,000)")
    group.add_argument("--size", type=int, help="image bytes (default 1 MiB)")
    group.add_argument("--chunk", type=int, default=65536, help="bytes per Range request")
    group.add_argument("--concurrency", type=int, default=200, help="devices connecting at once")
    group.add_argument("--procs", type=int, default=2, help="processes the simulated devices are split over")
    group.add_argument("--timeout", type=float, default=1800.0,
                       help="per device, from its first connect to its new version (the cluster connects the "
                            "fleet slowly: 10,000 devices take minutes to report)")
    group.add_argument("--fleet-timeout", type=float,
                       help="cap per configuration, from the first connect (default 900 s): the batch starts when "
                            "every device has reported or half of it has gone; at the cap the devices are "
                            "stopped and what was upgraded is reported")
    group.add_argument("--baseline", type=float, help=argparse.SUPPRESS)  # s of idle PostgreSQL counters
    group.add_argument("--settle", type=float, help=argparse.SUPPRESS)  # s for the counters after a run
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.idle = [int(n) for n in str(args.idle).split(",") if n.strip()]
    args.workers = [int(n) for n in str(args.workers).split(",") if n.strip()]
    args.only = [part.strip() for part in args.only.split(",")] if args.only else list(PARTS)
    if not args.workers or min(args.workers) < 1 or set(args.only) - set(PARTS):
        parser.error("--workers: counts of 1 or more; --only: some of control, data, fleet")
    return args


def rabbitmq_version() -> str:
    done = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "rabbitmq-server"], capture_output=True, text=True)
    return f"RabbitMQ {done.stdout.strip() or '?'} (Debian package)"


def postgres_version() -> str:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    return A._first_line([str(found[-1]), "--version"]) if found else "PostgreSQL ?"


def measure(args: argparse.Namespace, results: dict[str, Any]) -> None:
    tools = A.ensure_tools()
    results["meta"]["tools"] = {**tools.versions, "rabbitmq": rabbitmq_version(), "postgres": postgres_version()}
    seen = results["meta"]["others_seen"] = {}  # phase -> tests or simulators running at its end
    failed = results["meta"]["errors"] = {}  # configuration -> why it gave no figures (the others go on)

    def done(phase: str) -> None:
        if others_running():
            seen[phase] = others_running()

    children = A.Children()
    with tempfile.TemporaryDirectory(prefix="ota-bench-cluster-") as tmp:
        root = Path(tmp)
        try:
            if "control" in args.only or "data" in args.only:
                package = A.big_file(args.size_mib * A.MIB)
                (root / "ours").mkdir()
                if "control" in args.only:
                    results["control"] = A.measure_control(children, tools, root, package, args)
                    done("control plane, embedded and mosquitto")
                for workers in args.workers:
                    data = "data" in args.only and workers == args.workers[0]
                    if "control" not in args.only and not data:
                        continue
                    folder = root / f"cluster-anchor-{workers}w"
                    folder.mkdir()
                    A.write_ours_config(folder, 0, 0, package)  # ota.yaml: a1Anchor, the big file, a pushed batch
                    try:
                        with cluster_up(folder / "cluster", folder / "ota.yaml", args.mirror, workers) as cluster:
                            if "control" in args.only:
                                print(f"# control plane: cluster, {workers} workers (MQTT {cluster.mqtt_ports})",
                                      file=sys.stderr)
                                results["control"][label(workers)] = cluster_control(children, cluster, args)
                                done(f"control plane, {label(workers)}")
                            if data:
                                print("# downloads: embedded, cluster, nginx", file=sys.stderr)
                                results["data"] = downloads(children, tools, root, package, cluster, args)
                                done("downloads")
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        failed[f"control/downloads, {label(workers)}"] = str(exc)[-600:]
                        print(f"#   FAILED: {str(exc)[-600:]}", file=sys.stderr)
            if "fleet" in args.only:
                results["fleet"] = {}
                configs = [("embedded", fleet_embedded)] + [
                    (label(workers), functools.partial(fleet_cluster, workers=workers)) for workers in args.workers]
                for name, run in configs:
                    print(f"# fleet: {args.devices:,} devices, {name}", file=sys.stderr)
                    try:
                        results["fleet"][name] = fleet_run = run(root / f"fleet-{name.replace(' ', '-')}", args)
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        failed[f"fleet, {name}"] = str(exc)[-600:]
                        print(f"#   FAILED: {str(exc)[-600:]}", file=sys.stderr)
                        continue
                    done(f"fleet, {name}")
                    print(f"#   {fleet_run['upgraded']:,} upgraded of {fleet_run['devices']:,} in "
                          f"{fleet_run['wall_s']:.1f} s{' (cap reached)' if fleet_run['timed_out'] else ''}, "
                          f"server CPU {fleet_run['server_cpu_s']:.1f} s = {fleet_run['cpu_ms_per_upgrade']:.1f} ms "
                          f"per upgrade", file=sys.stderr)
        finally:
            with signals_held():
                children.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    A.raise_nofile()  # the RabbitMQ nodes, nginx and the servers inherit it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with bench_lock(args.lock):
        started = time.perf_counter()
        results: dict[str, Any] = {"meta": {**A.machine(), "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}}
        try:
            measure(args, results)
        except (KeyboardInterrupt, SystemExit) as exc:  # after the cleanup: report what was measured
            results["meta"]["interrupted"] = f"{type(exc).__name__}({exc})"
        except Exception as exc:  # noqa: BLE001 - a failure too keeps what was measured before it
            traceback.print_exc()
            results["meta"]["interrupted"] = f"{type(exc).__name__}({str(exc)[:300]})"
        results["meta"]["run_seconds"] = time.perf_counter() - started
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(report(results, args))
    return 1 if "interrupted" in results["meta"] else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["client"]:
        client_main([int(port) for port in sys.argv[2].split(",")], sys.argv[3:])
    else:
        try:
            sys.exit(main())
        except KeyboardInterrupt:
            sys.exit(130)
