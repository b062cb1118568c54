"""Crash test: `ota-server` is killed with SIGKILL at random moments while a fleet upgrades,
and restarted on the same data_dir and ports; the database must keep every promise.

The devices are a compact raw MQTT 3.1.1 client (support/link.py), so the test knows exactly
which PUBLISH got its PUBACK. Like firmware, a device reports its version on every connect, takes
the push, downloads over HTTP, checks the MD5, reports progress, "flashes", reports 100,
reboots and reports the new version; one in eight first reports a failure (-2) and has an
operator retry it over the admin API. What each device received and caused is recorded and
checked against `data_dir/ota.sqlite3` after every kill (server dead) and at the end. Each
kill comes 0.2-2 s after the restart before, at that moment, or at the next push a device
receives, or at the next PUBACK (so a push sent before its job was committed is caught):

- every job id a device got in a push is in `jobs`, for that device, and no longer `queued`;
- no job id was pushed to two devices (ids are never reused across restarts);
- no device ever has two open jobs for the module; job histories are unbroken chains;
- a negative step that was acknowledged (PUBACK) is a failed job, unless the kill came right
  after that PUBACK: then the job is still open and the device is pushed it again (see
  `test_an_acknowledged_failure_survives_kill_9`, an expected failure);
- every device upgrades; the job that succeeded is the one whose file it installed, and
  every acknowledged report of the target version is a succeeded job once settled.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devicekit.loopback import ServerProcess, free_port, write_broker_yaml
from support.harness import PK, job_of, write_catalog
from support.link import Link, Lost

BATCH = "up-crash"
SOURCE, TARGET = "1.0.0", "1.1.0"
MODULE = "default"
OPEN_STATES = ("queued", "notified", "in_progress", "installed")
CATALOG_BATCH = f"- {{name: {BATCH}, package: fw-1.1.0, type: upgrade, protocol: http, mode: dynamic, push: true}}\n"


# ------------------------------------------------------------------------ the fleet


@dataclass
class Record:
    """What one device saw and caused, as the device knows it."""

    name: str
    fail_first: bool  # its first push ends in step -2 (until that is acknowledged); an operator retries it
    rng: random.Random
    version: str = SOURCE
    connections: int = 0
    pushes: list[tuple[int, int, int]] = field(default_factory=list)  # (job id, server run, connection no.)
    failures: list[tuple[int, int, int]] = field(default_factory=list)  # acked -2: (job id, run, connection no.)
    failure_sent: bool = False
    installed_job: int | None = None  # the job whose image it flashed
    target_acks: list[int] = field(default_factory=list)  # server runs that acknowledged a report of TARGET
    repushed_failed: list[int] = field(default_factory=list)  # jobs it had failed, pushed on a later connection
    bad_images: list[str] = field(default_factory=list)
    retries: list[Any] = field(default_factory=list)  # what the admin retry answered
    done: bool = False
    stage: str = "starting"


class Fleet:
    """The devices, and the kill switch they pull when the test arms it for an event of theirs."""

    def __init__(self, root: Path, mqtt_port: int, http_port: int, count: int, seed: int,
                 start_spread: float, step_pause: float) -> None:
        self.root, self.mqtt_port, self.http_port = root, mqtt_port, http_port
        rng = random.Random(seed)
        self.records = [Record(f"crash-{i:04d}", i % 8 == 3, random.Random(rng.random())) for i in range(count)]
        self.start_spread, self.step_pause = start_spread, step_pause
        self.generation = 0  # the server run; bumped by the test at each kill
        self.final = asyncio.Event()  # set after the last restart: devices end once they are counted
        self.http: aiohttp.ClientSession | None = None
        self.server_pid = 0
        self.armed: tuple[str, asyncio.Future[str]] | None = None
        self.lost_failures: set[int] = set()  # acked -2 the crash took (PUBACK precedes the commit)

    def arm(self, event: str) -> asyncio.Future[str]:
        """SIGKILL the server the moment a device sees `event` ("push" or "ack")."""
        fired: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.armed = (event, fired)
        return fired

    def _saw(self, event: str, what: str) -> None:
        if self.armed is not None and self.armed[0] == event:
            os.kill(self.server_pid, signal.SIGKILL)  # now, from the device's own code path
            fired = self.armed[1]
            self.armed = None
            if not fired.done():
                fired.set_result(what)

    # -- one device ------------------------------------------------------------------
    async def run(self, rec: Record) -> None:
        await asyncio.sleep(rec.rng.uniform(0, self.start_spread))
        while True:
            rec.stage = "connecting"
            link = await self._connect(rec)
            try:
                if await self._session(rec, link):
                    await link.close()
                    rec.done, rec.stage = True, "done"
                    return
            except Lost:
                pass
            link.abort()
            await asyncio.sleep(rec.rng.uniform(0.02, 0.2))

    async def _connect(self, rec: Record) -> Link:
        while True:
            try:
                connection = rec.connections + 1

                def received(link: Link, topic: str, payload: bytes) -> None:
                    job = job_of(json.loads(payload))  # the device subscribes to its upgrade topic only
                    rec.pushes.append((job, link.generation, connection))
                    self._saw("push", f"{rec.name} job {job}")

                link = await Link.open(self.mqtt_port, rec.name, lambda: self.generation, received)
                rec.connections = connection
                return link
            except (OSError, Lost, TimeoutError, asyncio.IncompleteReadError):
                await asyncio.sleep(rec.rng.uniform(0.05, 0.25))

    async def _pause(self, rec: Record) -> None:
        await asyncio.sleep(rec.rng.uniform(0, self.step_pause))

    async def _report(self, rec: Record, link: Link, kind: str, params: dict[str, str]) -> None:
        await link.publish(f"/ota/device/{kind}/{PK}/{rec.name}", {"id": str(rec.connections), "params": params})
        self._saw("ack", f"{rec.name} {kind} {params}")

    async def _session(self, rec: Record, link: Link) -> bool:
        """One connection's life; True when the device is finished, Lost when the link is."""
        rec.stage = "reporting"
        await self._report(rec, link, "inform", {"version": rec.version})  # as after every boot
        if rec.version == TARGET:
            rec.target_acks.append(link.generation)
        while True:
            if rec.version == TARGET:
                rec.stage = "upgraded, idle"
                if self.final.is_set() and rec.target_acks[-1] == self.generation == link.generation:
                    return True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(link.closed.wait(), 0.2)
                if link.closed.is_set():
                    raise Lost("connection closed")
                continue
            rec.stage = "waiting for push"
            message = await link.next_message(1.0)
            if message is None:  # nothing due: a failed device needs its operator's retry
                if rec.failure_sent:
                    await self._retry(rec)
                await self._report(rec, link, "inform", {"version": rec.version})
                continue
            push = json.loads(message[1])
            url, job = push["data"]["url"], job_of(push)
            failed_on = {failed: connection for failed, _, connection in rec.failures}
            if job in failed_on:
                if failed_on[job] == rec.connections:
                    continue  # a second push the server decided before it took our failure
                rec.repushed_failed.append(job)  # the server lost the failure: try again, as firmware would
            if rec.fail_first:
                rec.stage = "failing"
                await self._pause(rec)
                rec.failure_sent = True
                await self._report(rec, link, "progress", {"step": "-2", "desc": "download failed (simulated)"})
                rec.fail_first = False
                rec.failures.append((job, link.generation, rec.connections))
                await self._retry(rec)
                continue
            rec.stage = "downloading"
            await self._pause(rec)
            image = await self._download(url)
            if hashlib.md5(image).hexdigest() != push["data"]["sign"]:
                rec.bad_images.append(f"job {job}: md5 {hashlib.md5(image).hexdigest()} != {push['data']['sign']}")
                raise Lost("bad image")
            rec.stage = "reporting progress"
            await self._report(rec, link, "progress", {"step": "50", "desc": "downloaded"})
            await self._pause(rec)
            rec.version, rec.installed_job = TARGET, job  # flashed: it boots the new image from now on
            await self._report(rec, link, "progress", {"step": "100", "desc": "installed, rebooting"})
            await self._pause(rec)
            raise Lost("reboot")

    async def _download(self, url: str) -> bytes:
        assert self.http is not None
        try:
            async with self.http.get(url) as response:
                if response.status != 200:
                    raise Lost(f"download answered {response.status}")
                return await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise Lost(f"download: {exc!r}") from None

    async def _retry(self, rec: Record) -> None:
        """The operator's `otactl retry`, over the admin API; a crash may swallow it."""
        assert self.http is not None
        token = (self.root / "var" / "admin-token").read_text().strip()
        try:
            async with self.http.post(f"http://127.0.0.1:{self.http_port}/admin/api/batches/{BATCH}/retry",
                                      json={"devices": [rec.name]},
                                      headers={"Authorization": f"Bearer {token}"}) as response:
                rec.retries.append((response.status, (await response.json()).get("retried")))
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            rec.retries.append(repr(exc))


