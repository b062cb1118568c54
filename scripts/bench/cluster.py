"""Cluster benchmark: the cluster mode (docs/cluster.md) beside the embedded ota-server, in one run.

Everything runs on this machine over 127.0.0.1. The cluster is `scripts/cluster-up` (two
RabbitMQ nodes with MQTT, the OTA worker, nginx with the X-Accel-Redirect hand-off) in a
temporary folder, stopped with `scripts/cluster-down`; the embedded server, mosquitto and
nginx are started as anchors.py starts them. The measurements are anchors.py's and fleet.py's,
imported, not copied:

1. Control plane: "version report -> upgrade push" round trips at QoS 1 by 50 active devices
   while N idle devices (default 1,000) sit connected; anchors.py's client processes
   (anchor_lib.py). Embedded ota-server; the cluster, with every client process's devices
   spread over both nodes' MQTT ports (device i on node i % 2); mosquitto + anchors.py's paho
   responder as the reference. Round trips/s, p50/p99, the idle fleet's connect rate.
2. Range downloads: one random file (default 512 MiB, cached under /tmp/ota-anchor-cache; the
   cluster worker's default limits.max_file_mb is 1000) fetched with wrk as anchors.py does
   (random aligned 1 MiB and 64 KiB ranges, whole file) through the signed URL a device is
   pushed: (a) the embedded server sending it, (b) the cluster: nginx asks the worker for
   every request and sends the bytes after its X-Accel-Redirect, (c) plain nginx serving the
   file (the anchor).
3. The fleet (fleet.py's method, default 10,000 devices, 1 MiB image): every device connects,
   reports 1.0.0, takes the push of a batch started by a reload, downloads in 64 KiB Range
   requests, reports progress and 1.1.0. Against the embedded server and a fresh cluster
   (devices split over both nodes, downloads through nginx). Wall time, upgrades/s, failures,
   server-side CPU per upgraded device (/proc/PID/stat: ota-server; worker + both RabbitMQ
   beams + nginx's master and workers) and peak RSS (VmHWM, summed over those processes).

Prints a markdown table (ratios cluster/embedded and each/anchor) and notes; `--json PATH`
keeps the raw results. A full run takes about 15 minutes on 2 cores (two cluster start-ups
of ~25 s each, the two 10,000-device fleets most of it); `--quick` about 3 minutes.

    .venv/bin/python scripts/bench/cluster.py --quick                                  # development
    .venv/bin/python scripts/bench/cluster.py --lock /tmp/bench.lock --json /tmp/cluster.json

`--lock PATH` waits for a quiet machine (no other bench lock, no pytest/hostile_clients/
device_sim process, 1-minute load average under 1.5), then holds PATH (our PID in it) for the
whole run.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
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

    def pids(self) -> dict[str, list[int]]:
        """The server side by part: the OTA worker, the RabbitMQ nodes (beam.smp), nginx (master, workers)."""
        return {"worker": [int((self.dir / "worker.pid").read_text())],
                "rabbitmq": [int(p.read_text()) for p in sorted((self.dir / "rabbit").glob("n*/pid"))],
                "nginx": A.tree_pids(int((self.dir / "nginx" / "nginx.pid").read_text()))}


@contextlib.contextmanager
def cluster_up(folder: Path, catalog: Path, mirror: bool = True) -> Iterator[Cluster]:
    """`scripts/cluster-up --dir folder --catalog catalog`; `scripts/cluster-down folder` on the way out.
    `mirror=False`: without the mirroring of queues on both nodes that cluster-up's policies ask for."""
    try:
        done = subprocess.run([str(SCRIPTS / "cluster-up"), "--dir", str(folder), "--catalog", str(catalog)],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"cluster-up failed ({done.returncode}): {done.stderr[-2000:]}")
        lines = dict(line.split("=", 1) for line in done.stdout.splitlines() if line.startswith("OTA_CLUSTER_"))
        ports = [int(address.rsplit(":", 1)[1]) for address in lines["OTA_CLUSTER_MQTT"].split(",")]
        cluster = Cluster(folder, ports, lines["OTA_CLUSTER_HTTP"])
        if not mirror:
            drop_mirroring(folder / "rabbit")
        for pid in cluster.pids()["rabbitmq"] + cluster.pids()["worker"]:
            A.wait_quiet(pid, limit=60)  # the nodes settle for a few seconds after they start
        yield cluster
    finally:
        with signals_held():
            subprocess.run([str(SCRIPTS / "cluster-down"), str(folder)], capture_output=True, timeout=180)


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


