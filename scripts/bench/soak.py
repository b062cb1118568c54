"""Soak benchmark: one long-running `ota-server` through many release rounds.

Starts `ota-server` as its own process (as fleet.py does) on free 127.0.0.1 ports with a
temporary catalog: one product (derived secrets), firmware 1.0.0, no batch. Then, R times,
as an operator would: write a new package file (version 2.K.0), add it and two pushed
dynamic batches to the catalog (one `protocol: http`, one `protocol: mqtt`, the fleet
split between them by `devices:` lists, alternating every round) and reload through the
admin API; N simulated devices (scripts/device_sim.py, in 2 processes) connect, report
their version and upgrade; a few fail on purpose with a negative step and a few drop
their connection mid-download and resume. Then the round's batches and the previous
round's package leave the catalog, that package's file is deleted, and the catalog is
reloaded. A poller meanwhile reads GET /admin/api/status, /admin/api/devices?limit=50,
/metrics, one device's page and runs `otactl status`, every few seconds.

Per round, measured after the cleanup reload once the server's descriptors are back to
round 1's count (at most --settle s), with the poller paused: server RSS (VmRSS), open
descriptors (and how many point at deleted files), database size (ota.sqlite3 + -wal),
jobs in the database, median and max latency of each admin read during the round, and
upgrades done, failed on purpose and resumed, as a markdown table. At the end, with the
fleet idle, --final-samples more cycles of admin reads, then one verdict line per
criterion: descriptors back to round 1's after every round and no deleted package file
held; the least-squares RSS slope over the rounds after --warmup; each admin read's median
at the end under 100 ms (`otactl status`: what it takes over `otactl --help`, the process
start); every outcome as planned, the database's job states matching, and every device's
final version equal to what GET /admin/api/devices says.

--seed-jobs N: a real template round 0 first (the same fleet, firmware 2.0.0, batches
r0000-http and r0000-mqtt, removed again), then the server is stopped and the template's
rows (batches, batch_targets, jobs, job_events, every column as the server wrote it) are
copied with sqlite3 under new batch names (seed-NNNNN-http|mqtt), new job ids and times
shifted back an hour per copy, until N jobs were added; then the server is started again on
that database and round 1 begins. So round 1 runs at N jobs of removed batches (about
N / devices per device) without N / devices real rounds.

    .venv/bin/python scripts/bench/soak.py --quick                       # ~40 s
    .venv/bin/python scripts/bench/soak.py --json /tmp/soak.json         # 2,000 devices, 60 rounds, ~20 min
    .venv/bin/python scripts/bench/soak.py --seed-jobs 200000 --rounds 10
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from devicekit import simulator
from devicekit.loopback import ServerProcess, free_port, write_broker_yaml

PRODUCT, PRODUCT_SECRET = "a1Soak", "soak-product-secret"
MIB = 1024 * 1024
READS = ("status", "devices", "metrics", "device", "otactl")
READ_LABELS = {"status": "GET /admin/api/status", "devices": "GET /admin/api/devices?limit=50",
               "metrics": "GET /metrics", "device": "GET /admin/api/devices/{product}/{device}",
               "otactl": "otactl status"}
LATENCY_LIMIT_MS = 100.0


def device_name(i: int) -> str:
    return f"soak-{i:05d}"


def version_of(k: int) -> str:
    """Round k's firmware (round 0 is the template round of --seed-jobs)."""
    return f"2.{k}.0"


# ----------------------------------------------------------------------------- the catalog


@dataclass
class Catalog:
    """What the catalog holds now; written out whole on every change."""

    root: Path
    packages: dict[str, str] = field(default_factory=dict)  # id -> version (file: id + .bin)
    batches: list[tuple[str, str, str, list[str]]] = field(default_factory=list)  # name, package, protocol, devices

    def write(self) -> None:
        lines = ["packages_dir: packages", "products:",
                 f"  - {{key: {PRODUCT}, name: Soak, secret: {PRODUCT_SECRET}}}", "packages:"]
        for package_id, version in self.packages.items():
            lines.append(f"  - {{id: {package_id}, product: {PRODUCT}, version: {version}, "
                         f"file: {package_id}.bin, sign_method: SHA256}}")
        if self.batches:
            lines.append("batches:")
        for name, package_id, protocol, devices in self.batches:
            lines += [f"  - name: {name}", f"    package: {package_id}", "    type: upgrade",
                      f"    protocol: {protocol}", "    mode: dynamic", "    push: true",
                      f"    devices: [{', '.join(devices)}]"]
        path = self.root / "ota.yaml"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(path)  # the server never reads half a file

    def add_package(self, k: int, size: int, seed: int) -> str:
        package_id = f"fw-{version_of(k)}"
        (self.root / "packages" / f"{package_id}.bin").write_bytes(random.Random(seed * 1000 + k).randbytes(size))
        self.packages[package_id] = version_of(k)
        return package_id

    def remove_package(self, package_id: str) -> None:
        del self.packages[package_id]