# ------------------------------------------------------------------------ the checks

Jobs = dict[int, tuple[str, str, int, str]]  # id -> (device, state, superseded, batch)
Events = dict[int, list[tuple[str | None, str]]]  # id -> [(from state, to state)] in order


def read_db(root: Path) -> tuple[Jobs, Events]:
    database = root / "var" / "ota.sqlite3"
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)) as db:
        jobs = {row[0]: tuple(row[1:]) for row in db.execute(
            "SELECT id, device_name, state, superseded, batch FROM jobs WHERE module = ?", (MODULE,))}
        events: Events = {}
        for job_id, from_state, to_state in db.execute(
                "SELECT job_id, from_state, to_state FROM job_events ORDER BY id"):
            events.setdefault(job_id, []).append((from_state, to_state))
    return jobs, events  # type: ignore[return-value]


def check_promises(fleet: Fleet, jobs: Jobs, events: Events, killed: int | None = None) -> list[str]:
    """What the database breaks of what the devices were told or had acknowledged. `killed`:
    the server run that was just killed, whose last acknowledged reports may be lost."""
    problems: list[str] = []
    owner: dict[int, str] = {}
    for rec in fleet.records:
        for job, run, _ in rec.pushes:
            row = jobs.get(job)
            if owner.setdefault(job, rec.name) != rec.name:
                problems.append(f"job {job} pushed to {owner[job]} and to {rec.name} (run {run}): id reused")
            elif row is None:
                problems.append(f"{rec.name}: job {job} pushed in run {run} is not in the database")
            elif row[0] != rec.name:
                problems.append(f"{rec.name}: job {job} pushed in run {run} is {row[0]}'s in the database")
            elif row[1] == "queued":
                problems.append(f"{rec.name}: job {job} pushed in run {run} is still queued in the database")
        for job, run, _ in rec.failures:
            state = jobs[job][1] if job in jobs else "missing"
            if state == "failed" or job in fleet.lost_failures:
                continue
            if run == killed and state in OPEN_STATES:
                fleet.lost_failures.add(job)  # acknowledged before it was committed: the crash took it
            else:
                problems.append(f"{rec.name}: step -2 for job {job}, acknowledged in run {run}, but the job is "
                                f"{state}")
    open_jobs = Counter(row[0] for row in jobs.values() if row[1] in OPEN_STATES)
    problems += [f"{name}: {count} open jobs" for name, count in open_jobs.items() if count > 1]
    for job, chain in events.items():
        if job not in jobs:
            problems.append(f"history of job {job}, which is not in jobs")
            continue
        states = [to for _, to in chain]
        if [None, *states[:-1]] != [from_state for from_state, _ in chain] or states[-1] != jobs[job][1]:
            problems.append(f"job {job}: state {jobs[job][1]}, history {chain}")
    return problems


