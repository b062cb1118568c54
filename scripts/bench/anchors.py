"""Anchor benchmark: ota-server against the tools a user would otherwise pick, in one run.

Everything runs on this machine over 127.0.0.1, on free ports picked at run time; the
anchors are the distribution's mosquitto, nginx and wrk (installed with apt-get when
missing) run as our own child processes with our own config files in a temp dir.

Control plane: "version report -> upgrade push" round trips, QoS 1, by 50 active devices
while N other idle devices are connected (keep-alive 600, subscribed to their own upgrade
topic; default N = 10, 1,000 and 10,000).
  - ours: ota-server with a temporary catalog (one product whose secret derives the device
    secrets, a pushed dynamic http batch). Each active device reports version 1.0.0 to
    /ota/device/inform/{pk}/{dn} and waits for the push on /ota/device/upgrade/{pk}/{dn};
    a device with an open job that reports its old version again gets the push again.
  - anchor: mosquitto plus one paho-mqtt "responder" process subscribed to
    /ota/device/inform/#, which answers each report with a push-shaped payload of the
    same size as ota-server's push, at QoS 1, to the device's upgrade topic.
  Same client code for both (scripts/bench/anchor_lib.py: devicekit.mqtt_client, a compact
  asyncio MQTT client), idle devices in one process, active devices in another; the active
  process reports its own CPU over the measured window so a saturated client is visible.
  Reported: round trips/s, p50/p99 latency, connect rate of the idle fleet (CONNECT +
  SUBSCRIBE), and the broker's VmRSS with the idle fleet connected.

Data plane: one file (default 1 GiB of random bytes, cached under /tmp) served by ota-server
(as the batch's package, through the REAL signed URL a device receives in its push) and by
nginx (sendfile on). wrk, 50 connections, 2 threads, random aligned 1 MiB Range GETs,
64 KiB Range GETs, and whole-file GETs. Reported: MB/s (10^6 B), requests/s, and each
server's peak RSS during the runs (sampled every 0.2 s).

Prints a markdown table (what, ota-server, anchor, ratio = ours / anchor) with notes on the
CPU each process used over each measured window (a client at 100% of a core would be the
bottleneck, not the server) and on the whole machine's CPU, which shows load we did not
start; `--json PATH` writes the raw results. A full run takes about 3 minutes on 2 cores.

    .venv/bin/python scripts/bench/anchors.py --quick                     # ~45 s, for development
    .venv/bin/python scripts/bench/anchors.py --json /tmp/anchors.json    # full
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devicekit.loopback import free_port, write_broker_yaml
from devicekit.mqtt_client import open_device

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

PK, PRODUCT_SECRET = "a1Anchor", "anchor-secret"
CACHE = Path("/tmp/ota-anchor-cache")
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
MIB = 1024 * 1024

# ---------------------------------------------------------------------------- processes


class Children:
    """Every process we start, each in its own session; `close` kills their groups."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[Any]] = []

    def start(self, command: list[str], log: Path | None = None, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `command` in a new session; with `log`, its stdout and stderr are appended there."""
        with open(log, "ab") if log else contextlib.nullcontext() as out:
            if out is not None:
                kwargs.update(stdout=out, stderr=subprocess.STDOUT)
            process = subprocess.Popen(command, start_new_session=True, **kwargs)
        self.processes.append(process)
        return process

    def stop(self, process: subprocess.Popen[Any], timeout: float = 15) -> None:
        """SIGTERM to its process group (nginx: master and workers), SIGKILL after `timeout`."""
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def close(self) -> None:
        for process in reversed(self.processes):
            self.stop(process, timeout=5)
        self.processes.clear()


def wait_port(port: int, process: subprocess.Popen[Any], log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        if process.poll() is not None or time.time() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{process.args[0]} did not start listening on {port}:\n{tail}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)


def raise_nofile() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit; children inherit it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def proc_status(pid: int, key: str) -> float:
    """A /proc/PID/status kB field in MiB (nan when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def tree_pids(pid: int) -> list[int]:
    """`pid` and its direct children (nginx master + workers)."""
    pids = [pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                pids.append(int(stat.parent.name))
    return pids


def rss_mib(pid: int, tree: bool = False) -> float:
    return sum(proc_status(p, "VmRSS") for p in (tree_pids(pid) if tree else [pid]))


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat), to spot load we did not start."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def machine_busy_pct(limit: float, quiet: float = 15.0) -> float:
    """Whole-machine CPU (% of one core) over 2 s; samples again, up to `limit` seconds, while
    it is at or over `quiet` (someone else is using the machine)."""
    deadline = time.perf_counter() + limit
    while True:
        before = machine_busy_seconds()
        time.sleep(2)
        busy = 100 * (machine_busy_seconds() - before) / 2
        if busy < quiet or time.perf_counter() >= deadline:
            return busy


def wait_quiet(pid: int, limit: float = 300, busy: float = 0.10) -> float:
    """Wait until `pid` uses under `busy` of a core over 0.5 s; returns the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        before = cpu_seconds(pid)
        time.sleep(0.5)
        if not cpu_seconds(pid) - before >= busy * 0.5:
            break
    return time.perf_counter() - started


class RssSampler:
    """Peak RSS of a process (tree) sampled every 0.2 s while the `with` block runs."""

    def __init__(self, pid: int, tree: bool = False) -> None:
        self.pid, self.tree, self.peak = pid, tree, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib(self.pid, self.tree))
            self._stop.wait(0.2)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib(self.pid, self.tree))


# ---------------------------------------------------------------------------- tools


@dataclass
class Tools:
    mosquitto: str
    nginx: str
    wrk: str
    versions: dict[str, str] = field(default_factory=dict)


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/sbin")


# Wait for another apt-get (a test run's installs, unattended-upgrades) instead of failing.
APT_WAIT = ("-o", "DPkg::Lock::Timeout=600")


def ensure_tools() -> Tools:
    """mosquitto, nginx and wrk; apt-get install the missing ones (apt-get update if that fails).
    RUNLEVEL=1 keeps the packages' init scripts from starting system services."""
    missing = [name for name in ("mosquitto", "nginx", "wrk") if which(name) is None]
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}
        install = ["apt-get", *APT_WAIT, "install", "-y", "--no-install-recommends", *missing]
        print(f"# installing {' '.join(missing)} with apt-get", file=sys.stderr)
        if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["apt-get", *APT_WAIT, "update"], env=env, stdout=subprocess.DEVNULL, check=True)
            subprocess.run(install, env=env, stdout=subprocess.DEVNULL, check=True)
    tools = Tools(*(which(name) or "" for name in ("mosquitto", "nginx", "wrk")))
    for name, path in (("mosquitto", tools.mosquitto), ("nginx", tools.nginx), ("wrk", tools.wrk)):
        if not path:
            raise SystemExit(f"{name} is not installed and apt-get could not install it")
    tools.versions = {
        "mosquitto": _first_line([tools.mosquitto, "-h"]), "nginx": _first_line([tools.nginx, "-v"]),
        "wrk": _first_line([tools.wrk, "-v"]),
    }
    return tools