# --------------------------------------------------------------------- the server process


class Server:
    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.root, self.args = root, args
        self.mqtt_port, self.http_port = free_port(), free_port()
        self.config = write_broker_yaml(root, self.mqtt_port, self.http_port)
        self.log = root / "server.log"
        self.process: ServerProcess | None = None
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.token = ""
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> float:
        """Start and wait for the admin API to answer; returns the seconds it took."""
        started = time.perf_counter()
        self.process = ServerProcess(self.config, self.mqtt_port, log=self.log, extra_args=("--log-level", "WARNING"))
        await asyncio.to_thread(self.process.start, 300)
        self.token = (self.root / "var" / "admin-token").read_text().strip()
        self.starts += 1
        async with aiohttp.ClientSession() as session:
            for _ in range(600):
                try:
                    async with session.get(f"{self.url}/admin/api/status", headers=self.headers) as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        return time.perf_counter() - started

    def stop(self) -> None:
        if self.process is not None and self.process.process is not None:
            self.process.stop()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def otactl(self) -> list[str]:
        return [str(Path(sys.executable).with_name("otactl")), "--config", str(self.config)]


def proc_figures(pid: int, packages: Path | None = None) -> dict[str, Any]:
    """RSS, peak RSS, and the process's descriptors by kind; files it holds whose name was
    deleted are listed, and counted apart when they were in `packages`."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    kinds: Counter[str] = Counter()
    deleted: list[str] = []
    files: list[str] = []
    fd_dir = Path(f"/proc/{pid}/fd")
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / name)
        except OSError:
            continue  # closed while we looked
        if target.endswith(" (deleted)"):
            deleted.append(target)
        kind = target.split(":", 1)[0] if ":" in target and not target.startswith("/") else "file"
        kinds[kind] += 1
        if kind == "file":
            files.append(target)
    return {"rss_mib": int(status["VmRSS"].split()[0]) / 1024, "hwm_mib": int(status["VmHWM"].split()[0]) / 1024,
            "fds": sum(kinds.values()), "fd_kinds": dict(kinds), "deleted_fds": len(deleted),
            "deleted_files": sorted(deleted), "files": sorted(files),
            "deleted_package_fds": sum(packages is not None and t.startswith(f"{packages}/") for t in deleted)}


def db_path(root: Path) -> Path:
    return root / "var" / "ota.sqlite3"


def db_figures(root: Path, batches: list[str]) -> dict[str, Any]:
    path = db_path(root)
    size = sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
        jobs = db.execute("SELECT count(*) FROM jobs").fetchone()[0]
        events = db.execute("SELECT count(*) FROM job_events").fetchone()[0]
        seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'jobs'").fetchone()
        states = dict(db.execute(f"SELECT state, count(*) FROM jobs WHERE batch IN ({','.join('?' * len(batches))}) "
                                 "GROUP BY state", batches).fetchall()) if batches else {}
    return {"db_mib": size / MIB, "jobs": jobs, "job_events": events, "jobs_ever": seq[0] if seq else 0,
            "round_job_states": states}


# -------------------------------------------------------------------------- admin reads


@dataclass
class Sample:
    round: int
    read: str
    ms: float
    ok: bool
    busy: bool  # devices were upgrading at that moment
    at: float


class Poller:
    """Reads the admin API and runs `otactl status` every `interval` s, one after the other.
    Each request has its own connection (Connection: close) so the poller holds no socket
    of the server's between reads; `quiet` is held while descriptors are counted."""

    def __init__(self, server: Server, interval: float) -> None:
        self.server, self.interval = server, interval
        self.samples: list[Sample] = []
        self.round = 0
        self.busy = False
        self.quiet = asyncio.Lock()
        self.errors: Counter[str] = Counter()
        self.device_known = False  # the device page is a 404 until the device first reported
        self._task: asyncio.Task[None] | None = None

    async def _timed_get(self, session: aiohttp.ClientSession, read: str, path: str) -> None:
        started = time.perf_counter()
        ok = False
        try:
            async with session.get(self.server.url + path, headers=self.server.headers) as resp:
                await resp.read()
                ok = resp.status == 200
                if not ok:
                    self.errors[f"{read}: HTTP {resp.status}"] += 1
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.errors[f"{read}: {type(exc).__name__}"] += 1
        self._record(read, started, ok)

    async def _otactl(self) -> None:
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(*self.server.otactl(), "status", stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE, cwd=self.server.root)
        _, err = await proc.communicate()
        if proc.returncode != 0:
            self.errors[f"otactl: exit {proc.returncode}: {err.decode(errors='replace').strip()[:120]}"] += 1
        self._record("otactl", started, proc.returncode == 0)

    def _record(self, read: str, started: float, ok: bool) -> None:
        ms = (time.perf_counter() - started) * 1000
        self.samples.append(Sample(self.round, read, ms, ok, self.busy, time.time()))

    async def cycle(self, session: aiohttp.ClientSession) -> None:
        async with self.quiet:
            await self._timed_get(session, "status", "/admin/api/status")
            await self._timed_get(session, "devices", "/admin/api/devices?limit=50")
            await self._timed_get(session, "metrics", "/metrics")
            if self.device_known:
                await self._timed_get(session, "device", f"/admin/api/devices/{PRODUCT}/{device_name(0)}")
            await self._otactl()

    async def _run(self) -> None:
        async with self.session() as session:
            while True:
                started = time.monotonic()
                await self.cycle(session)
                await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    @staticmethod
    def session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                     timeout=aiohttp.ClientTimeout(total=60))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None