def check_final(fleet: Fleet, jobs: Jobs) -> list[str]:
    """Every device upgraded, with the very job whose file it installed."""
    succeeded: dict[str, list[int]] = {}
    for job, (name, state, _, batch) in jobs.items():
        if state == "succeeded" and batch == BATCH:
            succeeded.setdefault(name, []).append(job)
    problems = []
    for rec in fleet.records:
        done = succeeded.get(rec.name, [])
        if rec.target_acks and not done:
            problems.append(f"{rec.name}: reported {TARGET}, acknowledged in runs {rec.target_acks}, but has "
                            "no succeeded job")
        elif done != [rec.installed_job]:
            problems.append(f"{rec.name}: succeeded jobs {done}, but it installed the file of job {rec.installed_job}")
        problems += [f"{rec.name}: {bad}" for bad in rec.bad_images]
    return problems


def stuck(fleet: Fleet) -> list[str]:
    return [f"{rec.name} ({rec.stage}; version {rec.version}; pushes {rec.pushes}; failures {rec.failures}; "
            f"retries {rec.retries})" for rec in fleet.records if not rec.done]


# -------------------------------------------------------------------------- the runs

# Each kill waits 0.2-2 s, then: at that moment, or at the next push a device receives (a
# push that left before its job was committed is then caught), or at the next PUBACK one gets.
TRIGGERS = ("time", "push", "ack")


