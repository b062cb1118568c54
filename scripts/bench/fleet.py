"""Benchmark: upgrade a fleet of simulated devices end to end over loopback.

Starts `ota-server` as its own process (so its memory is measured alone) on free
127.0.0.1 ports with a temporary catalog: one product, firmware 1.0.0 and 1.1.0, no batch
yet. N devices from scripts/device_sim.py connect, report 1.0.0 and wait. Once all have
reported, the bench adds a pushed dynamic batch and reloads (admin API): the server pushes
to the whole online fleet at once; then each device downloads over HTTP with Range,
reports progress, reboots and reports 1.1.0. Prints a table: wall time, pushes per second
(server-side: first to last `notified` transition), upgraded/failed, CPU, peak RSS.

    .venv/bin/python scripts/bench/fleet.py --devices 1000
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import re
import sqlite3
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from devicekit import simulator
from devicekit.loopback import ServerProcess, free_port, write_broker_yaml


def add_batch(root: Path, protocol: str) -> None:
    with (root / "ota.yaml").open("a", encoding="utf-8") as catalog:
        catalog.write(f"batches:\n  - {{name: bench, package: fw-1.1.0, type: upgrade, protocol: {protocol}, "
                      "mode: dynamic, push: true}\n")


def reload(root: Path) -> None:
    info = json.loads((root / "var" / "server.json").read_text())
    token = (root / "var" / "admin-token").read_text().strip()
    request = urllib.request.Request(f"{info['http_url']}/admin/api/reload", method="POST",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310 - loopback
        assert response.status == 200


def db_scalar(root: Path, sql: str) -> Any:
    with sqlite3.connect(f"file:{root / 'var' / 'ota.sqlite3'}?mode=ro", uri=True, timeout=10) as db:
        return db.execute(sql).fetchone()


def write_config(root: Path, mqtt_port: int, http_port: int, size: int) -> Path:
    packages = root / "packages"
    packages.mkdir()
    rng = random.Random(7)
    (packages / "fw-1.0.0.bin").write_bytes(rng.randbytes(size))
    (packages / "fw-1.1.0.bin").write_bytes(rng.randbytes(size))
    (root / "ota.yaml").write_text("""
packages_dir: packages
products:
  - {key: a1Bench, name: Bench, secret: bench-secret}
packages:
  - {id: fw-1.0.0, product: a1Bench, version: 1.0.0, file: fw-1.0.0.bin, sign_method: SHA256}
  - {id: fw-1.1.0, product: a1Bench, version: 1.1.0, file: fw-1.1.0.bin, sign_method: SHA256}
""", encoding="utf-8")
    return write_broker_yaml(root, mqtt_port, http_port)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # children that ended: the device processes
    return usage.ru_utime + usage.ru_stime


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="ota-bench-") as tmp:
        root = Path(tmp)
        mqtt_port, http_port = free_port(), free_port()
        config = write_config(root, mqtt_port, http_port, args.size)
        server_log = root / "server.log"
        server = ServerProcess(config, mqtt_port, log=server_log, extra_args=("--log-level", "WARNING"))
        server.start()
        try:
            idle_rss = peak_rss_mib(server.pid)
            server_cpu_before = cpu_seconds(server.pid)
            own_cpu_before = time.process_time() + children_cpu_seconds()
            cfgs = [simulator.DeviceConfig(device_name=f"bench-{i:05d}", product_key="a1Bench",
                                            product_secret="bench-secret", mqtt_port=mqtt_port,
                                            chunk=args.chunk, timeout=args.timeout)
                    for i in range(args.devices)]
            started = time.perf_counter()
            fleet = asyncio.ensure_future(simulator.run_fleet_split(cfgs, args.concurrency, args.procs))
            while db_scalar(root, "SELECT count(*) FROM device_versions")[0] < args.devices:
                if fleet.done():
                    break
                await asyncio.sleep(0.2)
            connected = time.perf_counter() - started
            add_batch(root, args.protocol)
            batch_started = time.time()
            await asyncio.to_thread(reload, root)
            reload_seconds = time.time() - batch_started  # the whole fleet's jobs made and committed
            results = await fleet
            wall = time.perf_counter() - started
            peak = peak_rss_mib(server.pid)
            server_cpu = cpu_seconds(server.pid) - server_cpu_before
            sim_cpu = time.process_time() + children_cpu_seconds() - own_cpu_before
        finally:
            server.stop()
            log_lines = server_log.read_text(encoding="utf-8", errors="replace").splitlines()
            if args.server_log:
                Path(args.server_log).write_text("\n".join(log_lines) + "\n", encoding="utf-8")
    # The readiness probe (a bare TCP connect) is the one warning every run logs.
    problems = [line for line in log_lines if (" WARNING " in line or " ERROR " in line or "Traceback" in line)
                and "No data to decode MQTT packet fixed header" not in line]
    upgraded = sum(r.outcome == "upgraded" for r in results)
    failed = len(results) - upgraded
    per_device = sorted(r.seconds for r in results)
    push_delays = sorted(r.offer_at - batch_started for r in results if r.offer_at is not None)
    pushes = len(push_delays)
    last_push = push_delays[-1] if push_delays else float("nan")
    rows = [
        ("devices", f"{args.devices}"), ("package size", f"{args.size} B"), ("protocol", args.protocol),
        ("concurrency", f"{args.concurrency} (devices in {args.procs} processes)"),
        ("upgraded / failed", f"{upgraded} / {failed}"),
        ("wall time", f"{wall:.1f} s (all connected and reported after {connected:.1f} s)"),
        ("reload answered in", f"{reload_seconds:.2f} s (starts the batch: {args.devices} jobs)"),
        ("pushes received", f"{pushes} within {last_push:.2f} s of the reload = {pushes / last_push:.0f} per second"),
        ("push delay p50 / p99", f"{push_delays[pushes // 2]:.2f} s / {push_delays[int(pushes * 0.99) - 1]:.2f} s"),
        ("upgrades per second", f"{upgraded / (wall - connected):.0f} (after the batch started)"),
        ("device time p50 / p99 / max", f"{per_device[len(per_device) // 2]:.2f} s / "
                                        f"{per_device[int(len(per_device) * 0.99) - 1]:.2f} s / {per_device[-1]:.2f} s"),
        ("server RSS idle / peak", f"{idle_rss:.0f} MiB / {peak:.0f} MiB"),
        ("CPU server / devices", f"{server_cpu:.1f} s / {sim_cpu:.1f} s"),
        ("server log", f"{len(problems)} warning/error lines" + (f", first: {problems[0][:160]}" if problems else "")),
        ("machine", f"{os.cpu_count()} cores"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    reasons = Counter(re.sub(r"\d+", "N", f"{r.outcome} {r.reason}")[:110] for r in results if r.outcome != "upgraded")
    for reason, count in reasons.most_common(8):
        print(f"  {count} devices: {reason}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=200, help="devices connecting at once")
    parser.add_argument("--procs", type=int, default=2, help="processes the simulated fleet is split over")
    parser.add_argument("--size", type=int, default=256 * 1024, help="package size in bytes")
    parser.add_argument("--chunk", type=int, default=65536, help="bytes per Range request or MQTT block")
    parser.add_argument("--protocol", choices=["http", "mqtt"], default="http")
    parser.add_argument("--timeout", type=float, default=300.0, help="per device")
    parser.add_argument("--server-log", metavar="PATH", help="keep the server's log here")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