def latency(samples: list[Sample]) -> dict[str, dict[str, float | int]]:
    out: dict[str, dict[str, float | int]] = {}
    for read in READS:
        values = [s.ms for s in samples if s.read == read]
        if values:
            out[read] = {"n": len(values), "p50_ms": statistics.median(values), "max_ms": max(values)}
    return out


async def process_start_ms(server: Server, times: int = 3) -> float:
    """`otactl --help`: the process start and imports every `otactl status` also pays."""
    values = []
    for _ in range(times):
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(*server.otactl(), "--help", stdout=asyncio.subprocess.DEVNULL)
        await proc.wait()
        values.append((time.perf_counter() - started) * 1000)
    return statistics.median(values)


@dataclass
class Plan:
    """What each device does this round."""

    fail: dict[str, int]  # device -> negative step it reports
    drop: dict[str, float]  # device -> percent at which it drops its connection once


def plan_round(k: int, names: list[str], args: argparse.Namespace) -> Plan:
    rng = random.Random(args.seed * 7919 + k)
    shuffled = names[:]
    rng.shuffle(shuffled)
    n_fail = round(len(names) * args.fail_percent / 100)
    n_drop = round(len(names) * args.drop_percent / 100)
    fail = {name: rng.choice((-1, -2, -3, -4)) for name in shuffled[:n_fail]}
    drop = {name: float(rng.randint(20, 80)) for name in shuffled[n_fail:n_fail + n_drop]}
    return Plan(fail, drop)


# -------------------------------------------------------------------------- the rounds