async def crash_run(root: Path, *, devices: int, kills: int, start_spread: float, step_pause: float,
                    finish_timeout: float) -> None:
    seed = int(os.environ.get("CRASH_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    write_catalog(root, CATALOG_BATCH)
    mqtt_port, http_port = free_port(), free_port()
    server = ServerProcess(write_broker_yaml(root, mqtt_port, http_port), mqtt_port, capture=False,
                           extra_args=("--log-level", "WARNING"))
    fleet = Fleet(root, mqtt_port, http_port, devices, seed, start_spread, step_pause)
    kill_log: list[str] = []
    started = time.monotonic()

    def context() -> str:
        return f"CRASH_SEED={seed}, kills: {'; '.join(kill_log)}"

    tasks: list[asyncio.Task[None]] = []
    await asyncio.to_thread(server.start)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15),
                                         connector=aiohttp.TCPConnector(limit=100)) as http:
            fleet.http, fleet.server_pid = http, server.pid
            tasks = [asyncio.create_task(fleet.run(rec)) for rec in fleet.records]
            for number in range(kills):
                await asyncio.sleep(rng.uniform(0.2, 2.0))
                trigger = TRIGGERS[number % len(TRIGGERS)]
                if trigger != "time":
                    with contextlib.suppress(TimeoutError):
                        trigger += ": " + await asyncio.wait_for(fleet.arm(trigger), 0.5)
                    fleet.armed = None
                await asyncio.to_thread(server.kill)
                upgraded = sum(rec.version == TARGET for rec in fleet.records)
                kill_log.append(f"{time.monotonic() - started:.1f}s {trigger} ({upgraded}/{devices} upgraded)")
                jobs, events = read_db(root)  # the server is dead: what it committed, nothing more
                problems = check_promises(fleet, jobs, events, killed=fleet.generation)
                assert not problems, f"after kill {number + 1} ({context()}): {problems[:10]}"
                fleet.generation += 1
                await asyncio.to_thread(server.start)
                fleet.server_pid = server.pid
            fleet.final.set()
            _, pending = await asyncio.wait(tasks, timeout=finish_timeout)
            assert not pending, f"{len(pending)} devices did not finish ({context()}): {stuck(fleet)[:5]}"
            # Each device's last report was acknowledged by this run: poll until it is written down.
            deadline = time.monotonic() + 10
            while True:
                jobs, events = read_db(root)
                problems = check_promises(fleet, jobs, events) + check_final(fleet, jobs)
                if not problems or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert not problems, f"{context()}: {problems[:10]}"
        await asyncio.to_thread(server.stop)
        jobs, events = read_db(root)
        problems = check_promises(fleet, jobs, events) + check_final(fleet, jobs)
        assert not problems, f"after a clean stop ({context()}): {problems[:10]}"
        states = Counter(state for _, state, _, batch in jobs.values() if batch == BATCH)
        assert states["succeeded"] == devices and not any(states[s] for s in OPEN_STATES), states
        connections = sum(rec.connections for rec in fleet.records)
        print(f"{devices} devices in {time.monotonic() - started:.1f}s, {context()}; jobs {dict(states)}; "
              f"{connections} connections; acknowledged -2 lost in a crash: {sorted(fleet.lost_failures)}, "
              f"pushed again to {[(r.name, r.repushed_failed) for r in fleet.records if r.repushed_failed]}")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server.process is not None and server.process.poll() is None:
            await asyncio.to_thread(server.kill)


async def test_kill_9_during_a_small_fleet_upgrade_keeps_every_promise(tmp_path: Path) -> None:
    await crash_run(tmp_path, devices=40, kills=3, start_spread=4.0, step_pause=0.4, finish_timeout=20)


@pytest.mark.slow
async def test_kill_9_ten_times_during_a_fleet_upgrade_keeps_every_promise(tmp_path: Path) -> None:
    await crash_run(tmp_path, devices=300, kills=10, start_spread=14.0, step_pause=0.5, finish_timeout=90)


async def test_an_acknowledged_failure_survives_kill_9(tmp_path: Path) -> None:
    write_catalog(tmp_path, CATALOG_BATCH)
    mqtt_port, http_port = free_port(), free_port()
    server = ServerProcess(write_broker_yaml(tmp_path, mqtt_port, http_port), mqtt_port, capture=False,
                           extra_args=("--log-level", "WARNING"))
    await asyncio.to_thread(server.start)
    try:
        link = await Link.open(mqtt_port, "ack-1")
        await link.publish(f"/ota/device/inform/{PK}/ack-1", {"id": "1", "params": {"version": SOURCE}})
        message = await link.next_message(5)
        assert message is not None
        job = job_of(json.loads(message[1]))
        await link.publish(f"/ota/device/progress/{PK}/ack-1", {"id": "2", "params": {"step": "-2", "desc": "x"}})
        os.kill(server.pid, signal.SIGKILL)  # the moment the PUBACK is in
        link.abort()
        await asyncio.to_thread(server.kill)
        state = read_db(tmp_path)[0][job][1]
        if state != "failed":  # lost: then the device must be told the same job again
            assert state in OPEN_STATES
            await asyncio.to_thread(server.start)
            link = await Link.open(mqtt_port, "ack-1")
            await link.publish(f"/ota/device/inform/{PK}/ack-1", {"id": "3", "params": {"version": SOURCE}})
            message = await link.next_message(5)
            assert message is not None and f"job={job}&" in json.loads(message[1])["data"]["url"]
            await link.close()
        assert state == "failed", f"job {job} is {state} after its acknowledged step -2 and a kill -9"
    finally:
        if server.process is not None and server.process.poll() is None:
            await asyncio.to_thread(server.stop)
