"""`otactl backup` and `otactl restore` against real servers (a process, or in this test's
loop), over loopback only: a consistent copy of a live database mid-upgrade, restored into a
new data_dir that a new server then runs on; and every way a backup or restore is refused."""
from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import json
import resource
import shutil
import sqlite3
import stat
import subprocess
import tarfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any


from devicekit import simulator
from otacore.storage.store import SCHEMA_VERSION
from support.harness import PK, PRODUCT_SECRET, UPGRADE_BATCH, Device, OtaServer, free_port, write_catalog
from support.processes import BIN, LiveServer, ordinary_user, otactl, write_broker_yaml

FLEET = 300


def rows(database: Path, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        return db.execute(sql).fetchall()


def one_line_error(result: subprocess.CompletedProcess[str], text: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.startswith("otactl: ") and text in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr


def admin_get(http_port: int, token: str, path: str) -> dict[str, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}{path}",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 (loopback)
        return json.loads(response.read())


def fleet(port: int, version: str, **options: Any) -> list[simulator.DeviceConfig]:
    return [simulator.DeviceConfig(device_name=f"bk-{i:04d}", product_key=PK, product_secret=PRODUCT_SECRET,
                                   mqtt_port=port, version=version, chunk=16384, timeout=60, **options)
            for i in range(FLEET)]


async def test_backup_mid_upgrade_restores_into_a_server_the_devices_agree_with(tmp_path: Path) -> None:
    live_root, new_root = tmp_path / "live", tmp_path / "new"
    live_root.mkdir()
    new_root.mkdir()
    write_catalog(live_root, UPGRADE_BATCH)
    live = await LiveServer(live_root).start()
    live_config, mqtt_port, live_db, view = live.config, live.mqtt_port, live.db, live.view
    archive = tmp_path / "backups" / "ota.tar.gz"
    archive.parent.mkdir()
    try:
        # One device stops mid-download: its signed URL must still work on the restored server.
        async with Device(view, "held-1") as held:
            await held.inform("1.0.0")
            url = urllib.parse.urlsplit((await held.next_push())["data"]["url"])
            await held.progress(10, "downloading")
        upgrade = asyncio.create_task(simulator.run_fleet(fleet(mqtt_port, "1.0.0"), concurrency=40))
        deadline = time.monotonic() + 30
        while rows(live_db, "SELECT COUNT(*) FROM jobs WHERE state = 'succeeded'")[0][0] < 30:
            assert time.monotonic() < deadline and not upgrade.done(), "the fleet did not get going"
            await asyncio.sleep(0.05)
        backup = await asyncio.to_thread(otactl, live_config, "backup", str(archive))
        assert backup.returncode == 0, backup.stderr
        assert f"to {archive}" in backup.stdout and f"schema {SCHEMA_VERSION}" in backup.stdout
        results = await upgrade
        assert all(r.outcome == "upgraded" for r in results), [r.summary() for r in results if r.outcome != "upgraded"][:3]
        for _ in range(200):  # the last reports are acknowledged before the server is done with them
            if not rows(live_db, "SELECT COUNT(*) FROM jobs WHERE state <> 'succeeded' AND device_name <> 'held-1'")[0][0]:
                break
            await asyncio.sleep(0.05)
    finally:
        await live.stop()
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    assert [p.name for p in archive.parent.iterdir()] == ["ota.tar.gz"]  # no temporary file left

    # Restore where a new broker.yaml points (its data_dir and catalog), then check the copy.
    new = LiveServer(new_root)
    new_config, new_mqtt, new_http = new.config, new.mqtt_port, new.http_port
    restored = await asyncio.to_thread(otactl, new_config, "restore", str(archive))
    assert restored.returncode == 0, restored.stderr
    copy = new_root / "var" / "ota.sqlite3"
    assert (new_root / "ota.yaml").read_bytes() == (live_root / "ota.yaml").read_bytes()
    for name in ("fw-1.0.0.bin", "fw-1.1.0.bin"):
        assert (new_root / "packages" / name).read_bytes() == (live_root / "packages" / name).read_bytes()
    for name in ("url-signing.key", "admin-token"):
        assert (new_root / "var" / name).read_bytes() == (live_root / "var" / name).read_bytes()
        assert stat.S_IMODE((new_root / "var" / name).stat().st_mode) == 0o600

    # Consistent: every job in the copy is in a state the live server had it in, and the copy's
    # history is the live history's beginning, row for row.
    seen = set(rows(live_db, "SELECT job_id, to_state FROM job_events"))
    copied_jobs = rows(copy, "SELECT id, device_name, state FROM jobs")
    assert copied_jobs and all((job, state) in seen for job, _, state in copied_jobs)
    copied_events = rows(copy, "SELECT * FROM job_events ORDER BY id")
    assert copied_events == rows(live_db, f"SELECT * FROM job_events ORDER BY id LIMIT {len(copied_events)}")
    states = {state for _, name, state in copied_jobs if name != "held-1"}
    succeeded_then = sum(1 for _, name, state in copied_jobs if state == "succeeded")
    assert succeeded_then < FLEET, "the backup was taken after the fleet had finished"
    print(f"backup: {len(copied_jobs)} jobs, states {sorted(states)}, {succeeded_then} succeeded")

    await new.start()
    try:
        token = (new_root / "var" / "admin-token").read_text().strip()
        # The same answers for the state captured: each device's versions and latest job.
        listed = admin_get(new_http, token, "/admin/api/devices?limit=500")
        by_name = {d["device"]: d for d in listed["devices"]}
        latest = {name: (job, state) for job, name, state in
                  rows(copy, "SELECT id, device_name, state FROM jobs WHERE id IN (SELECT MAX(id) FROM jobs "
                             "GROUP BY device_name)")}
        for name, version in rows(copy, "SELECT device_name, version FROM device_versions"):
            assert by_name[name]["versions"] == {"default": version}, name
        for name, (job, state) in latest.items():
            assert (by_name[name]["job"]["id"], by_name[name]["job"]["state"]) == (job, state), name
        # A URL handed out before the backup still downloads (same signing key, job still open).
        with urllib.request.urlopen(f"http://127.0.0.1:{new_http}{url.path}?{url.query}", timeout=30) as response:
            assert response.status == 200 and len(response.read()) == 160_000

        # The devices report what they really run: none is offered 1.1.0 again.
        results = await simulator.run_fleet(fleet(new_mqtt, "1.1.0", expect="no-upgrade", push_wait=2),
                                            concurrency=100)
        assert all(r.outcome == "no_upgrade" for r in results), [r.summary() for r in results if not r.expected][:3]
        for _ in range(200):
            listed = admin_get(new_http, token, "/admin/api/devices?limit=500")
            devices = [d for d in listed["devices"] if d["device"].startswith("bk-")]
            if all(d["job"] is None or d["job"]["state"] == "succeeded" for d in devices):
                break
            await asyncio.sleep(0.05)
        assert len(devices) == FLEET
        wrong = [(d["device"], d["job"]) for d in devices if d["job"] is not None and d["job"]["state"] != "succeeded"]
        assert not wrong, wrong[:3]
        assert all(d["versions"] == {"default": "1.1.0"} for d in devices)
    finally:
        await new.stop()


async def test_backup_refuses_bad_paths_and_leaves_nothing(server: OtaServer, tmp_path: Path) -> None:
    config = write_broker_yaml(tmp_path, server.mqtt_port, server.http_port)
    target = tmp_path / "out"
    target.mkdir()

    async def refused(path: Path | str, text: str, limit_bytes: int | None = None) -> None:
        limit = None if limit_bytes is None else \
            (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes)))
        result = await asyncio.to_thread(
            subprocess.run, [str(BIN / "otactl"), "--config", str(config), "backup", str(path)],
            capture_output=True, text=True, timeout=60, preexec_fn=limit)
        one_line_error(result, text)
        assert list(target.iterdir()) == [], list(target.iterdir())

    await refused(tmp_path / "missing" / "b.tar", "folder")
    await refused(target, "is a folder")
    await refused(target / ("n" * 300 + ".tar"), "File name too long")
    # A full disk, partway through (RLIMIT_FSIZE: a real write error, EFBIG, even for root).
    await refused(target / "b.tar", "cannot write backup", limit_bytes=200_000)
    await refused(target / "b.tar", "nothing was written", limit_bytes=20_000)  # fails within the database copy
    done = await asyncio.to_thread(otactl, config, "backup", str(target / "b.tar"))
    assert done.returncode == 0, done.stderr
    with tarfile.open(target / "b.tar") as archive:  # plain tar for a name without .gz
        names = archive.getnames()
    assert names[-1] == "manifest.json" and "data/ota.sqlite3" in names and "packages/fw-1.1.0.bin" in names
    assert sorted(p.name for p in target.iterdir()) == ["b.tar"]