class Soak:
    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.root, self.args = root, args
        self.server = Server(root, args)
        self.catalog = Catalog(root)
        self.names = [device_name(i) for i in range(args.devices)]
        self.versions = {name: "1.0.0" for name in self.names}  # what each device runs, as it knows
        self.poller: Poller | None = None
        self.pool: ProcessPoolExecutor | None = None
        self.rounds: list[dict[str, Any]] = []
        self.baseline_fds: int | None = None
        self.seed_info: dict[str, Any] | None = None
        self.aborted: str | None = None
        self.start_ms = float("nan")  # otactl's own process start
        self.final_latency: dict[str, dict[str, float | int]] = {}
        self.final_versions: dict[str, str | None] = {}
        self.final_figures: dict[str, Any] = {}

    async def reload(self, session: aiohttp.ClientSession) -> float:
        started = time.perf_counter()
        async with session.post(f"{self.server.url}/admin/api/reload", headers=self.server.headers,
                                timeout=aiohttp.ClientTimeout(total=300)) as resp:
            body = await resp.json(content_type=None)
            if resp.status != 200:
                raise RuntimeError(f"reload refused ({resp.status}): {body}")
        return time.perf_counter() - started

    async def online(self, session: aiohttp.ClientSession) -> int:
        async with session.get(f"{self.server.url}/admin/api/devices?online=true&limit=1",
                               headers=self.server.headers) as resp:
            return int((await resp.json())["total"])

    def device_configs(self, plan: Plan) -> list[simulator.DeviceConfig]:
        return [simulator.DeviceConfig(
            device_name=name, product_key=PRODUCT, product_secret=PRODUCT_SECRET, version=self.versions[name],
            mqtt_port=self.server.mqtt_port, chunk=self.args.chunk, timeout=self.args.timeout,
            fail_step=plan.fail.get(name), drop_at=plan.drop.get(name)) for name in self.names]

    async def one_round(self, k: int, session: aiohttp.ClientSession, previous: str | None) -> dict[str, Any]:
        args = self.args
        round_started = time.perf_counter()
        if self.poller is not None:
            self.poller.round = k
        # 1. the operator adds the new package and the round's two batches, and reloads
        package_id = self.catalog.add_package(k, args.size, args.seed)
        half = [self.names[i::2] for i in (k % 2, (k + 1) % 2)]  # each device alternates protocols
        batches = [(f"r{k:04d}-http", package_id, "http", half[0]), (f"r{k:04d}-mqtt", package_id, "mqtt", half[1])]
        plan = plan_round(k, self.names, args)
        cfgs = self.device_configs(plan)
        # 2. the fleet comes online and reports; the batches start; each device upgrades
        if self.poller is not None:
            self.poller.busy = True
        fleet = asyncio.ensure_future(simulator.run_fleet_split(cfgs, args.concurrency, args.procs, self.pool))
        deadline = time.monotonic() + 60
        while not fleet.done() and time.monotonic() < deadline and await self.online(session) < len(self.names):
            await asyncio.sleep(0.2)
        if self.poller is not None:
            self.poller.device_known = True
        self.catalog.batches = batches
        self.catalog.write()
        reload_add = await self.reload(session)
        results = await fleet
        if self.poller is not None:
            self.poller.busy = False
        fleet_seconds = time.perf_counter() - round_started
        # 3. the operator removes the round's batches and the previous package, deletes its file, reloads
        self.catalog.batches = []
        if previous is not None:
            self.catalog.remove_package(previous)
        self.catalog.write()
        if previous is not None:
            (self.root / "packages" / f"{previous}.bin").unlink()
        reload_remove = await self.reload(session)
        # 4. tally what the devices saw
        upgraded = failed_on_purpose = resumed = 0
        unexpected: list[str] = []
        for cfg, r in zip(cfgs, results):
            resumed += r.resumed
            if r.outcome == "upgraded" and cfg.fail_step is None and r.to_version == version_of(k):
                upgraded += 1
                self.versions[r.device_name] = r.to_version
            elif r.outcome == "failed" and r.expected and r.step == cfg.fail_step:
                failed_on_purpose += 1
            else:
                unexpected.append(r.summary())
                if r.outcome == "upgraded" and r.to_version:
                    self.versions[r.device_name] = r.to_version
        # 5. let it settle and measure, with the poller quiet
        figures = await self.measure([b[0] for b in batches])
        figures.update({
            "round": k, "version": version_of(k), "upgraded": upgraded, "failed_on_purpose": failed_on_purpose,
            "failed_planned": len(plan.fail), "drops_planned": len(plan.drop), "resumed": resumed,
            "unexpected": len(unexpected), "unexpected_first": unexpected[:5],
            "fleet_s": fleet_seconds, "round_s": time.perf_counter() - round_started,
            "reload_add_s": reload_add, "reload_remove_s": reload_remove,
        })
        states = figures["round_job_states"]
        figures["server_agrees"] = (states.get("succeeded", 0) == upgraded
                                    and states.get("failed", 0) == failed_on_purpose
                                    and sum(states.values()) == upgraded + failed_on_purpose)
        return figures

    async def measure(self, batches: list[str]) -> dict[str, Any]:
        """Wait (at most --settle s) until the descriptors are back to the baseline and no
        deleted file is held, or stop changing for 2 s; then read everything."""
        quiet = self.poller.quiet if self.poller is not None else asyncio.Lock()
        async with quiet:
            started = time.monotonic()
            last, last_change = None, started
            while True:
                now = proc_figures(self.server.pid, self.root / "packages")
                if now["fds"] != last:
                    last, last_change = now["fds"], time.monotonic()
                back = (self.baseline_fds is not None and now["fds"] <= self.baseline_fds
                        and not now["deleted_package_fds"])
                if back or time.monotonic() - last_change >= 2 or time.monotonic() - started >= self.args.settle:
                    break
                await asyncio.sleep(0.1)
            now["settle_s"] = time.monotonic() - started
            now.update(await asyncio.to_thread(db_figures, self.root, batches))
        return now

    async def seed(self, session: aiohttp.ClientSession) -> None:
        """--seed-jobs: a real template round (round 0), then its removed batches' rows copied
        with sqlite3 while the server is stopped, until the database holds N more jobs."""
        print(f"seeding: template round 0 with {len(self.names)} devices ...", file=sys.stderr, flush=True)
        template = await self.one_round(0, session, "fw-1.0.0")
        self.server.stop()
        started = time.perf_counter()
        self.seed_info = await asyncio.to_thread(seed_database, db_path(self.root), ["r0000-http", "r0000-mqtt"],
                                                 self.args.seed_jobs)
        self.seed_info["template_round"] = {k: template[k] for k in ("upgraded", "failed_on_purpose", "unexpected")}
        self.seed_info["write_s"] = time.perf_counter() - started
        self.seed_info["restart_s"] = await self.server.start()
        print(f"seeding: {self.seed_info['jobs_added']} jobs in {self.seed_info['copies']} copies of the template's "
              f"{self.seed_info['template_jobs']} in {self.seed_info['write_s']:.1f} s; server restarted in "
              f"{self.seed_info['restart_s']:.1f} s", file=sys.stderr, flush=True)

    async def run(self) -> None:
        args = self.args
        (self.root / "packages").mkdir()
        (self.root / "packages" / "fw-1.0.0.bin").write_bytes(random.Random(args.seed).randbytes(args.size))
        self.catalog.packages["fw-1.0.0"] = "1.0.0"
        self.catalog.write()
        if args.procs > 1:
            self.pool = ProcessPoolExecutor(args.procs, mp_context=multiprocessing.get_context("spawn"))
        try:
            await self.server.start()
            async with Poller.session() as session:
                previous = "fw-1.0.0"
                if args.seed_jobs:
                    await self.seed(session)
                    previous = f"fw-{version_of(0)}"
                self.start_ms = await process_start_ms(self.server)
                self.poller = Poller(self.server, args.poll_interval)
                self.poller.start()
                try:
                    for k in range(1, args.rounds + 1):
                        figures = await self.one_round(k, session, previous)
                        previous = f"fw-{version_of(k)}"
                        figures["latency"] = latency([s for s in self.poller.samples if s.round == k])
                        if self.baseline_fds is None:
                            self.baseline_fds = figures["fds"]
                        self.rounds.append(figures)
                        print(progress_line(figures), file=sys.stderr, flush=True)
                except Exception as exc:  # noqa: BLE001 -- report the rounds that ran
                    if not self.rounds:
                        raise
                    self.aborted = f"round {len(self.rounds) + 1}: {type(exc).__name__}: {exc}"
                    print(f"aborted in {self.aborted}", file=sys.stderr, flush=True)
                await self.poller.stop()
                if self.server.process is not None and self.server.process.process.poll() is not None:
                    status = self.server.process.process.poll()
                    self.aborted = (self.aborted or "") + f"; the server exited with status {status}"
                    return
                # the end: the admin reads with the fleet idle
                self.poller.round, self.poller.busy = args.rounds + 1, False
                for _ in range(args.final_samples):
                    await self.poller.cycle(session)
                self.final_latency = latency([s for s in self.poller.samples if s.round == args.rounds + 1])
                self.final_versions = await server_versions(self.server, session)
                self.final_figures = await self.measure([])
        finally:
            if self.poller is not None:
                await self.poller.stop()
            self.server.stop()
            if self.pool is not None:
                self.pool.shutdown(cancel_futures=True)