def _first_line(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else "?"


# ---------------------------------------------------------------------------- servers


def big_file(size: int) -> Path:
    """`size` random bytes, written once under /tmp and reused by later runs."""
    CACHE.mkdir(mode=0o755, exist_ok=True)
    CACHE.chmod(0o755)
    path = CACHE / f"big-{size}.bin"
    if not path.exists() or path.stat().st_size != size:
        partial = path.with_suffix(".part")
        with partial.open("wb") as out:
            left = size
            while left:
                piece = min(left, 4 * MIB)
                out.write(os.urandom(piece))
                left -= piece
        partial.chmod(0o644)
        partial.replace(path)
    with path.open("rb") as f:  # into the page cache, so neither server reads the disk
        while f.read(8 * MIB):
            pass
    return path


def write_ours_config(root: Path, mqtt_port: int, http_port: int, package: Path) -> Path:
    """broker.yaml + ota.yaml: one product (derived secrets), `package` as 1.1.0, a pushed
    dynamic http batch. packages_dir is the cache folder itself, so the file is not copied."""
    max_mb = max(2000, package.stat().st_size // MIB + 1)
    (root / "ota.yaml").write_text(f"""
packages_dir: {package.parent}
products:
  - {{key: {PK}, name: Anchor, secret: {PRODUCT_SECRET}}}
packages:
  - {{id: fw-big, product: {PK}, version: 1.1.0, type: full, file: {package.name}, sign_method: SHA256}}
batches:
  - {{name: anchor, package: fw-big, type: upgrade, protocol: http, mode: dynamic, push: true}}
""", encoding="utf-8")
    return write_broker_yaml(root, mqtt_port, http_port, max_file_mb=max_mb)


@dataclass
class Server:
    process: subprocess.Popen[Any]
    port: int
    http_port: int = 0

    @property
    def pid(self) -> int:
        return self.process.pid


def start_ours(children: Children, root: Path, package: Path) -> Server:
    """ota-server on free ports; returns once both MQTT and HTTP accept."""
    mqtt_port, http_port = free_port(), free_port()
    config = write_ours_config(root, mqtt_port, http_port, package)
    log = root / "ota-server.log"
    process = children.start([PYTHON, "-m", "broker_plugin.server", "--config", str(config), "--log-level", "WARNING"],
                             log, cwd=ROOT)
    wait_port(mqtt_port, process, log, timeout=600)  # the first start hashes the package
    wait_port(http_port, process, log, timeout=60)
    return Server(process, mqtt_port, http_port)


def start_mosquitto(children: Children, tools: Tools, root: Path) -> Server:
    port = free_port()
    conf = root / "mosquitto.conf"
    conf.write_text(f"""listener {port} 127.0.0.1
allow_anonymous true
max_connections -1
max_inflight_messages 1000
max_queued_messages 100000
persistence false
set_tcp_nodelay true
log_dest stderr
log_type error
log_type warning
""")
    log = root / "mosquitto.log"
    process = children.start([tools.mosquitto, "-c", str(conf)], log)
    wait_port(port, process, log, timeout=30)
    return Server(process, port)


def start_nginx(children: Children, tools: Tools, root: Path, docroot: Path, workers: str) -> Server:
    """nginx in the foreground (`daemon off`) with its prefix in `root`, sendfile on."""
    port = free_port()
    prefix = root / "nginx"
    (prefix / "logs").mkdir(parents=True)
    conf = prefix / "nginx.conf"
    temp = "\n".join(f"  {kind}_temp_path {prefix / kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                           "uwsgi", "scgi"))
    conf.write_text(f"""daemon off;
worker_processes {workers};
pid {prefix / 'nginx.pid'};
error_log {prefix / 'logs' / 'error.log'} warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  default_type application/octet-stream;
{temp}
  server {{
    listen 127.0.0.1:{port};
    root {docroot};
    location / {{ }}
  }}
}}
""")
    log = prefix / "logs" / "stderr.log"
    process = children.start([tools.nginx, "-p", str(prefix), "-c", str(conf)], log)
    wait_port(port, process, log, timeout=30)
    return Server(process, port, port)


# ---------------------------------------------------------------------------- control plane


def client_role(children: Children, role: str, port: int, *extra: str, stdin: int | None = None) \
        -> subprocess.Popen[str]:
    return children.start([PYTHON, str(HERE / "anchor_lib.py"), role, "--port", str(port), "--pk", PK,
                           "--product-secret", PRODUCT_SECRET, *extra],
                          stdin=stdin, stdout=subprocess.PIPE, text=True)


def read_json_line(process: subprocess.Popen[str], what: str) -> dict[str, Any]:
    line = process.stdout.readline() if process.stdout else ""
    if not line:
        raise RuntimeError(f"{what} exited ({process.poll()}) without a result")
    return json.loads(line)


def read_with_cpu(process: subprocess.Popen[str], what: str, watch: dict[str, int]) -> dict[str, Any]:
    """Read a start line, then the next line; add the CPU % of each process in `watch` between them."""
    read_json_line(process, what)
    before = {name: cpu_seconds(pid) for name, pid in watch.items()}
    machine_before, started = machine_busy_seconds(), time.perf_counter()
    result = read_json_line(process, what)
    wall = time.perf_counter() - started
    result["cpu_pct"] = {name: 100 * (cpu_seconds(pid) - before[name]) / wall for name, pid in watch.items()}
    result["cpu_pct"]["whole machine"] = 100 * (machine_busy_seconds() - machine_before) / wall
    return result


def run_active(children: Children, server: Server, args: argparse.Namespace, watch: dict[str, int]) \
        -> dict[str, Any]:
    """The active-device process; CPU of each process in `watch` over its measured window."""
    active = client_role(children, "active", server.port, "--count", str(args.active), "--prefix", "act-",
                         "--warmup", str(args.warmup), "--seconds", str(args.seconds))
    try:
        window = read_with_cpu(active, "active devices", watch)  # reads window start .. window end
        result = read_json_line(active, "active devices")
        active.wait(60)
    finally:
        children.stop(active)
    result["cpu_pct"] = window["cpu_pct"]
    return result


def connect_idle(children: Children, server: Server, count: int, args: argparse.Namespace) \
        -> tuple[list[subprocess.Popen[str]], dict[str, Any]]:
    """Idle fleet of `count` devices, split over `args.idle_procs` processes that start together."""
    shards = max(1, min(args.idle_procs, count))
    procs = [client_role(children, "idle", server.port, "--count", str(count), "--prefix", "idle-",
                         "--shard", str(k), "--shards", str(shards), "--keepalive", "600",
                         "--concurrency", str(max(1, args.connect_concurrency // shards)), stdin=subprocess.PIPE)
             for k in range(shards)]
    try:
        for proc in procs:
            read_json_line(proc, "idle devices")  # ready
        cpu_before, started = cpu_seconds(server.pid), time.perf_counter()
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        parts = [read_json_line(proc, "idle devices") for proc in procs]
        wall = time.perf_counter() - started
    except BaseException:
        for proc in procs:
            children.stop(proc)
        raise
    errors: dict[str, int] = {}
    for part in parts:
        for error, n in part["errors"].items():
            errors[error] = errors.get(error, 0) + n
    seconds = max(part["seconds"] for part in parts)
    connected = sum(part["connected"] for part in parts)
    return procs, {"connected": connected, "failed": sum(part["failed"] for part in parts), "seconds": seconds,
                   "per_second": connected / seconds, "errors": errors, "processes": shards,
                   "client_cpu_pct": [part["client_cpu_pct"] for part in parts],
                   "cpu_pct": {"server": 100 * (cpu_seconds(server.pid) - cpu_before) / wall}}


def one_fleet(children: Children, server: Server, idle_count: int, args: argparse.Namespace,
              watch: dict[str, int]) -> dict[str, Any]:
    """Connect `idle_count` idle devices, run the active loop, disconnect them, wait for the broker to settle."""
    procs: list[subprocess.Popen[str]] = []
    try:
        procs, connect = connect_idle(children, server, idle_count, args)
        wait_quiet(server.pid, limit=60)
        rss_idle = rss_mib(server.pid)
        result = run_active(children, server, args, watch)
        result.update(idle=idle_count, connect=connect, rss_mib=rss_idle, rss_after_mib=rss_mib(server.pid))
    finally:
        for proc in procs:
            children.stop(proc, timeout=60)
    result["settle_s"] = wait_quiet(server.pid)  # disconnect cleanup must not leak into the next size
    return result


def failed_fleet(idle_count: int, error: str) -> dict[str, Any]:
    """The row of a fleet size that could not be measured."""
    nan = float("nan")
    return {"idle": idle_count, "error": error, "per_second": nan, "p50_ms": nan, "p99_ms": nan, "rss_mib": nan,
            "rss_after_mib": nan, "client_cpu_pct": nan, "cpu_pct": {}, "errors": {error: 1}, "push_bytes": 0,
            "connect": {"connected": 0, "failed": idle_count, "seconds": nan, "per_second": nan, "errors": {},
                        "client_cpu_pct": [], "cpu_pct": {"server": nan}}}


def control_plane(children: Children, server: Server, args: argparse.Namespace, watch: dict[str, int]) \
        -> list[dict[str, Any]]:
    """One row per idle fleet size; a broker that failed or died gives error rows, not an abort."""
    rows: list[dict[str, Any]] = []
    for idle_count in args.idle:
        if server.process.poll() is not None:
            rows.append(failed_fleet(idle_count, f"broker exited with {server.process.returncode}"))
            continue
        try:
            result = one_fleet(children, server, idle_count, args, watch)
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
            rows.append(failed_fleet(idle_count, f"{type(exc).__name__}: {exc}"[:300]))
            print(f"#   idle {idle_count}: FAILED {rows[-1]['error']}", file=sys.stderr)
            continue
        rows.append(result)
        connect = result["connect"]
        print(f"#   idle {idle_count}: {result['per_second']:.0f} round trips/s, p50 {result['p50_ms']:.1f} ms, "
              f"connect {connect['per_second']:.0f}/s ({connect['failed']} failed), RSS {result['rss_mib']:.0f} MiB",
              file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------- data plane


async def signed_url(port: int, device: str = "http-0000") -> tuple[str, bytes]:
    """Report 1.0.0 as a fresh device and return the url of the push it receives (and the push)."""
    loop = asyncio.get_running_loop()
    push: asyncio.Future[bytes] = loop.create_future()
    client = await open_device(port, PK, device, PRODUCT_SECRET, 60,
                               lambda topic, payload: push.done() or push.set_result(payload))
    try:
        client.publish(f"/ota/device/inform/{PK}/{device}", b'{"id":"1","params":{"version":"1.0.0"}}')
        payload = await asyncio.wait_for(push, 60)
    finally:
        client.close()
    return json.loads(payload)["data"]["url"], payload


def check_range(url: str, expected: bytes, offset: int) -> None:
    """A Range GET must answer 206 with exactly the file's bytes."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-{offset + len(expected) - 1}"})
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback only
        body = response.read()
        if response.status != 206 or body != expected:
            raise RuntimeError(f"{url}: Range GET gave {response.status}, {len(body)} B, not the file's bytes")


WRK_LUA = """
local path, size, chunk = %(path)s, %(size)d, %(chunk)d
local slots = chunk > 0 and math.floor(size / chunk) or 1
local counter = 0
function setup(thread) counter = counter + 1; thread:set("seed", counter) end
function init(args) math.randomseed(seed * 7919 + os.time()) end
function request()
  if chunk == 0 then return wrk.format("GET", path) end
  local first = math.random(0, slots - 1) * chunk
  return wrk.format("GET", path, {["Range"] = "bytes=" .. first .. "-" .. (first + chunk - 1)})
end
function done(s, latency, requests)
  io.write(string.format('WRKJSON {"requests": %%d, "bytes": %%d, "duration_us": %%d, "connect_errors": %%d, '
    .. '"read_errors": %%d, "write_errors": %%d, "status_errors": %%d, "timeouts": %%d, "p50_ms": %%.3f, '
    .. '"p99_ms": %%.3f}\\n', s.requests, s.bytes, s.duration, s.errors.connect, s.errors.read,
    s.errors.write, s.errors.status, s.errors.timeout, latency:percentile(50) / 1000,
    latency:percentile(99) / 1000))
end
"""


def run_wrk(tools: Tools, root: Path, url: str, size: int, chunk: int, args: argparse.Namespace) -> dict[str, Any]:
    """wrk against `url`: random aligned `chunk`-byte ranges (0: whole file)."""
    base, _, path = url.partition("://")[2].partition("/")
    script = root / f"wrk-{chunk}.lua"
    script.write_text(WRK_LUA % {"path": json.dumps("/" + path), "size": size, "chunk": chunk})
    done = subprocess.run([tools.wrk, "-t", str(args.threads), "-c", str(args.connections),
                           "-d", f"{args.http_seconds}s", "--timeout", "120s", "-s", str(script), f"http://{base}/"],
                          capture_output=True, text=True, timeout=args.http_seconds + 180)
    lines = [line for line in done.stdout.splitlines() if line.startswith("WRKJSON ")]
    if not lines:
        raise RuntimeError(f"wrk gave no result: {done.stdout}\n{done.stderr}")
    result = json.loads(lines[0].split(" ", 1)[1])
    seconds = result["duration_us"] / 1e6
    result.update(seconds=seconds, mb_per_s=result["bytes"] / seconds / 1e6, req_per_s=result["requests"] / seconds)
    return result


CASES = (("1 MiB ranges", MIB), ("64 KiB ranges", 64 * 1024), ("whole file", 0))


def data_plane(children: Children, tools: Tools, root: Path, package: Path, args: argparse.Namespace) \
        -> dict[str, Any]:
    """Same wrk cases against ota-server (signed URL) and nginx; peak RSS of each."""
    ours = start_ours(children, root / "ours", package)  # same data_dir as the control plane: hashes cached
    nginx = start_nginx(children, tools, root, package.parent, args.nginx_workers)
    try:
        url, push = asyncio.run(signed_url(ours.port))
        nginx_url = f"http://127.0.0.1:{nginx.port}/{package.name}"
        with package.open("rb") as f:
            f.seek(MIB)
            sample = f.read(4096)
        check_range(url, sample, MIB)
        check_range(nginx_url, sample, MIB)
        results: dict[str, Any] = {"url": url, "push_bytes": len(push), "cases": {}}
        ours_peak = nginx_peak = 0.0
        for name, chunk in CASES:
            with RssSampler(ours.pid) as sampler:
                mine = run_wrk(tools, root, url, package.stat().st_size, chunk, args)
            ours_peak = max(ours_peak, sampler.peak)
            mine["rss_peak_mib"] = sampler.peak
            with RssSampler(nginx.pid, tree=True) as sampler:
                theirs = run_wrk(tools, root, nginx_url, package.stat().st_size, chunk, args)
            nginx_peak = max(nginx_peak, sampler.peak)
            theirs["rss_peak_mib"] = sampler.peak
            results["cases"][name] = {"ours": mine, "nginx": theirs}
            print(f"#   {name}: ours {mine['mb_per_s']:.0f} MB/s, nginx {theirs['mb_per_s']:.0f} MB/s",
                  file=sys.stderr)
        results.update(ours_rss_peak_mib=ours_peak, nginx_rss_peak_mib=nginx_peak,
                       ours_rss_hwm_mib=proc_status(ours.pid, "VmHWM"))
        return results
    finally:
        children.stop(nginx.process)
        children.stop(ours.process, timeout=60)


# ---------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.splitlines()
    return {"nproc": nproc, "uname": " ".join(platform.uname()[:3] + (platform.uname().machine,)),
            "cpu": model, "python": platform.python_version(),
            "git": (git.stdout.strip() or "?") + (f" + {len(dirty)} modified file(s)" if dirty else ""),
            "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def ratio(ours: float, anchor: float) -> str:
    return f"{ours / anchor:.2f}x" if anchor and anchor == anchor and ours == ours else "n/a"


def fmt(value: float, digits: int = 0) -> str:
    return "n/a" if value != value else f"{value:,.{digits}f}"


def control_rows(ours: list[dict[str, Any]], anchor: list[dict[str, Any]]) -> Iterator[tuple[str, ...]]:
    largest = max((row["idle"] for row in ours), default=0)
    for mine, theirs in zip(ours, anchor):
        n = f"{mine['idle']:,} idle"
        yield (f"round trips/s, {n} (higher is better)", fmt(mine["per_second"]), fmt(theirs["per_second"]),
               ratio(mine["per_second"], theirs["per_second"]))
        for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
            yield (f"{label} round trip ms, {n} (lower is better)", fmt(mine[key], 1), fmt(theirs[key], 1),
                   ratio(mine[key], theirs[key]))
        if mine["idle"] >= 1000 or mine["idle"] == largest:
            rate, anchor_rate = mine["connect"]["per_second"], theirs["connect"]["per_second"]
            yield (f"idle connects/s (CONNECT+SUBSCRIBE), {n}", fmt(rate), fmt(anchor_rate), ratio(rate, anchor_rate))
        yield (f"broker RSS MiB, {n} + the active devices", fmt(mine["rss_after_mib"]), fmt(theirs["rss_after_mib"]),
               ratio(mine["rss_after_mib"], theirs["rss_after_mib"]))


def data_rows(data: dict[str, Any]) -> Iterator[tuple[str, ...]]:
    for name, pair in data["cases"].items():
        mine, theirs = pair["ours"], pair["nginx"]
        yield (f"{name}: MB/s", fmt(mine["mb_per_s"]), fmt(theirs["mb_per_s"]),
               ratio(mine["mb_per_s"], theirs["mb_per_s"]))
        few = min(mine["requests"], theirs["requests"]) < 20  # whole 1 GiB files: a handful, or none, complete
        yield (f"{name}: requests/s", fmt(mine["req_per_s"], 1), fmt(theirs["req_per_s"], 1),
               "n/a (few done)" if few else ratio(mine["req_per_s"], theirs["req_per_s"]))
    yield ("server RSS peak MiB during HTTP runs", fmt(data["ours_rss_peak_mib"]), fmt(data["nginx_rss_peak_mib"]),
           ratio(data["ours_rss_peak_mib"], data["nginx_rss_peak_mib"]))


def markdown(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def client_notes(results: dict[str, Any]) -> list[str]:
    """One line per control-plane run: CPU of the clients and servers over the window, errors."""
    notes = []
    for label in ("ours", "mosquitto"):
        for row in results["control"].get(label, []):
            cpu = ", ".join(f"{name} {pct:.0f}%" for name, pct in row["cpu_pct"].items())
            errors = {**row["errors"], **{f"connect: {k}": v for k, v in row["connect"]["errors"].items()}}
            if "error" in row:
                notes.append(f"- {label}, {row['idle']:,} idle: not measured: {row['error']}")
                continue
            connect = row["connect"]
            clients = " + ".join(f"{pct:.0f}%" for pct in connect["client_cpu_pct"])
            connect_cpu = (f" (CPU: idle clients {clients}, broker {connect['cpu_pct']['server']:.0f}%)"
                           if connect["seconds"] >= 0.5 else "")
            ours_sum = row["client_cpu_pct"] + sum(v for k, v in row["cpu_pct"].items() if k != "whole machine")
            foreign = row["cpu_pct"].get("whole machine", 0.0) - ours_sum
            if foreign > 25:
                cpu += f" (~{foreign:.0f}% of a core went to processes we did not start: these numbers are low)"
            notes.append(f"- {label}, {row['idle']:,} idle: CPU over the window (100% = one core): active "
                         f"client {row['client_cpu_pct']:.0f}%, {cpu}; idle connected "
                         f"{connect['connected']:,}/{row['idle']:,} in {connect['seconds']:.1f} s{connect_cpu}"
                         + (f"; errors {errors}" if errors else ""))
    return notes


def wrk_notes(data: dict[str, Any]) -> list[str]:
    """wrk errors, and whether each answer had the expected size (a 200 instead of a 206 shows here)."""
    problems, remarks = [], []
    for name, chunk in CASES:
        for label, run in data["cases"].get(name, {}).items():
            errors = {k: run[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors",
                                          "timeouts") if run[k]}
            per_request = run["bytes"] / run["requests"] if run["requests"] else float("nan")
            if errors or (chunk and not chunk <= per_request < chunk + 1024):
                problems.append(f"- {name}, {label}: PROBLEM: {run['requests']} requests, {per_request:,.0f} B "
                                f"each, {errors or 'unexpected size'}")
            if not chunk and run["requests"] < 20:
                remarks.append(f"- {name}, {label}: {run['requests']} GETs completed within the window (each is "
                               "the whole file); MB/s counts all bytes received")
    return (problems or ["- wrk: no errors; every range answer had the expected size"]) + remarks


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    meta = results["meta"]
    head = [
        f"# ota-server anchor benchmark ({meta['date']}, ota-server at {meta['git']})", "",
        f"Machine: nproc {meta['nproc']} ({meta['cpu']}), {meta['uname']}, Python {meta['python']}; "
        f"everything (servers, clients, wrk) shares these cores, over 127.0.0.1; load average at start "
        f"{' '.join(meta['loadavg_at_start'])}, machine busy {meta['busy_before_pct']:.0f}% of one core just before "
        "(\"whole machine\" CPU below includes processes we did not start).",
        f"Anchors: {meta['tools']['mosquitto']} + paho responder; {meta['tools']['nginx']} "
        f"(worker_processes {args.nginx_workers}, sendfile on); {meta['tools']['wrk']}.",
        f"Control plane: {args.active} active devices, QoS 1, {args.warmup:g} s warm-up + {args.seconds:g} s; "
        f"data plane: {results['data'].get('size_mib', 0):,.0f} MiB file, wrk -t{args.threads} "
        f"-c{args.connections} -d{args.http_seconds:g}s, random aligned ranges. "
        "Ratio = ours / anchor.", "", "",
    ]
    rows: list[tuple[str, ...]] = [("what", "ota-server", "anchor", "ratio")]
    if results["control"]:
        rows.append(("**control plane** (anchor: mosquitto + paho responder)", "", "", ""))
        rows.extend(control_rows(results["control"]["ours"], results["control"]["mosquitto"]))
    if results["data"].get("cases"):
        rows.append(("**data plane** (anchor: nginx)", "", "", ""))
        rows.extend(data_rows(results["data"]))
    tail = [""]
    if results["control"]:
        tail += client_notes(results)
    if results["data"].get("cases"):
        tail += wrk_notes(results["data"])
    tail.append(f"\nTotal run time {results['meta']['run_seconds']:.0f} s.")
    return "\n".join(head) + markdown(rows) + "\n" + "\n".join(tail)


# ---------------------------------------------------------------------------- main


def measure_control(children: Children, tools: Tools, root: Path, package: Path, args: argparse.Namespace) \
        -> dict[str, Any]:
    print("# control plane: ota-server", file=sys.stderr)
    ours = start_ours(children, root / "ours", package)
    try:
        ours_rows = control_plane(children, ours, args, {"ota-server": ours.pid})
    finally:
        children.stop(ours.process, timeout=60)
    push_bytes = next((row["push_bytes"] for row in ours_rows if row["push_bytes"]), 400)
    print(f"# control plane: mosquitto + responder ({push_bytes} B pushes)", file=sys.stderr)
    broker = start_mosquitto(children, tools, root)
    responder = client_role(children, "responder", broker.port, "--size", str(push_bytes))
    try:
        read_json_line(responder, "responder")
        anchor_rows = control_plane(children, broker, args, {"mosquitto": broker.pid, "responder": responder.pid})
    finally:
        children.stop(responder)
        children.stop(broker.process)
    return {"ours": ours_rows, "mosquitto": anchor_rows, "push_bytes": push_bytes}


FULL = {"idle": "10,1000,10000", "seconds": 10.0, "warmup": 2.0, "size_mib": 1024, "http_seconds": 10}
QUICK = {"idle": "10,100", "seconds": 3.0, "warmup": 1.0, "size_mib": 64, "http_seconds": 3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="idle 10,100; 3 s durations; 64 MiB file "
                                                             "(flags given explicitly still win)")
    parser.add_argument("--idle", help=f"idle fleet sizes, comma separated (default {FULL['idle']})")
    parser.add_argument("--active", type=int, default=50, help="devices in the round-trip loop")
    parser.add_argument("--seconds", type=float, help="control-plane measured window (default 10)")
    parser.add_argument("--warmup", type=float, help="control-plane warm-up (default 2)")
    parser.add_argument("--connect-concurrency", type=int, default=100, help="idle CONNECTs in flight (all processes)")
    parser.add_argument("--idle-procs", type=int, default=2, help="processes the idle fleet is split over")
    parser.add_argument("--size-mib", type=int, help="data-plane file size (default 1024)")
    parser.add_argument("--http-seconds", type=int, help="wrk duration per case, whole seconds (default 10)")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nginx-workers", default="auto")
    parser.add_argument("--only", choices=["control", "data"], help="run one half")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before starting, wait up to this long for the machine to be quiet (shared machines)")
    parser.add_argument("--json", type=Path, help="write raw results here")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.idle = [int(n) for n in str(args.idle).split(",") if n.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    raise_nofile()
    tools = ensure_tools()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    children = Children()
    busy = machine_busy_pct(args.wait_idle)
    results: dict[str, Any] = {"meta": {**machine(), "busy_before_pct": busy, "tools": tools.versions, "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}, "control": {}, "data": {}}
    with tempfile.TemporaryDirectory(prefix="ota-anchors-") as tmp:
        try:  # children go before their temp dir does
            root = Path(tmp)
            (root / "ours").mkdir()
            print(f"# file: {args.size_mib} MiB under {CACHE}", file=sys.stderr)
            package = big_file(args.size_mib * MIB)
            if args.only != "data":
                results["control"] = measure_control(children, tools, root, package, args)
            if args.only != "control":
                print("# data plane: ota-server vs nginx", file=sys.stderr)
                results["data"] = data_plane(children, tools, root, package, args)
                results["data"]["size_mib"] = args.size_mib
        finally:
            children.close()
    results["meta"]["run_seconds"] = time.perf_counter() - started
    print(report(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # children are already gone (finally in main)
        sys.exit(130)
