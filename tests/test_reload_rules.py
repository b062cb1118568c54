"""Reloads and restarts keep what was started: batch fingerprints, package bytes, targets."""
from __future__ import annotations

from pathlib import Path

import pytest

from support.harness import Device, OtaServer, make_firmware, write_catalog
from otacore.protocol.credentials import DeviceId
from otacore.errors import ConfigError

BASE = """
packages_dir: packages
products:
  - key: a1Test
    secret: test-product-secret
packages:
  - {id: fw-1.0.0, product: a1Test, version: 1.0.0, file: fw-1.0.0.bin}
  - {id: fw-1.1.0, product: a1Test, version: 1.1.0, file: fw-1.1.0.bin, verify: true}
"""


async def test_batch_edited_while_waiting_then_started_reloads_and_restarts(tmp_path: Path) -> None:
    write_catalog(tmp_path, "- {name: up, package: fw-1.1.0, type: upgrade, protocol: http}\n", base=BASE)
    server = await OtaServer(tmp_path).start()
    try:
        assert (await server.engine.store.batches())["up"].state == "waiting_verification"
        # Not started yet: protocol may change; without `verify` the batch starts now.
        write_catalog(tmp_path, "- {name: up, package: fw-1.1.0, type: upgrade, protocol: mqtt}\n",
                      base=BASE.replace(", verify: true", ""))
        await server.engine.reload()
        row = (await server.engine.store.batches())["up"]
        assert row.state == "running" and row.fingerprint["protocol"] == "mqtt"
        await server.engine.reload()  # the same file again: nothing to refuse
    finally:
        await server.stop()
    restarted = await OtaServer(tmp_path).start()
    await restarted.stop()


async def test_package_bytes_or_version_cannot_change_under_a_started_batch(tmp_path: Path) -> None:
    write_catalog(tmp_path, "- {name: up, package: fw-1.1.0, mode: dynamic, push: false}\n")
    server = await OtaServer(tmp_path).start()
    try:
        await server.engine.on_version(DeviceId("a1Test", "m1"), "default", "1.0.0")
        original = (tmp_path / "packages" / "fw-1.1.0.bin").read_bytes()
        make_firmware(tmp_path / "packages" / "fw-1.1.0.bin", 170_000, 99)  # a new build, same file name
        with pytest.raises(ConfigError, match=r"package file changed while started batch 'up' uses it"):
            await server.engine.reload()
        (tmp_path / "packages" / "fw-1.1.0.bin").write_bytes(original)
        catalog = (tmp_path / "ota.yaml").read_text()
        (tmp_path / "ota.yaml").write_text(catalog.replace("version: 1.1.0, file", "version: 1.2.0, file"))
        with pytest.raises(ConfigError, match="package version changed") as error:
            await server.engine.reload()
        line = next(n for n, text in enumerate((tmp_path / "ota.yaml").read_text().splitlines(), 1)
                    if "id: fw-1.1.0" in text)
        assert f"ota.yaml:{line}: packages[fw-1.1.0]" in str(error.value)  # file, line and key
        assert server.engine.catalog.packages["fw-1.1.0"].version == "1.1.0"
    finally:
        await server.stop()


async def test_a_new_build_loses_its_verification(tmp_path: Path) -> None:
    write_catalog(tmp_path, """
    - {name: ver, package: fw-1.1.0, type: verify, devices: [v1], protocol: http}
    """, base=BASE)
    server = await OtaServer(tmp_path).start()
    try:
        v1 = DeviceId("a1Test", "v1")
        await server.engine.on_version(v1, "default", "1.0.0")
        await server.engine.on_progress(v1, "default", 100, "")
        await server.engine.on_version(v1, "default", "1.1.0")
        package = server.engine.catalog.packages["fw-1.1.0"]
        assert server.engine.package_status(package) == "verified"
        write_catalog(tmp_path, "", base=BASE)  # drop the batch, then replace the file
        await server.engine.reload()
        make_firmware(tmp_path / "packages" / "fw-1.1.0.bin", 170_000, 7)
        await server.engine.reload()
        assert server.engine.package_status(server.engine.catalog.packages["fw-1.1.0"]) == "unverified"
    finally:
        await server.stop()


async def test_canceled_verify_job_decides_nothing_and_the_device_can_rejoin(tmp_path: Path) -> None:
    write_catalog(tmp_path, """
    - {name: ver, package: fw-1.1.0, type: verify, devices: [v1, v2], protocol: http, mode: static}
    """, base=BASE)
    server = await OtaServer(tmp_path).start()
    engine = server.engine
    try:
        v1, v2 = DeviceId("a1Test", "v1"), DeviceId("a1Test", "v2")
        await engine.on_version(v1, "default", "1.0.0")
        await engine.on_version(v1, "default", "2.0.0")  # not a version this batch targets: canceled
        assert (await engine.store.jobs("ver"))[0].state == "canceled"
        await engine.on_version(v2, "default", "1.0.0")
        await engine.on_progress(v2, "default", 100, "")
        await engine.on_version(v2, "default", "1.1.0")
        assert (await engine.store.package_statuses()).get("fw-1.1.0") is None  # undecided
        await engine.on_version(v1, "default", "1.0.0")  # back on a qualifying version: a new job
        await engine.on_progress(v1, "default", 100, "")
        await engine.on_version(v1, "default", "1.1.0")
        assert engine.package_status(engine.catalog.packages["fw-1.1.0"]) == "verified"
    finally:
        await server.stop()


async def test_verify_failure_cancels_the_rest_and_removal_leaves_no_orphans(tmp_path: Path) -> None:
    write_catalog(tmp_path, """
    - {name: ver, package: fw-1.1.0, type: verify, devices: [a, b], protocol: http, mode: static}
    """, base=BASE)
    server = await OtaServer(tmp_path).start()
    engine = server.engine
    try:
        a, b = DeviceId("a1Test", "a"), DeviceId("a1Test", "b")
        await engine.on_version(a, "default", "1.0.0")
        await engine.on_version(b, "default", "1.0.0")
        await engine.on_progress(a, "default", -4, "flash failed")
        assert await server.job_state("b") == "canceled"
        write_catalog(tmp_path, "", base=BASE)
        await engine.reload()
        assert await engine.offer(b, "default") == {}
    finally:
        await server.stop()


async def test_higher_priority_batch_takes_devices_not_yet_told(tmp_path: Path) -> None:
    write_catalog(tmp_path, "- {name: fleet, package: fw-1.1.0, type: upgrade, mode: dynamic, push: false}\n",
                  base=BASE.replace(", verify: true", ""))
    server = await OtaServer(tmp_path).start()
    try:
        async with Device(server, "pick") as device:
            await device.inform("1.0.0")
            await server.wait_state("pick", "queued")
            write_catalog(tmp_path, """
            - {name: fleet, package: fw-1.1.0, type: upgrade, mode: dynamic, push: false}
            - {name: ver, package: fw-1.1.0, type: verify, devices: [pick], protocol: http}
            """, base=BASE.replace(", verify: true", ""))
            await server.engine.reload()
            assert (await device.next_push())["data"]["version"] == "1.1.0"
        jobs = [(j.batch, j.state) for j in await server.engine.store.jobs()]
        assert jobs == [("fleet", "canceled"), ("ver", "notified")]
    finally:
        await server.stop()