async def server_versions(server: Server, session: aiohttp.ClientSession) -> dict[str, str | None]:
    """Every device's default-module version as GET /admin/api/devices says, paged."""
    versions: dict[str, str | None] = {}
    offset = 0
    while True:
        async with session.get(f"{server.url}/admin/api/devices?product={PRODUCT}&offset={offset}&limit=500",
                               headers=server.headers) as resp:
            body = await resp.json()
        for device in body["devices"]:
            versions[device["device"]] = (device.get("versions") or {}).get("default")
        offset += len(body["devices"])
        if not body["devices"] or offset >= body["total"]:
            return versions


# ---------------------------------------------------------------------------- seeding


def seed_database(path: Path, template_batches: list[str], want: int) -> dict[str, Any]:
    """Copy the template batches' rows (batches, batch_targets, jobs, job_events) under new
    batch names (seed-NNNNN-...) and new job ids, shifted back in time, until `want` jobs were
    added. The server must be stopped. Every column is copied as the server wrote it, so the
    rows are real finished jobs of removed batches, whatever columns the schema has."""
    db = sqlite3.connect(path)
    try:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        known = {"device_versions", "batches", "batch_targets", "jobs", "job_events", "counters", "package_status",
                 "sqlite_sequence"}

        def columns(table: str) -> list[str]:
            return [row[1] for row in db.execute(f"PRAGMA table_info({table})")]

        marks = ",".join("?" * len(template_batches))
        job_ids = [row[0] for row in db.execute(f"SELECT id FROM jobs WHERE batch IN ({marks}) ORDER BY id",
                                                template_batches)]
        if not job_ids:
            raise RuntimeError("the template round made no jobs")
        per_copy = len(job_ids)
        copies = -(-want // per_copy)
        job_cols = [c for c in columns("jobs") if c not in ("id", "batch", "created_at", "updated_at")]
        event_cols = [c for c in columns("job_events") if c not in ("id", "job_id", "at")]
        batch_cols = [c for c in columns("batches") if c not in ("name", "created_at", "started_at", "ended_at")]
        target_cols = [c for c in columns("batch_targets") if c != "batch"] if "batch_targets" in tables else []
        first_id, last_id = job_ids[0], job_ids[-1]
        top = db.execute("SELECT max(id) FROM jobs").fetchone()[0]
        span = last_id - first_id + 1
        hour = 3600.0
        added = 0
        db.execute("BEGIN")
        for i in range(copies):
            n_jobs = min(per_copy, want - added)
            offset = top + i * span - first_id + 1  # copy i's ids follow everything before
            shift = (copies - i) * hour  # copy 0 is the oldest
            rename = f"'seed-{i:05d}-' || substr(batch, 7)"  # r0000-http -> seed-00000-http
            keep = job_ids[n_jobs - 1]
            j = ", ".join(job_cols)
            db.execute(f"INSERT INTO jobs (id, batch, created_at, updated_at, {j}) "
                       f"SELECT id + ?, {rename}, created_at - ?, updated_at - ?, {j} FROM jobs "
                       f"WHERE batch IN ({marks}) AND id <= ?", (offset, shift, shift, *template_batches, keep))
            e = ", ".join(event_cols)
            db.execute(f"INSERT INTO job_events (job_id, at, {e}) SELECT job_id + ?, at - ?, {e} FROM job_events "
                       f"WHERE job_id BETWEEN ? AND ? ORDER BY id", (offset, shift, first_id, keep))
            b = ", ".join(batch_cols)
            db.execute(f"INSERT INTO batches (name, created_at, started_at, ended_at, {b}) "
                       f"SELECT 'seed-{i:05d}-' || substr(name, 7), created_at - ?, started_at - ?, ended_at - ?, {b} "
                       f"FROM batches WHERE name IN ({marks})", (shift, shift, shift, *template_batches))
            if target_cols:
                t = ", ".join(target_cols)
                db.execute(f"INSERT INTO batch_targets (batch, {t}) SELECT {rename}, {t} FROM batch_targets "
                           f"WHERE batch IN ({marks})", template_batches)
            added += n_jobs
        db.commit()
        jobs = db.execute("SELECT count(*) FROM jobs").fetchone()[0]
    finally:
        db.close()
    return {"method": "sqlite copies of a real template round's removed batches", "jobs_added": added,
            "copies": copies, "template_jobs": per_copy, "jobs_after": jobs,
            "tables_not_copied": sorted(tables - known)}


# ----------------------------------------------------------------------------- report


def progress_line(f: dict[str, Any]) -> str:
    return (f"round {f['round']}: {f['upgraded']} upgraded, {f['failed_on_purpose']} failed on purpose, "
            f"{f['unexpected']} unexpected; RSS {f['rss_mib']:.1f} MiB, {f['fds']} fds "
            f"({f['deleted_fds']} deleted), {f['jobs']} jobs, {f['round_s']:.1f} s")


def fmt_ms(stats: dict[str, float | int] | None) -> str:
    if not stats:
        return "-"
    return f"{stats['p50_ms']:.0f} / {stats['max_ms']:.0f}"


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def verdicts(soak: Soak) -> list[dict[str, Any]]:
    args, rounds = soak.args, soak.rounds
    out = []
    # descriptors
    base = rounds[0]["fds"]
    over = [r["round"] for r in rounds if r["fds"] > base + args.fd_slack]
    held = [r["round"] for r in rounds if r["deleted_package_fds"]]
    other = [r["round"] for r in rounds if r["deleted_fds"] > r["deleted_package_fds"]]
    fds_ok = not over and not held
    out.append({"criterion": "fds", "pass": fds_ok, "text": (
        f"open fds after each round's cleanup back to round 1's {base}"
        + (f" (+{args.fd_slack} allowed)" if args.fd_slack else "") + ": "
        + ("every round" if not over else f"over in {len(over)} round(s), first {over[0]} "
           f"({rounds[over[0] - 1]['fds']}), last {rounds[-1]['fds']}")
        + "; deleted package files held: " + ("none" if not held else f"in {len(held)} round(s), up to "
                                              f"{max(r['deleted_package_fds'] for r in rounds)} at once, e.g. "
                                              f"{rounds[held[-1] - 1]['deleted_files'][:2]}")
        + ("" if not other else f"; other deleted files held in {len(other)} round(s), e.g. "
                                f"{rounds[other[-1] - 1]['deleted_files'][:2]}"))})
    # memory
    warm = [r for r in rounds if r["round"] > args.warmup]
    if len(warm) >= 2:
        s = slope([r["round"] for r in warm], [r["rss_mib"] for r in warm])
        jobs_per_round = statistics.fmean(r["upgraded"] + r["failed_on_purpose"] for r in warm) or 1
        out.append({"criterion": "rss", "pass": s <= args.rss_slope_max, "slope_mib_per_round": s, "text": (
            f"RSS {s:+.3f} MiB/round over rounds {warm[0]['round']}-{warm[-1]['round']} (least squares; "
            f"{s * 1024 / jobs_per_round * 1000:+.1f} KiB per 1,000 jobs; limit {args.rss_slope_max} MiB/round); "
            f"{warm[0]['rss_mib']:.1f} -> {warm[-1]['rss_mib']:.1f} MiB, round 1 {rounds[0]['rss_mib']:.1f} MiB")})
    else:
        out.append({"criterion": "rss", "pass": None,
                    "text": f"RSS slope: needs 2 rounds after --warmup {args.warmup}"})
    if not soak.final_figures:
        out.append({"criterion": "run", "pass": False, "text": f"aborted in {soak.aborted}"})
        return out
    # admin reads at the end
    final = soak.final_latency
    parts, lat_ok = [], True
    for read in READS:
        stats = final.get(read)
        if not stats:
            lat_ok = False
            parts.append(f"{read} no sample")
            continue
        p50 = stats["p50_ms"]
        if read == "otactl":  # a process start is not the server's: judge what status adds to it
            p50 -= soak.start_ms
            parts.append(f"otactl {stats['p50_ms']:.0f} ms ({p50:.0f} over its {soak.start_ms:.0f} ms start)")
        else:
            parts.append(f"{read} {p50:.1f} ms")
        lat_ok &= p50 < LATENCY_LIMIT_MS
    errors = sum(soak.poller.errors.values()) if soak.poller else 0
    lat_ok &= errors == 0
    out.append({"criterion": "admin_reads", "pass": lat_ok, "text": (
        f"admin reads at the end (fleet idle, {soak.final_figures['jobs']:,} jobs in the database), median of "
        f"{args.final_samples}: " + ", ".join(parts) + f" (limit {LATENCY_LIMIT_MS:.0f} ms); "
        f"failed reads during the run: {errors}")})
    if soak.aborted:
        out.append({"criterion": "run", "pass": False, "text": f"aborted in {soak.aborted}"})
        return out
    # correctness
    server = soak.final_versions
    mismatched = [n for n in soak.names if server.get(n) != soak.versions[n]]
    unexpected = sum(r["unexpected"] for r in rounds)
    disagree = [r["round"] for r in rounds if not r["server_agrees"]]
    done = sum(r["upgraded"] for r in rounds)
    failed = sum(r["failed_on_purpose"] for r in rounds)
    ok = not mismatched and not unexpected and not disagree
    out.append({"criterion": "upgrades", "pass": ok, "text": (
        f"{done:,} upgraded, {failed:,} failed on purpose, {unexpected} unexpected outcomes, "
        f"{sum(r['resumed'] for r in rounds):,} resumed after a drop; job states in the database "
        + ("match every round" if not disagree else f"differ in rounds {disagree[:5]}")
        + f"; final versions equal the server's for {len(soak.names) - len(mismatched):,}/{len(soak.names):,} devices"
        + (f" (first: {mismatched[0]} runs {soak.versions[mismatched[0]]}, server says {server.get(mismatched[0])})"
           if mismatched else ""))})
    return out


def report(soak: Soak, wall: float) -> dict[str, Any]:
    args, rounds = soak.args, soak.rounds
    print(f"\nSoak: {args.devices:,} devices, {args.rounds} rounds, {args.size:,} B packages, "
          f"{args.fail_percent:g}% fail on purpose, {args.drop_percent:g}% drop mid-download; "
          f"{os.cpu_count()} cores; {wall / 60:.1f} min")
    if soak.seed_info:
        seed = soak.seed_info
        print(f"Seeded {seed['jobs_added']:,} finished jobs of removed batches before round 1 ({seed['method']}: "
              f"{seed['copies']} copies of {seed['template_jobs']:,} jobs, written in {seed['write_s']:.1f} s, "
              f"server restarted in {seed['restart_s']:.1f} s)."
              + (f" Tables not copied: {', '.join(seed['tables_not_copied'])}." if seed["tables_not_copied"] else ""))
    print()
    head = ["round", "jobs in db", "RSS MiB", "fds", "deleted fds", "db MiB", "upgraded / failed / resumed",
            "status ms p50 / max", "devices ms", "metrics ms", "device page ms", "otactl status ms"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rounds:
        lat = r["latency"]
        cells = [str(r["round"]), f"{r['jobs']:,}", f"{r['rss_mib']:.1f}", str(r["fds"]), str(r["deleted_fds"]),
                 f"{r['db_mib']:.1f}", f"{r['upgraded']} / {r['failed_on_purpose']} / {r['resumed']}"
                 + (f" ({r['unexpected']} unexpected)" if r["unexpected"] else "")]
        cells += [fmt_ms(lat.get(read)) for read in READS]
        print("| " + " | ".join(cells) + " |")
    fin = soak.final_latency
    if soak.final_figures:
        end = soak.final_figures
        cells = [f"{end['jobs']:,}", f"{end['rss_mib']:.1f}", str(end["fds"]), str(end["deleted_fds"]),
                 f"{end['db_mib']:.1f}", ""] + [fmt_ms(fin.get(read)) for read in READS]
        print("| end, idle | " + " | ".join(cells) + " |")
    print()
    results = verdicts(soak)
    for v in results:
        mark = {True: "PASS", False: "FAIL", None: "n/a"}[v["pass"]]
        print(f"verdict {v['criterion']}: {mark}: {v['text']}")
    log_lines = soak.server.log.read_text(encoding="utf-8", errors="replace").splitlines()
    problems = [line for line in log_lines if (" WARNING " in line or " ERROR " in line or "Traceback" in line)
                and "No data to decode MQTT packet fixed header" not in line]
    print(f"server log: {len(problems)} warning/error lines" + (f", first: {problems[0][:160]}" if problems else ""))
    for r in rounds:
        for line in r["unexpected_first"][:2]:
            print(f"  round {r['round']} unexpected: {line[:160]}")
    return {
        "config": {k: v for k, v in vars(args).items() if k != "json"}, "cores": os.cpu_count(), "wall_s": wall,
        "otactl_start_ms": soak.start_ms, "seed": soak.seed_info, "rounds": rounds, "end": {
            "figures": soak.final_figures, "latency": soak.final_latency},
        "verdicts": results, "poller_errors": dict(soak.poller.errors) if soak.poller else {},
        "samples": [vars(s) for s in soak.poller.samples] if soak.poller else [],
        "server_log_problems": problems[:50],
    }


async def main_async(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="ota-soak-") as tmp:
        soak = Soak(Path(tmp), args)
        started = time.perf_counter()
        try:
            await soak.run()
        finally:
            if args.server_log and soak.server.log.exists():
                Path(args.server_log).write_text(soak.server.log.read_text(errors="replace"), encoding="utf-8")
        data = report(soak, time.perf_counter() - started)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
        print(f"figures written to {args.json}")
    return 0 if all(v["pass"] is not False for v in data["verdicts"]) else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--devices", type=int, default=2000, help="simulated devices (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=60, help="release rounds (default: %(default)s)")
    parser.add_argument("--size", type=int, default=64 * 1024, help="package size in bytes (default: %(default)s)")
    parser.add_argument("--chunk", type=int, default=16384,
                        help="bytes per Range request or MQTT block (default: %(default)s)")
    parser.add_argument("--fail-percent", type=float, default=2.0,
                        help="devices per round that report a negative step -1..-4")
    parser.add_argument("--drop-percent", type=float, default=5.0, help="devices per round that drop their connection "
                                                                        "once mid-download and resume")
    parser.add_argument("--poll-interval", type=float, default=3.0, help="seconds between admin read cycles")
    parser.add_argument("--final-samples", type=int, default=10, help="admin read cycles at the end, fleet idle")
    parser.add_argument("--warmup", type=int, default=5, help="rounds left out of the RSS slope")
    parser.add_argument("--rss-slope-max", type=float, default=0.25, help="MiB/round the RSS slope may reach")
    parser.add_argument("--fd-slack", type=int, default=0, help="descriptors over round 1's allowed")
    parser.add_argument("--settle", type=float, default=15.0, help="seconds to wait for descriptors to come back")
    parser.add_argument("--seed-jobs", type=int, default=0, metavar="N",
                        help="pre-fill the database with N finished jobs of removed batches (below)")
    parser.add_argument("--concurrency", type=int, default=200, help="devices connecting at once")
    parser.add_argument("--procs", type=int, default=2, help="processes the simulated fleet is split over")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per device and round")
    parser.add_argument("--seed", type=int, default=1, help="random seed (package bytes, who fails, who drops)")
    parser.add_argument("--quick", action="store_true",
                        help="200 devices, 10 rounds, --warmup 3, polls every second (~40 s)")
    parser.add_argument("--json", metavar="FILE", help="write every figure (and each latency sample) here")
    parser.add_argument("--server-log", metavar="PATH", help="keep the server's log here")
    args = parser.parse_args()
    if args.quick:
        args.devices, args.rounds, args.poll_interval, args.warmup = 200, 10, 1.0, 3
    if args.rounds < 1 or args.devices < 2:
        parser.error("--rounds must be at least 1 and --devices at least 2")
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
