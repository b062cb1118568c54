"""A careless admin and the data_dir: deleted or replaced while the server runs, a second
server on it, a damaged database, writes the disk refuses, a deleted admin token. Real
server processes or the in-process harness, real SQLite files, loopback only."""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import random
import shutil
import sqlite3
import stat
import time
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest

import otacore.storage.journal as journal_module
from otacore.protocol.credentials import DeviceId
from otacore.storage.data_dir import DataDirInUse, DataDirLock, write_server_info
from support.faults import idle, refuse_writes
from support.harness import PK, UPGRADE_BATCH, Device, OtaServer, free_port, write_catalog
from support.processes import LiveServer, ota_server_exit, otactl, write_broker_yaml

BATCH = "up-1.1.0"


def read(db: Path, sql: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute(sql).fetchall()


async def wait_until(check, timeout: float = 5.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (result := await check()):
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        await asyncio.sleep(0.05)
    return result


async def job_state(db: Path, device: str) -> str | None:
    rows = await asyncio.to_thread(read, db, f"SELECT state FROM jobs WHERE device_name = '{device}' ORDER BY id")
    return rows[-1][0] if rows else None


async def healthz(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/healthz") as response:
        return response.status, json.loads(await response.text())


# -- data_dir or database deleted or replaced under a running ota-server ---------------------

class Running(LiveServer):
    """A real `ota-server` on free ports with a device that has an in_progress job."""

    def __init__(self, root: Path) -> None:
        write_catalog(root, UPGRADE_BATCH)
        super().__init__(root)

    async def start_with_a_job(self, device: Device) -> None:
        await self.start()
        await device.__aenter__()
        await device.inform("1.0.0")
        await device.next_push()
        await device.progress(50, "downloading")
        await wait_until(lambda: self._state_is("d1", "in_progress"), what="in_progress")
        await asyncio.sleep(0.2)  # the journal's telemetry tick has passed: nothing is pending

    async def _state_is(self, device: str, state: str) -> bool:
        return await job_state(self.db, device) == state

    async def exit_status(self, timeout: float = 5.0) -> tuple[int, str]:
        assert self.process.process is not None
        code = await asyncio.to_thread(self.process.process.wait, timeout)
        return code, self.process.stop()


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if " ERROR " in line]


async def test_data_dir_deleted_stops_the_server_and_nothing_more_is_written(tmp_path: Path) -> None:
    server = Running(tmp_path)
    device = Device(SimpleNamespace(mqtt_port=server.mqtt_port), "d1")  # type: ignore[arg-type]
    try:
        await server.start_with_a_job(device)
        # Read-only handles that still reach the files once they are deleted.
        files = [os.open(server.var / name, os.O_RDONLY) for name in ("ota.sqlite3", "ota.sqlite3-wal")]
        try:
            shutil.rmtree(server.var)  # `rm -rf var/` while it runs
            before = [os.pread(fd, 1 << 24, 0) for fd in files]
            # A final state: a promise, acknowledged only once on disk; the disk is gone.
            report = asyncio.ensure_future(device.progress(100, "installed"))
            code, output = await server.exit_status()
            assert code == 1, output
            assert [os.pread(fd, 1 << 24, 0) for fd in files] == before, "written into the deleted database"
        finally:
            for fd in files:
                os.close(fd)
        assert not report.done() or report.exception() is not None, "PUBACK for a report never written"
        report.cancel()
        errors = error_lines(output)
        assert len(errors) == 1 and f"data_dir {server.var} was deleted or replaced" in errors[0], output
        assert "start ota-server again" in errors[0] and "Traceback" not in output
    finally:
        with contextlib.suppress(Exception):
            await device.__aexit__(None, None, None)
        server.process.stop()


async def test_database_replaced_stops_the_server_and_the_new_file_is_untouched(tmp_path: Path) -> None:
    server = Running(tmp_path)
    device = Device(SimpleNamespace(mqtt_port=server.mqtt_port), "d1")  # type: ignore[arg-type]
    try:
        await server.start_with_a_job(device)
        backup = tmp_path / "backup.sqlite3"  # an admin restores a backup over the live file
        with contextlib.closing(sqlite3.connect(server.db)) as live, contextlib.closing(sqlite3.connect(backup)) as b:
            live.backup(b)
        with contextlib.closing(sqlite3.connect(backup)) as b:
            b.execute("UPDATE jobs SET message = 'from the backup'")
            b.commit()
        restored = backup.read_bytes()
        os.replace(backup, server.db)
        report = asyncio.ensure_future(device.progress(100, "installed"))
        code, output = await server.exit_status()
        report.cancel()
        assert code == 1, output
        errors = error_lines(output)
        assert len(errors) == 1 and f"database {server.db} was deleted or replaced" in errors[0]
        assert "Traceback" not in output
        # The restored file is as the admin put it, and the old one's -wal is set aside, not mixed in.
        assert server.db.read_bytes() == restored
        assert not (server.var / "ota.sqlite3-wal").exists()
        assert read(server.db, "SELECT state, message FROM jobs") == [("in_progress", "from the backup")]
        [aside] = server.var.glob("ota.sqlite3-wal.orphaned-*")
        assert f"moved {server.var / 'ota.sqlite3-wal'} to {aside.name}" in output
    finally:
        with contextlib.suppress(Exception):
            await device.__aexit__(None, None, None)
        server.process.stop()


# -- the lock ---------------------------------------------------------------------------------

async def test_a_second_server_is_refused_even_without_the_lock_file_or_the_data_dir(tmp_path: Path) -> None:
    write_catalog(tmp_path, UPGRADE_BATCH)
    first = await OtaServer(tmp_path).start()
    try:
        (tmp_path / "var" / "ota-server.lock").unlink()
        with pytest.raises(DataDirInUse, match=r"another ota-server \(pid"):
            await OtaServer(tmp_path).start()
        # The whole data_dir deleted: the first server writes nothing more, says why, and a
        # second one on the path made again is still refused while the first one runs.
        shutil.rmtree(tmp_path / "var")
        await wait_until(lambda: _degraded(first), what="503 from /healthz")
        status, body = await healthz(first.http_url)
        assert status == 503 and body["status"] == "degraded" and "was deleted or replaced" in body["reason"]
        assert first.plugin.runtime.fatal_error is not None
        with pytest.raises(DataDirInUse):
            await OtaServer(tmp_path).start()
    finally:
        await first.stop()
    second = await OtaServer(tmp_path).start()  # once the first one is gone
    await second.stop()


def test_the_lock_is_on_the_directory_itself(tmp_path: Path) -> None:
    """Without the path-named socket too (another OS, or a data_dir reached by a bind mount):
    a directory another process has flocked is refused, whatever files it holds."""
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    other = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DataDirInUse, match=r"another ota-server \(pid \?\) uses data_dir"):
            DataDirLock(data_dir).acquire()
        assert not (data_dir / "ota-server.lock").exists()
    finally:
        os.close(other)
    lock = DataDirLock(data_dir)
    lock.acquire()  # free again
    assert (data_dir / "ota-server.lock").read_text().strip() == str(os.getpid())
    lock.release()


async def _degraded(server: OtaServer) -> bool:
    return (await healthz(server.http_url))[0] == 503


# -- a damaged database -------------------------------------------------------------------------

def leaf_pages(db: Path, table: str) -> list[int]:
    """The leaf pages of `table`'s b-tree, in key order: from SQLite's dbstat where it is
    compiled in, else by walking the b-tree from the table's root page."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        try:
            return [page for (page,) in conn.execute(
                "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY path", (table,))]
        except sqlite3.OperationalError:  # no dbstat in this SQLite
            [(root,)] = conn.execute("SELECT rootpage FROM sqlite_master WHERE type = 'table' AND name = ?", (table,))
    data = db.read_bytes()
    page_size = int.from_bytes(data[16:18], "big") or 65536
    leaves: list[int] = []

    def walk(page: int) -> None:
        start = (page - 1) * page_size
        header = start + (100 if page == 1 else 0)
        kind = data[header]
        if kind == 0x0D:  # a table leaf
            leaves.append(page)
            return
        assert kind == 0x05, f"page {page} of {table} is of kind {kind:#x}"  # a table interior page
        cells = int.from_bytes(data[header + 3:header + 5], "big")
        for i in range(cells):
            cell = start + int.from_bytes(data[header + 12 + 2 * i:header + 14 + 2 * i], "big")
            walk(int.from_bytes(data[cell:cell + 4], "big"))
        walk(int.from_bytes(data[header + 8:header + 12], "big"))  # the right-most child

    walk(root)
    return leaves


def overwrite_a_jobs_page(db: Path) -> None:
    """Random bytes over a leaf page of `jobs` in the middle: a page `otactl status` reads
    (it counts each device's latest job), as the server's quick_check at start does."""
    data = db.read_bytes()
    page_size = int.from_bytes(data[16:18], "big")
    pages = len(data) // page_size
    assert pages >= 8, f"only {pages} pages"
    leaves = leaf_pages(db, "jobs")
    assert len(leaves) >= 3, f"only {len(leaves)} leaf pages of jobs"
    middle = leaves[len(leaves) // 2]
    with db.open("r+b") as handle:
        handle.seek((middle - 1) * page_size)  # pages are numbered from 1
        handle.write(random.Random(7).randbytes(page_size))


async def test_a_damaged_database_is_a_one_line_refusal_at_start(tmp_path: Path) -> None:
    write_catalog(tmp_path, UPGRADE_BATCH)
    server = await OtaServer(tmp_path).start()
    for i in range(1500):  # enough rows for a few dozen pages
        server.engine.decide_version(DeviceId(PK, f"device-{i:05d}"), "default", "1.0.0")
    await server.engine.settled()
    await server.stop()
    db = tmp_path / "var" / "ota.sqlite3"
    assert not db.with_name("ota.sqlite3-wal").exists()  # all in the main file
    overwrite_a_jobs_page(db)
    config = write_broker_yaml(tmp_path, free_port(), free_port())
    result = await asyncio.to_thread(ota_server_exit, config)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    # What SQLite meets first: a page quick_check reports, or one it cannot even read.
    assert len(lines) == 1 and lines[0].startswith(f"ota-server: database {db} is damaged ("), lines
    assert "quick_check: " in lines[0] or "database disk image is malformed" in lines[0]
    assert "restore it from a backup" in lines[0] and "to start with an empty database" in lines[0]
    status = await asyncio.to_thread(otactl, config, "status")
    assert status.returncode == 1 and "Traceback" not in status.stderr
    assert len(status.stderr.strip().splitlines()) == 1 and f"otactl: database {db} is damaged" in status.stderr
    # Not a database at all (the header overwritten): the same kind of line.
    db.write_bytes(b"\0" * 4096)
    result = await asyncio.to_thread(ota_server_exit, config)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert f"database {db} is damaged (file is not a database)" in result.stderr


# -- writes the disk refuses --------------------------------------------------------------------

async def test_refused_writes_are_kept_and_healthz_says_degraded_until_they_work(
        server: OtaServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(journal_module, "RETRY_SECONDS", 0.1)
    caplog.set_level(logging.INFO)
    db = server.root / "var" / "ota.sqlite3"
    assert await healthz(server.http_url) == (200, {"ok": True, "status": "ok"})
    async with Device(server, "d1") as device:
        await device.inform("1.0.0")
        await device.next_push()
        await device.progress(50, "downloading")
        await server.wait_state("d1", "in_progress")
        await server.engine.settled()
        refuse_writes(await idle(server.engine.journal), True)  # the disk is full from here

        finished = asyncio.ensure_future(device.progress(100, "installed"))
        status, body = await wait_until(lambda: _degraded_body(server), what="503")
        assert body["status"] == "degraded" and body["ok"] is False
        assert body["reason"].startswith("database writes failing since ")
        assert body["reason"].endswith(": attempt to write a readonly database")
        await asyncio.sleep(0.3)  # several attempts
        assert not finished.done(), "PUBACK for a final state that is not on disk"
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {server.admin_token}"}) as http:
            async with http.get(f"{server.http_url}/admin/api/status") as response:  # from memory: it answers
                assert response.status == 200
                [batch] = (await response.json())["batches"]
                assert batch["counts"] == {"installed": 1}
            # Reads of the database's history say why, instead of hanging.
            async with http.get(f"{server.http_url}/admin/api/status?removed=true") as response:
                assert response.status == 503
                assert "the database is behind: database writes failing since" in (await response.json())["message"]
        assert await job_state(db, "d1") == "in_progress"

        refuse_writes(await idle(server.engine.journal), False)  # room again
        await asyncio.wait_for(finished, 3)
        assert await job_state(db, "d1") == "installed"
        assert await healthz(server.http_url) == (200, {"ok": True, "status": "ok"})
        await device.inform("1.1.0")
        await wait_until(lambda: _state_is(db, "d1", "succeeded"), what="succeeded on disk")
    assert read(db, "SELECT to_state FROM job_events ORDER BY id") == \
        [("queued",), ("notified",), ("in_progress",), ("installed",), ("succeeded",)]
    assert not [r for r in caplog.records if r.exc_info], "a traceback on the report path"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "cannot write the database (attempt to write a readonly database)" in errors[0]
    assert any("database writes work again" in r.getMessage() for r in caplog.records)


async def admin_post(server: OtaServer, path: str) -> tuple[int, dict, float]:
    started = time.monotonic()
    async with aiohttp.ClientSession() as http, http.post(
            f"{server.http_url}/admin/api/{path}", headers={"Authorization": f"Bearer {server.admin_token}"}) as answer:
        return answer.status, await answer.json(), time.monotonic() - started


async def test_while_the_disk_is_full_admin_changes_are_refused_at_once_and_devices_still_connect(
        server: OtaServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_module, "RETRY_SECONDS", 0.1)
    await server.engine.settled()
    refuse_writes(await idle(server.engine.journal), True)
    async with Device(server, "d1") as device:
        # a promise that cannot land: its PUBACK waits, and the journal is in trouble from here
        promised = asyncio.ensure_future(device.inform("1.0.0"))
        await wait_until(lambda: _degraded_body(server), what="503")
        catalog_before = server.engine.catalog

        for path in ("reload", f"batches/{BATCH}/pause", f"batches/{BATCH}/retry"):
            status, body, seconds = await admin_post(server, path)
            assert status == 503 and seconds < 1.0, (path, status, seconds)
            assert body["message"].startswith("nothing changed: database writes failing since "), body
        assert server.engine.catalog is catalog_before
        assert server.engine.rollout_view(BATCH)["state"] != "paused"

        started = time.monotonic()
        async with Device(server, "d2"):  # CONNECT, CONNACK and SUBACKs come from memory
            assert time.monotonic() - started < 1.0

        refuse_writes(await idle(server.engine.journal), False)
        await wait_until(lambda: _healthy(server), what="200 from /healthz")
        await asyncio.wait_for(promised, 3)
        status, body, _ = await admin_post(server, "reload")
        assert status == 200, body


async def test_an_admin_change_made_as_the_disk_fills_is_answered_and_written_once_it_has_room(
        server: OtaServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_module, "RETRY_SECONDS", 0.1)
    db = server.root / "var" / "ota.sqlite3"
    await server.engine.settled()
    refuse_writes(await idle(server.engine.journal), True)  # not noticed yet: nothing was written since
    status, body, seconds = await admin_post(server, f"batches/{BATCH}/pause")
    assert status == 503 and seconds < 2.0, (status, body, seconds)
    assert body["message"].startswith("done in memory, not yet on disk: database writes failing since "), body
    assert server.engine.rollout_view(BATCH)["state"] == "paused"

    refuse_writes(await idle(server.engine.journal), False)
    await server.engine.settled()
    [(control,)] = await asyncio.to_thread(read, db, f"SELECT control FROM batches WHERE name = '{BATCH}'")
    assert json.loads(control)["paused"] is True


async def _healthy(server: OtaServer) -> bool:
    return (await healthz(server.http_url))[0] == 200


async def _degraded_body(server: OtaServer) -> tuple[int, dict] | None:
    status, body = await healthz(server.http_url)
    return (status, body) if status == 503 else None


async def _state_is(db: Path, device: str, state: str) -> bool:
    return await job_state(db, device) == state


# -- the admin token ----------------------------------------------------------------------------

async def test_a_deleted_admin_token_is_put_back_and_otactl_never_makes_one(server: OtaServer) -> None:
    token_file = server.root / "var" / "admin-token"
    config = write_broker_yaml(server.root, server.mqtt_port, server.http_port)
    token_file.unlink()
    await wait_until(lambda: _exists(token_file), timeout=3, what="admin-token written back")
    assert token_file.read_text().strip() == server.admin_token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    result = await asyncio.to_thread(otactl, config, "retry", BATCH)
    assert result.returncode == 0, result.stdout + result.stderr

    # otactl with no token to read says so and creates none (the server would not know it).
    other = server.root / "other"
    other.mkdir()
    write_server_info(other, {"http_url": server.http_url, "pid": os.getpid()})
    result = await asyncio.to_thread(otactl, config, "--data-dir", str(other), "retry", BATCH)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"otactl: no admin token in {other / 'admin-token'}; a running server writes "
                                     "it back within a second (try again), else start ota-server on this "
                                     "data_dir, or set admin.token in broker.yaml")
    assert not (other / "admin-token").exists()


async def _exists(path: Path) -> bool:
    return path.exists()