def test_backup_into_an_unwritable_folder_is_one_line(tmp_path: Path) -> None:
    """As an ordinary user (root writes anywhere: then otactl runs as `nobody` through setpriv,
    on a copy of the files `nobody` may read)."""
    with ordinary_user(tmp_path, "otactl-backup-") as (unprivileged, root):
        write_catalog(root, UPGRADE_BATCH)
        config = write_broker_yaml(root, free_port(), free_port())
        (root / "var").mkdir(mode=0o777)
        (root / "var").chmod(0o777)
        with contextlib.closing(sqlite3.connect(root / "var" / "ota.sqlite3")) as db:
            db.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY)")
            db.execute("PRAGMA user_version = 4")
            db.commit()
        for path in [*root.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o444)
        locked = root / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        result = otactl(config, "backup", str(locked / "b.tar.gz"), prefix=unprivileged)
        one_line_error(result, "(Permission denied)")
        assert "cannot write backup" in result.stderr and list(locked.iterdir()) == []


async def test_restore_refusals(server: OtaServer, tmp_path: Path) -> None:
    config = write_broker_yaml(tmp_path, server.mqtt_port, server.http_port)
    archive = tmp_path / "b.tar"
    done = await asyncio.to_thread(otactl, config, "backup", str(archive))
    assert done.returncode == 0, done.stderr
    fresh = tmp_path / "fresh"

    def restore(source: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "otactl"), "restore", str(source), "--data-dir", str(fresh / "var"),
                               "--catalog-dir", str(fresh), *extra], capture_output=True, text=True, timeout=60)

    # Into the running server's own data_dir: refused, with or without --force.
    for extra in ((), ("--force",)):
        result = await asyncio.to_thread(otactl, config, "restore", str(archive), *extra)
        one_line_error(result, "will not restore into a running server's data_dir")
    # Not a backup, a folder, a missing file, a truncated one.
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    one_line_error(restore(tmp_path / "junk.tar"), "is not an ota-server backup")
    one_line_error(restore(tmp_path), "is a folder")
    one_line_error(restore(tmp_path / "none.tar"), "does not exist")
    gz = tmp_path / "b.tar.gz"
    gz.write_bytes(gzip.compress(archive.read_bytes())[:-5000])
    one_line_error(restore(gz), "damaged")
    # A package's bytes changed inside the archive (its manifest unchanged).
    tampered = tmp_path / "tampered.tar"
    data = bytearray(archive.read_bytes())
    with tarfile.open(archive) as tar:
        member = tar.getmember("packages/fw-1.1.0.bin")
    data[member.offset_data + 1000] ^= 0xFF
    tampered.write_bytes(bytes(data))
    one_line_error(restore(tampered), "is damaged or was changed: packages/fw-1.1.0.bin")
    # A member the manifest does not list.
    extra_member = tmp_path / "extra.tar"
    shutil.copy(archive, extra_member)
    with tarfile.open(extra_member, "a") as tar:
        tar.add(tmp_path / "junk.tar", arcname="data/evil.key")
    one_line_error(restore(extra_member), "which its manifest does not list")

    def with_manifest(name: str, change: Any) -> Path:
        """The archive with its manifest edited (the manifest is not signed: anyone can)."""
        crafted = tmp_path / name
        with tarfile.open(archive) as source, tarfile.open(crafted, "w") as target:
            for member in source.getmembers():
                data = source.extractfile(member).read()  # type: ignore[union-attr]
                if member.name == "manifest.json":
                    manifest = json.loads(data)
                    change(manifest)
                    data = json.dumps(manifest).encode()
                    member.size = len(data)
                target.addfile(member, io.BytesIO(data))
        return crafted

    outside = tmp_path / "outside"
    for packages_dir in (str(outside), "../../outside", "../outside"):
        crafted = with_manifest("traversal.tar", lambda m: m["catalog"].update(packages_dir=packages_dir))
        one_line_error(restore(crafted), "outside the catalog's folder")
    assert not outside.exists(), "restore wrote outside the folders it was given"
    for name, change in (("no-catalog.tar", lambda m: m.pop("catalog")),
                         ("catalog-text.tar", lambda m: m.update(catalog="ota.yaml")),
                         ("schema-text.tar", lambda m: m.update(schema_version="abc")),
                         ("mode-text.tar", lambda m: m["files"][0].update(mode="zz")),
                         ("dir-number.tar", lambda m: m["catalog"].update(packages_dir=5))):
        one_line_error(restore(with_manifest(name, change)), "damaged manifest.json")
    assert not fresh.exists() or not any(fresh.rglob("*.sqlite3")), "a refused restore wrote something"

    # Restored once; a second time only with --force, and the old database is kept aside.
    first = restore(archive)
    assert first.returncode == 0, first.stderr
    assert (fresh / "var" / "ota.sqlite3").exists() and (fresh / "ota.yaml").exists()
    one_line_error(restore(archive), "already has a database")
    (fresh / "packages" / "fw-1.0.0.bin").write_bytes(b"changed")
    (fresh / "var" / "ota.sqlite3").unlink()
    one_line_error(restore(archive), "differ from the backup's")
    (fresh / "var" / "ota.sqlite3").write_bytes(b"")
    forced = restore(archive, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "kept as" in forced.stdout and list((fresh / "var").glob("ota.sqlite3.before-restore-*"))
    assert (fresh / "packages" / "fw-1.0.0.bin").read_bytes() == (tmp_path / "packages" / "fw-1.0.0.bin").read_bytes()
    assert not list(fresh.rglob("*.tmp")) and not (fresh / "var" / "ota-server.lock").exists()
