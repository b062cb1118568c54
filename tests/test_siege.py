"""Siege (slow, `./scripts/test -m slow`): a real `ota-server` process upgrades 300 honest
devices while 50 hostile clients attack it over MQTT and HTTP, and nothing from the network
takes it down.

The honest fleet is scripts/device_sim.py in two processes: 150 devices of product a1SiegeH
upgrade over HTTP (signed Aliyun passwords, so each connect has a fresh client id), 150 of
a1SiegeM over MQTT blocks (the device secret as password: the client id is the device
name, so CONNECTs naming an honest device hit a live client id). The attackers are
scripts/hostile_clients.py in two processes of 25 clients, one per product: 12 without
credentials, 13 holding the credentials of four devices that are not among the honest 300
(they log in, get jobs, flood, hog blocks, ...), all sending wrong-password and protocol-5
CONNECTs in the honest devices' names. Besides them, the first process holds 1,000
connections logged in with one device's secret (a cloned credential), each its own client
id, reconnecting when closed, while the listener admits at most 1,000 connections: the
per-device cap (limits.max_connections_per_device) keeps them from taking the listener's
slots. They attack from before the first honest device connects until the last one is done.

Asserted: every honest device upgraded and the database says so (its one job succeeded,
target 1.1.0, its reported version 1.1.0); the server's peak RSS and its log stay under the
bounds below; every kind of attack was made; the server still answers MQTT and HTTP at the
end, no attacker ever found it unreachable, and none got an error answer (HTTP 5xx, bytes
that are no answer). It prints what it measured: durations, RSS, log size and its top lines,
per attack kind how the server answered, and how long held sockets were kept.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from devicekit.loopback import ServerProcess, free_port, write_broker_yaml

pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
HONEST_PER_PRODUCT = 150  # x2 products: 300 honest devices
HOSTILE_PER_PRODUCT = 25  # x2 processes: 50 hostile clients
ANONYMOUS_PER_PRODUCT = 12  # of those, holding no credentials
EVIL_DEVICES = 4  # per product: the credentials the other hostile clients hold
CLONES = 1000  # connections sharing one device's secret, in the first hostile process
LISTENER_MAX_CONNECTIONS = 1000  # the MQTT listener's max_connections
PRODUCTS = {  # product key: (product secret, batch, protocol, honest name prefix)
    "a1SiegeH": ("siege-h-secret", "siege-http", "http", "h-"),
    "a1SiegeM": ("siege-m-secret", "siege-mqtt", "mqtt", "m-"),
}
PACKAGE_SIZE = 256 * 1024
# Bounds, measured first (11 runs on 2 cores; the test prints each run's numbers). Idle, the
# server holds 46 MiB; under this siege its VmHWM peaked at 91-145 MiB: amqtt reads each
# PUBLISH whole before the OTA plugin refuses it, and the floods send payloads of up to 4 MB
# on up to 26 connections at once. 145 MiB + ~50% headroom:
MAX_PEAK_RSS_MIB = 220
# The log grew to 1.5-3.3 MB (11 runs; ~80% of it one INFO line per SUBSCRIBE filter refused
# over limits.max_subscriptions, a tenth aiohttp's ERROR tracebacks for malformed requests).
# 3.3 MB + ~50%: what a ~45 s siege may write, so a flood of refusals cannot fill a disk.
MAX_LOG_BYTES = 5 * 1024 * 1024
# Wall-clock limits, each a deadline polled against, never a sleep that synchronises:
WARM_UP_S = 30  # until both hostile processes have each done some attacks
# The honest devices come in waves, so that they meet every attack: held sockets take 10-20 s
# to end, and the whole fleet at once is done in seconds. A wave is one device_sim process
# per product, started on a schedule (pacing, not synchronisation).
WAVES, WAVE_EVERY_S = 6, 8.0
DEVICE_TIMEOUT_S = 90  # device_sim --timeout: one device's whole upgrade
FLEET_S = WAVES * WAVE_EVERY_S + DEVICE_TIMEOUT_S + 10  # the last wave ends by then
SETTLE_S = 20  # after the fleet: the database has every honest job final


def write_catalog(root: Path) -> None:
    packages = root / "packages"
    packages.mkdir()
    (packages / "fw-1.0.0.bin").write_bytes(os.urandom(PACKAGE_SIZE // 2))
    (packages / "fw-1.1.0.bin").write_bytes(os.urandom(PACKAGE_SIZE))
    products, packs, batches = [], [], []
    for pk, (secret, batch, protocol, _) in PRODUCTS.items():
        products.append(f"  - {{key: {pk}, name: Siege {protocol}, secret: {secret}}}")
        packs.append(f"  - {{id: {pk}-1.0.0, product: {pk}, version: 1.0.0, file: fw-1.0.0.bin, sign_method: MD5}}")
        packs.append(f"  - {{id: {pk}-1.1.0, product: {pk}, version: 1.1.0, file: fw-1.1.0.bin, sign_method: SHA256}}")
        batches.append(f"  - {{name: {batch}, package: {pk}-1.1.0, type: upgrade, protocol: {protocol}, "
                       "mode: dynamic, push: true}")
    (root / "ota.yaml").write_text("packages_dir: packages\nproducts:\n" + "\n".join(products)
                                   + "\npackages:\n" + "\n".join(packs) + "\nbatches:\n" + "\n".join(batches) + "\n",
                                   encoding="utf-8")


def honest_names(pk: str) -> list[str]:
    prefix = PRODUCTS[pk][3]
    return [f"{prefix}{i:04d}" for i in range(1, HONEST_PER_PRODUCT + 1)]


def proc_status(pid: int, key: str) -> int:
    """A /proc/PID/status value in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class Hostile:
    """One scripts/hostile_clients.py process; its stderr status lines are followed."""

    def __init__(self, pk: str, mqtt_port: int, http_port: int, log_dir: Path, clones: int = 0) -> None:
        secret, _, _, prefix = PRODUCTS[pk]
        evil = [f"evil-{prefix}{i}" for i in range(1, EVIL_DEVICES + 1)]
        victims = honest_names(pk)[::10]
        command = [sys.executable, str(SCRIPTS / "hostile_clients.py"), "--json", "--status-every", "1",
                   "--mqtt-port", str(mqtt_port), "--http-port", str(http_port),
                   "--clients", str(HOSTILE_PER_PRODUCT), "--anonymous", str(ANONYMOUS_PER_PRODUCT),
                   "--duration", str(WARM_UP_S + FLEET_S + 30), "--product", pk, "--product-secret", secret,
                   "--impersonate", ",".join(victims),
                   # Client ids no honest device uses. A device whose client id is its own
                   # name (the m- devices here) is refused (CONNACK 2) for as long as another
                   # device holds a session on that id, clean_session=0 ones included: the
                   # squat is a known hole this test does not aim at the honest fleet.
                   "--squat", ",".join(f"ghost-{prefix}{i}" for i in range(3)) + f",{evil[-1]}"]
        for name in evil:
            command += ["--device", name]
        if clones:
            command += ["--clones", str(clones), "--clone", f"clone-{prefix}1"]
        self.stderr_path = log_dir / f"hostile-{pk}.err"
        self.stderr = self.stderr_path.open("w", encoding="utf-8")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.stderr, text=True)

    def done(self) -> int:
        """Attacks done so far, from the last status line."""
        for line in reversed(self.stderr_path.read_text(encoding="utf-8").splitlines()):
            try:
                return int(json.loads(line)["status"].get("done", 0))
            except (ValueError, KeyError, TypeError):
                continue
        return 0

    def stop(self) -> dict[str, Any]:
        """SIGTERM (the tool ends its attacks, checks the server still answers, prints JSON)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        output, _ = self.process.communicate(timeout=60)
        assert self.process.returncode in (0, 2), (self.process.returncode, self.stderr_path.read_text()[-2000:])
        self.stderr_path.with_suffix(".json").write_text(output, encoding="utf-8")  # kept for a look after a failure
        return json.loads(output)


def start_wave(pk: str, wave: int, mqtt_port: int, output: Path) -> subprocess.Popen[bytes]:
    """device_sim.py for this wave's share of the product's honest devices; prints to `output`."""
    secret, _, protocol, prefix = PRODUCTS[pk]
    per_wave = HONEST_PER_PRODUCT // WAVES
    command = [sys.executable, str(SCRIPTS / "device_sim.py"), "--mqtt", f"127.0.0.1:{mqtt_port}",
               "--product", pk, "--product-secret", secret, "--count", str(per_wave),
               "--first", str(1 + wave * per_wave), "--prefix", prefix, "--timeout", str(DEVICE_TIMEOUT_S)]
    if protocol == "mqtt":
        command.append("--plain-password")  # client id = device name: the wrong-password CONNECTs hit it
    with output.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def wait_until(check, seconds: float, interval: float = 0.2) -> bool:  # type: ignore[no-untyped-def]
    """Poll `check` until it holds (True) or `seconds` have passed (False)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def db_rows(root: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{root / 'var' / 'ota.sqlite3'}?mode=ro", uri=True, timeout=10) as db:
        return db.execute(sql).fetchall()


def honest_jobs(root: Path) -> dict[tuple[str, str], list[tuple[Any, ...]]]:
    jobs: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
    for row in db_rows(root, "SELECT product_key, device_name, batch, state, target_version, id FROM jobs ORDER BY id"):
        if row[1] in set(honest_names(row[0])):
            jobs.setdefault((row[0], row[1]), []).append(row)
    return jobs


def test_honest_fleet_upgrades_under_siege(tmp_path: Path) -> None:
    mqtt_port, http_port = free_port(), free_port()
    write_catalog(tmp_path)
    config = write_broker_yaml(tmp_path, mqtt_port, http_port, max_connections=LISTENER_MAX_CONNECTIONS)
    log = tmp_path / "server.log"
    server = ServerProcess(config, mqtt_port, log=log)
    server.start()
    idle_rss = proc_status(server.pid, "VmRSS")
    rss_samples: list[int] = []
    sampling = threading.Event()

    def sample() -> None:  # VmHWM has the peak; the samples show the shape
        while not sampling.wait(0.5):
            try:
                rss_samples.append(proc_status(server.pid, "VmRSS"))
            except (OSError, KeyError):
                return

    threading.Thread(target=sample, daemon=True).start()
    hostile: list[Hostile] = []
    fleets: dict[tuple[str, int], subprocess.Popen[bytes]] = {}
    started = time.monotonic()
    try:
        hostile = [Hostile(pk, mqtt_port, http_port, tmp_path, clones=CLONES if index == 0 else 0)
                   for index, pk in enumerate(PRODUCTS)]
        # The siege is on before the first honest device connects.
        assert wait_until(lambda: all(h.done() >= 100 for h in hostile), WARM_UP_S), \
            [h.stderr_path.read_text()[-500:] for h in hostile]
        warm = time.monotonic()
        waves = [(warm + wave * WAVE_EVERY_S, wave) for wave in range(WAVES)]
        while waves or any(fleet.poll() is None for fleet in fleets.values()):
            assert time.monotonic() < warm + FLEET_S, "the honest fleet did not end in time"
            while waves and waves[0][0] <= time.monotonic():
                wave = waves.pop(0)[1]
                for pk in PRODUCTS:
                    fleets[(pk, wave)] = start_wave(pk, wave, mqtt_port, tmp_path / f"fleet-{pk}-{wave}.out")
            time.sleep(0.1)
        fleet_seconds = time.monotonic() - warm
        assert all(h.process.poll() is None for h in hostile), "the siege ended before the fleet"
        reports = [h.stop() for h in hostile]
        peak_rss = proc_status(server.pid, "VmHWM")
        # A device is done when its last report is acknowledged; the journal follows within a tick.
        settled = wait_until(lambda: len(jobs := honest_jobs(tmp_path)) == 2 * HONEST_PER_PRODUCT
                             and all(rows[-1][3] == "succeeded" for rows in jobs.values()), SETTLE_S)
    finally:
        sampling.set()
        for process in [h.process for h in hostile] + list(fleets.values()):
            if process.poll() is None:
                process.kill()
                process.wait(10)
        for h in hostile:
            h.stderr.close()
        server.stop()
    log_bytes = log.stat().st_size
    log_lines = log.read_text(encoding="utf-8", errors="replace").splitlines()

    # What the siege did and what it cost the server, printed first (pytest -s shows it).
    attacks: dict[str, Counter[str]] = {}
    notes: Counter[str] = Counter()
    closed_after: dict[str, float] = {}  # held sockets: the longest the server let one stay
    for report in reports:
        for kind, stats in report["attacks"].items():
            attacks.setdefault(kind, Counter()).update({k: v for k, v in stats.items() if isinstance(v, int)})
            notes.update({f"{kind}: {n}": c for n, c in stats.get("notes", {}).items()})
            if "closed_after_s" in stats:
                closed_after[kind] = max(closed_after.get(kind, 0.0), stats["closed_after_s"]["max"])
    summary = {
        "fleet_s": round(fleet_seconds, 1), "total_s": round(time.monotonic() - started, 1),
        "rss_idle_mib": round(idle_rss / 1024), "rss_peak_mib": round(peak_rss / 1024),
        "rss_max_sampled_mib": round(max(rss_samples, default=0) / 1024),
        "log_bytes": log_bytes, "log_lines": len(log_lines),
        "log_top": dict(Counter(re.sub(r"\d+", "N", line[24:])[:100] for line in log_lines
                                if re.match(r"\d{4}-\d\d-\d\d ", line)).most_common(8)),
        "attacks": {kind: " ".join(f"{k}={v}" for k, v in c.items() if v) for kind, c in sorted(attacks.items())},
        "held_sockets_closed_after_s": closed_after,
        "clones_held_at_most": max(report.get("clones_held_at_most", 0) for report in reports),
        "notes": dict(notes.most_common(30)),
    }
    print("\nsiege:", json.dumps(summary, indent=1))

    # What each honest device saw: upgraded 1.0.0 -> 1.1.0 over its product's protocol.
    line = re.compile(r"^(\S+) 1\.0\.0 -> (\S+) ok (\w+) (\d+) B ")
    seen: dict[tuple[str, str], tuple[str, str]] = {}
    for (pk, wave), fleet in fleets.items():
        output = (tmp_path / f"fleet-{pk}-{wave}.out").read_text(encoding="utf-8", errors="replace")
        for text in output.splitlines():
            if match := line.match(text):
                seen[(pk, match[1])] = (match[2], match[3])
        not_ok = [t for t in output.splitlines() if not line.match(t) and " devices: " not in t]
        assert not not_ok, f"{pk}: {len(not_ok)} honest devices did not upgrade, e.g. {not_ok[:5]}"
        assert fleet.returncode == 0, output[-2000:]
    expected = {(pk, name): ("1.1.0", PRODUCTS[pk][2]) for pk in PRODUCTS for name in honest_names(pk)}
    assert seen == expected

    # The database agrees: one job per honest device, in its product's batch, succeeded, for
    # 1.1.0; and the version it reported last is 1.1.0.
    jobs = honest_jobs(tmp_path)
    wrong = {device: rows for device, rows in jobs.items()
             if [(r[2], r[3], r[4]) for r in rows] != [(PRODUCTS[device[0]][1], "succeeded", "1.1.0")]}
    assert set(jobs) == set(expected) and not wrong, list(wrong.items())[:5]
    assert settled  # (and it was so within SETTLE_S of the last device's end, while the server ran)
    versions = {(pk, dn): v for pk, dn, v in db_rows(tmp_path, "SELECT product_key, device_name, version "
                                                               "FROM device_versions WHERE module = 'default'")}
    assert all(versions.get(device) == "1.1.0" for device in expected), \
        [(d, versions.get(d)) for d in expected if versions.get(d) != "1.1.0"][:5]

    # The siege: every kind of attack was made; the server never went away, never answered
    # with an error (HTTP 5xx, bytes that are no answer), and stayed within its bounds.
    assert all(report["server_alive"] == {"mqtt": True, "http": True} for report in reports), reports
    assert len(attacks) == 19, sorted(attacks)
    # The cloned credential connected over and over, and never held more than the cap
    # (4 by default) for long: a held clone's count is its own, so allow the ones whose
    # close is still on its way.
    assert attacks["cloned_credential"]["accepted"] > CLONES, attacks["cloned_credential"]
    assert summary["clones_held_at_most"] < CLONES / 2, summary["clones_held_at_most"]
    assert sum(c["unreachable"] for c in attacks.values()) == 0, "an attacker could not connect at all"
    assert sum(c["error"] for c in attacks.values()) == 0, {k: n for k, n in notes.items()}
    assert peak_rss < MAX_PEAK_RSS_MIB * 1024, f"server peak RSS {peak_rss / 1024:.0f} MiB"
    assert log_bytes < MAX_LOG_BYTES, f"server log {log_bytes} bytes"