def cpu_of(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds used so far by each part (user + system, /proc/PID/stat)."""
    return {part: sum(A.cpu_seconds(pid) for pid in group) for part, group in pids.items()}


def hwm_of(pids: dict[str, list[int]]) -> dict[str, float]:
    """Peak RSS (VmHWM, MiB) of each part, summed over its processes."""
    return {part: sum(A.proc_status(pid, "VmHWM") for pid in group) for part, group in pids.items()}


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
    over the nodes; CPU watched over the round-trip window: the worker and each node."""
    pids = cluster.pids()
    worker = A.Server(Pid(pids["worker"][0]), cluster.mqtt_ports[0])  # type: ignore[arg-type]
    watch = {"worker": pids["worker"][0], **{f"rabbit{k + 1}": pid for k, pid in enumerate(pids["rabbitmq"])}}
    with mock.patch.object(A, "client_role", spread_client_role(cluster.mqtt_ports)):
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


async def upgrade_fleet(root: Path, ports: list[int], pids: dict[str, list[int]], args: argparse.Namespace) \
        -> dict[str, Any]:
    """fleet.py's run, against a server already running on fleet.write_config's catalog in `root`,
    with device i on MQTT port i % len(ports)."""
    cfgs = [simulator.DeviceConfig(device_name=f"bench-{i:05d}", product_key="a1Bench", product_secret="bench-secret",
                                   mqtt_port=ports[i % len(ports)], chunk=args.chunk, timeout=args.timeout)
            for i in range(args.devices)]
    cpu_before, ours_before, overflows = cpu_of(pids), Ours(), listen_overflows()
    with device_processes(args.procs) as pool:
        started = time.perf_counter()
        run = asyncio.ensure_future(simulator.run_fleet_split(cfgs, args.concurrency, args.procs, pool))
        while fleet.db_scalar(root, "SELECT count(*) FROM device_versions")[0] < args.devices and not run.done():
            await asyncio.sleep(0.2)
        connected = time.perf_counter() - started
        fleet.add_batch(root, "http")
        batch_started = time.time()
        await asyncio.to_thread(fleet.reload, root)
        reload_seconds = time.time() - batch_started
        results = await run
        wall = time.perf_counter() - started
        cpu = {part: now - cpu_before[part] for part, now in cpu_of(pids).items()}
    upgraded = sum(r.outcome == "upgraded" for r in results)
    pushes = sorted(r.offer_at - batch_started for r in results if r.offer_at is not None)
    times = sorted(r.seconds for r in results)
    reasons = Counter(re.sub(r"\d+", "N", f"{r.outcome} {r.reason}")[:110] for r in results if r.outcome != "upgraded")
    return {
        "devices": args.devices, "upgraded": upgraded, "failed": len(results) - upgraded,
        "wall_s": wall, "connected_s": connected, "reload_s": reload_seconds,
        "upgrades_per_s": upgraded / (wall - connected),
        "pushes_within_s": pushes[-1] if pushes else float("nan"),
        "device_p50_s": times[len(times) // 2], "device_p99_s": times[int(len(times) * 0.99) - 1],
        "server_cpu_s": sum(cpu.values()), "cpu_by_part_s": cpu,
        "cpu_ms_per_upgrade": 1000 * sum(cpu.values()) / upgraded if upgraded else float("nan"),
        "rss_peak_by_part_mib": hwm_of(pids), "rss_peak_mib": sum(hwm_of(pids).values()),
        "devices_cpu_s": fleet.children_cpu_seconds() - ours_before.children,  # the pool's, reaped above
        "others_cpu_s": ours_before.others(sum(cpu.values())),
        "listen_overflows": listen_overflows() - overflows,
        "failure_reasons": dict(reasons.most_common(8)),
    }


def problems_in(paths: list[Path], pattern: str, skip: str = "$^") -> dict[str, Any]:
    """Log entries with a line matching `pattern` (not `skip`) in these logs: how many (the lines
    of one multi-line entry share its timestamp), and the first."""
    found = [line for path in paths if path.exists()
             for line in path.read_text(errors="replace").splitlines() if re.search(pattern, line)
             and not re.search(skip, line)]
    return {"count": len(dict.fromkeys(line[:48] for line in found)), "first": found[0][:200] if found else ""}


def fleet_embedded(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    root.mkdir()
    mqtt_port, http_port = free_port(), free_port()
    config = fleet.write_config(root, mqtt_port, http_port, args.size)
    server = ServerProcess(config, mqtt_port, log=root / "server.log", extra_args=("--log-level", "WARNING"))
    server.start(timeout=60)
    try:
        result = asyncio.run(upgrade_fleet(root, [mqtt_port], {"ota-server": [server.pid]}, args))
    finally:
        server.stop()
    result["log"] = {"ota-server": problems_in([root / "server.log"], r" WARNING | ERROR |Traceback",
                                               "No data to decode MQTT packet fixed header")}
    return result


def fleet_cluster(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A fresh cluster whose folder is `root`: its data_dir is root/var, where fleet.py looks."""
    root.mkdir()
    fleet.write_config(root, 0, 0, args.size)  # the catalog; cluster-up writes its own broker.yaml here
    with cluster_up(root, root / "ota.yaml", args.mirror) as cluster:
        result = asyncio.run(upgrade_fleet(root, cluster.mqtt_ports, cluster.pids(), args))
    result["log"] = {
        "worker": problems_in([root / "worker.log"], r" WARNING | ERROR |Traceback"),
        "nginx": problems_in([root / "nginx" / "error.log"], r"\[(warn|error|crit|alert|emerg)\]"),
        "rabbitmq": problems_in(sorted(root.glob("rabbit/n*/log/*.log")), r"\[error\]"),
    }
    return result


# ---------------------------------------------------------------------------- report


def three(label: str, emb: float, clu: float, anchor: float | None, digits: int = 0) -> tuple[str, ...]:
    """A row: embedded, cluster, anchor, then cluster/embedded, embedded/anchor, cluster/anchor."""
    has = anchor is not None
    return (label, A.fmt(emb, digits), A.fmt(clu, digits), A.fmt(anchor, digits) if has else "",
            A.ratio(clu, emb), A.ratio(emb, anchor) if has else "", A.ratio(clu, anchor) if has else "")


def control_rows(results: dict[str, Any]) -> Iterator[tuple[str, ...]]:
    control = results["control"]
    for emb, clu, mos in zip(control["ours"], control["cluster"], control["mosquitto"]):
        n = f"{emb['idle']:,} idle"
        yield three(f"round trips/s, 50 active + {n}", emb["per_second"], clu["per_second"], mos["per_second"])
        yield three(f"p50 round trip ms, {n}", emb["p50_ms"], clu["p50_ms"], mos["p50_ms"], 1)
        yield three(f"p99 round trip ms, {n}", emb["p99_ms"], clu["p99_ms"], mos["p99_ms"], 1)
        yield three(f"idle connects/s (CONNECT + SUBSCRIBE), {n}", emb["connect"]["per_second"],
                    clu["connect"]["per_second"], mos["connect"]["per_second"])
        yield three("server CPU, % of a core, round-trip window", server_pct(emb), server_pct(clu), server_pct(mos))


def server_pct(row: dict[str, Any]) -> float:
    return sum(pct for name, pct in row.get("cpu_pct", {}).items() if name != "whole machine")


def data_rows(results: dict[str, Any]) -> Iterator[tuple[str, ...]]:
    cases = results["data"]["cases"]
    for name, _ in A.CASES:
        emb, clu, nginx = (cases[name][target] for target in ("embedded", "cluster", "nginx"))
        yield three(f"{name}: MB/s", emb["mb_per_s"], clu["mb_per_s"], nginx["mb_per_s"])
        if name != "whole file":
            yield three(f"{name}: requests/s", emb["req_per_s"], clu["req_per_s"], nginx["req_per_s"])
    peak = {target: max(cases[name][target]["rss_peak_mib"] for name in cases) for target in ("embedded", "cluster",
                                                                                               "nginx")}
    yield three("server RSS peak MiB (cluster: worker + nginx)", peak["embedded"], peak["cluster"], peak["nginx"])


def fleet_rows(results: dict[str, Any]) -> Iterator[tuple[str, ...]]:
    emb, clu = results["fleet"]["embedded"], results["fleet"]["cluster"]
    yield ("upgraded / failed", f"{emb['upgraded']:,} / {emb['failed']}", f"{clu['upgraded']:,} / {clu['failed']}",
           "", "", "", "")
    rows = (("wall time s, first connect to last upgrade", "wall_s", 1),
            ("all connected and reported after s", "connected_s", 1),
            ("reload answered in s (every job made and committed)", "reload_s", 2),
            ("pushes all received within s of the reload", "pushes_within_s", 1),
            ("upgrades/s after the batch started", "upgrades_per_s", 0),
            ("device time p50 s", "device_p50_s", 1), ("device time p99 s", "device_p99_s", 1),
            ("server CPU s", "server_cpu_s", 1), ("server CPU ms per upgraded device", "cpu_ms_per_upgrade", 1),
            ("server peak RSS MiB (sum of VmHWM)", "rss_peak_mib", 0), ("simulated devices' CPU s", "devices_cpu_s", 1))
    for label, key, digits in rows:
        yield three(label, emb[key], clu[key], None, digits)
    yield three("connections dropped: a listener's accept queue full", emb["listen_overflows"],
                clu["listen_overflows"], None)
    yield ("CPU s of processes we did not start (should be ~0)", A.fmt(emb["others_cpu_s"], 1),
           A.fmt(clu["others_cpu_s"], 1), "", "", "", "")
    parts = clu["cpu_by_part_s"]
    yield ("cluster CPU s: worker / RabbitMQ / nginx", "", " / ".join(A.fmt(parts[p], 1) for p in parts),
           "", "", "", "")
    rss = clu["rss_peak_by_part_mib"]
    yield ("cluster peak RSS MiB: worker / RabbitMQ / nginx", "", " / ".join(A.fmt(rss[p]) for p in rss),
           "", "", "", "")


def notes(results: dict[str, Any]) -> list[str]:
    out = []
    for label, rows in results.get("control", {}).items():
        if not isinstance(rows, list):
            continue
        for row in rows:
            cpu = ", ".join(f"{name} {pct:.0f}%" for name, pct in row.get("cpu_pct", {}).items())
            others = row.get("cpu_pct", {}).get("whole machine", 0.0) - row["client_cpu_pct"] - server_pct(row)
            if others > 25:
                cpu += f" (~{others:.0f}% of a core went to processes we did not start: these figures read low)"
            errors = {**row.get("errors", {}), **{f"connect: {k}": v for k, v in row["connect"]["errors"].items()}}
            out.append(f"- control plane, {label}, {row['idle']:,} idle: CPU over the window (100% = one core): "
                       f"active client {row['client_cpu_pct']:.0f}%, {cpu}; idle fleet connected "
                       f"{row['connect']['connected']:,}/{row['idle']:,} in {row['connect']['seconds']:.1f} s"
                       + (f"; errors {errors}" if errors else "") + (f"; {row['error']}" if "error" in row else ""))
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
    for label, run in results.get("fleet", {}).items():
        for reason, count in run["failure_reasons"].items():
            out.append(f"- fleet, {label}: {count} devices: {reason}")
        for part, found in run["log"].items():
            if found["count"]:
                out.append(f"- fleet, {label}: {found['count']} warning/error entries in the {part} log, first: "
                           f"{found['first']}")
    return out


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    meta = results["meta"]
    head = [f"# Cluster benchmark ({meta['date']}, ota-server at {meta['git']})", "",
            f"Machine: nproc {meta['nproc']} ({meta['cpu']}), {meta['uname']}, Python {meta['python']}; load "
            f"average at start {' '.join(meta['loadavg_at_start'])}. {meta['tools'].get('rabbitmq', '')}; "
            f"{meta['tools']['nginx']}; {meta['tools']['mosquitto']}; {meta['tools']['wrk']}.",
            f"Control plane: {args.active} active devices, QoS 1, {args.warmup:g} s warm-up + {args.seconds:g} s. "
            f"Downloads: {args.size_mib} MiB file, wrk -t{args.threads} -c{args.connections} -d{args.http_seconds}s. "
            f"Fleet: {args.devices:,} devices, {args.size:,} B image, {args.chunk // 1024} KiB ranges.", "", ""]
    rows: list[tuple[str, ...]] = [("what", "embedded", "cluster", "anchor", "cluster/embedded", "embedded/anchor",
                                    "cluster/anchor")]
    if results.get("control"):
        rows.append(("**control plane** (anchor: mosquitto + paho responder)", "", "", "", "", "", ""))
        rows.extend(control_rows(results))
    if results.get("data"):
        rows.append(("**Range downloads** (anchor: nginx static; cluster: nginx + X-Accel-Redirect)",
                     "", "", "", "", "", ""))
        rows.extend(data_rows(results))
    if results.get("fleet"):
        rows.append(("**fleet upgrade** (no anchor)", "", "", "", "", "", ""))
        rows.extend(fleet_rows(results))
    others = [f"- after {phase}: someone else's tests or simulators were running: {'; '.join(found[:3])}"
              for phase, found in meta.get("others_seen", {}).items()]
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
        with contextlib.suppress(OSError, ValueError):
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
        "devices": 10000, "size": 1024 * 1024}
QUICK = {"idle": "100", "seconds": 3.0, "warmup": 1.0, "size_mib": 64, "http_seconds": 3,
         "devices": 300, "size": 256 * 1024}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 idle, 3 s windows, 64 MiB file, 300 devices with "
                                                             "a 256 KiB image (flags given explicitly still win)")
    parser.add_argument("--only", choices=["control", "data", "fleet"], help="run one of the three")
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
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.idle = [int(n) for n in str(args.idle).split(",") if n.strip()]
    return args


def rabbitmq_version() -> str:
    done = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "rabbitmq-server"], capture_output=True, text=True)
    return f"RabbitMQ {done.stdout.strip() or '?'} (Debian package)"


def measure(args: argparse.Namespace, results: dict[str, Any]) -> None:
    tools = A.ensure_tools()
    results["meta"]["tools"] = {**tools.versions, "rabbitmq": rabbitmq_version()}
    seen = results["meta"]["others_seen"] = {}  # phase -> tests or simulators running at its end

    def done(phase: str) -> None:
        if others_running():
            seen[phase] = others_running()

    children = A.Children()
    with tempfile.TemporaryDirectory(prefix="ota-bench-cluster-") as tmp:
        root = Path(tmp)
        try:
            if args.only in (None, "control", "data"):
                package = A.big_file(args.size_mib * A.MIB)
                (root / "ours").mkdir()
                if args.only in (None, "control"):
                    results["control"] = A.measure_control(children, tools, root, package, args)
                    done("control plane, embedded and mosquitto")
                folder = root / "cluster-anchor"
                folder.mkdir()
                A.write_ours_config(folder, 0, 0, package)  # ota.yaml: a1Anchor, the big file, a pushed batch
                with cluster_up(folder / "cluster", folder / "ota.yaml", args.mirror) as cluster:
                    if args.only in (None, "control"):
                        print(f"# control plane: cluster (MQTT {cluster.mqtt_ports})", file=sys.stderr)
                        results["control"]["cluster"] = cluster_control(children, cluster, args)
                        done("control plane, cluster")
                    if args.only in (None, "data"):
                        print("# downloads: embedded, cluster, nginx", file=sys.stderr)
                        results["data"] = downloads(children, tools, root, package, cluster, args)
                        done("downloads")
            if args.only in (None, "fleet"):
                results["fleet"] = {}
                for label, run in (("embedded", fleet_embedded), ("cluster", fleet_cluster)):
                    print(f"# fleet: {args.devices:,} devices, {label}", file=sys.stderr)
                    results["fleet"][label] = fleet_run = run(root / f"fleet-{label}", args)
                    done(f"fleet, {label}")
                    print(f"#   {fleet_run['upgraded']:,} upgraded, {fleet_run['failed']} failed in "
                          f"{fleet_run['wall_s']:.1f} s, server CPU {fleet_run['server_cpu_s']:.1f} s", file=sys.stderr)
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
        measure(args, results)
        results["meta"]["run_seconds"] = time.perf_counter() - started
    print(report(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["client"]:
        client_main([int(port) for port in sys.argv[2].split(",")], sys.argv[3:])
    else:
        try:
            sys.exit(main())
        except KeyboardInterrupt:
            sys.exit(130)
