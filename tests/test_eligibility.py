"""otacore/fleet/eligibility.py: which batch wants a device (docs/operations.md, Batches)."""
from __future__ import annotations

from pathlib import Path

import pytest

from otacore.catalog.model import Batch, Package, load_catalog
from otacore.protocol.credentials import DeviceId
from otacore.fleet.eligibility import batch_priority, candidate_batches, device_in_scope, version_qualifies
from otacore.config.settings import settings_from_mapping

FULL = Package(id="fw-2.0.0", name="fw", product="a1Cam", module="default", version="2.0.0", type="full",
               file=Path("fw.bin"), sign_method="MD5")
DIFF = Package(id="fw-2.0.0-diff", name="fw", product="a1Cam", module="default", version="2.0.0", type="diff",
               file=Path("fw.patch.bin"), sign_method="MD5", base_version="1.0.0")


def batch(package: Package, *, src_versions=None, devices=None, type="upgrade", position=0) -> Batch:
    return Batch(name=f"b{position}", package=package.id, type=type, protocol="http", mode="static", push=True,
                 devices=devices, src_versions=src_versions, position=position)


# --- version_qualifies --------------------------------------------------------------------

@pytest.mark.parametrize("version, expected", [
    ("1.0.0", True), ("1.9.9", True), ("2.0.0", False), ("2.0.1", False), ("3.0.0", False),
    ("1.0", False), ("garbage", False),
])
def test_without_src_versions_a_lower_version_qualifies(version, expected):
    assert version_qualifies(batch(FULL), FULL, version) is expected


@pytest.mark.parametrize("version, expected", [
    ("1.0.0", True), ("2.5.0", True), ("garbage", True), ("1.1.0", False), ("2.0.0", False),
])
def test_with_src_versions_only_listed_versions_qualify(version, expected):
    listed = batch(FULL, src_versions=("1.0.0", "2.5.0", "garbage"))
    assert version_qualifies(listed, FULL, version) is expected


def test_package_version_never_qualifies_even_when_listed():
    assert not version_qualifies(batch(FULL, src_versions=("2.0.0",)), FULL, "2.0.0")


@pytest.mark.parametrize("version, expected", [("1.0.0", True), ("0.9.0", False), ("1.5.0", False),
                                               ("2.0.0", False)])
def test_diff_package_targets_only_its_base_version(version, expected):
    assert version_qualifies(batch(DIFF), DIFF, version) is expected


def test_diff_package_with_src_versions_still_needs_base_version():
    assert version_qualifies(batch(DIFF, src_versions=("1.0.0",)), DIFF, "1.0.0")
    assert not version_qualifies(batch(DIFF, src_versions=("0.9.0",)), DIFF, "0.9.0")


# --- device_in_scope ----------------------------------------------------------------------

def test_device_in_scope_needs_product_and_module():
    assert device_in_scope(batch(FULL), FULL, DeviceId("a1Cam", "cam-9"), "default")
    assert not device_in_scope(batch(FULL), FULL, DeviceId("a1Other", "cam-9"), "default")
    assert not device_in_scope(batch(FULL), FULL, DeviceId("a1Cam", "cam-9"), "MCU")


def test_device_in_scope_follows_the_device_list():
    listed = batch(FULL, devices=("cam-1", "cam-2"))
    assert device_in_scope(listed, FULL, DeviceId("a1Cam", "cam-2"), "default")
    assert not device_in_scope(listed, FULL, DeviceId("a1Cam", "cam-3"), "default")


def test_batch_priority_prefers_verify_then_later_position():
    assert batch_priority(batch(FULL, type="verify", position=0)) > batch_priority(batch(FULL, position=9))
    assert batch_priority(batch(FULL, position=2)) > batch_priority(batch(FULL, position=1))


# --- candidate_batches over a real catalog ------------------------------------------------

CATALOG = """\
products:
  - key: a1Cam
    secret: prod-secret
    modules: [{name: MCU}]
packages:
  - {id: cam-1.0.0, product: a1Cam, version: 1.0.0, file: a.bin}
  - {id: cam-2.0.0, product: a1Cam, version: 2.0.0, file: b.bin}
  - {id: cam-2.0.0-diff, product: a1Cam, version: 2.0.0, type: diff, base_version: 1.0.0, file: c.bin}
  - {id: mcu-1.1.0, product: a1Cam, module: MCU, version: 1.1.0, file: d.bin}
batches:
  - {name: up-early, package: cam-2.0.0}
  - {name: verify-2, package: cam-2.0.0, type: verify, devices: [cam-1]}
  - {name: up-late, package: cam-2.0.0}
  - {name: up-diff, package: cam-2.0.0-diff}
  - {name: mcu-up, package: mcu-1.1.0}
"""


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("eligibility")
    (root / "packages").mkdir()
    for name in "abcd":
        (root / "packages" / f"{name}.bin").write_bytes(b"firmware")
    (root / "ota.yaml").write_text(CATALOG)
    return load_catalog(root / "ota.yaml", settings_from_mapping({}, root / "broker.yaml"))


ALL = {"up-early", "verify-2", "up-late", "up-diff", "mcu-up"}


def names(batches: list[Batch]) -> list[str]:
    return [b.name for b in batches]


def test_candidates_verify_first_then_later_position(catalog):
    found = candidate_batches(catalog, ALL, DeviceId("a1Cam", "cam-1"), "default", "1.0.0")
    assert names(found) == ["verify-2", "up-diff", "up-late", "up-early"]


def test_candidates_skip_verify_batch_for_unlisted_device(catalog):
    found = candidate_batches(catalog, ALL, DeviceId("a1Cam", "cam-2"), "default", "1.0.0")
    assert names(found) == ["up-diff", "up-late", "up-early"]


def test_candidates_only_running_batches(catalog):
    found = candidate_batches(catalog, {"up-early", "mcu-up"}, DeviceId("a1Cam", "cam-1"), "default", "1.0.0")
    assert names(found) == ["up-early"]
    assert candidate_batches(catalog, set(), DeviceId("a1Cam", "cam-1"), "default", "1.0.0") == []


def test_candidates_follow_version_and_module(catalog):
    cam = DeviceId("a1Cam", "cam-2")
    assert names(candidate_batches(catalog, ALL, cam, "default", "1.5.0")) == ["up-late", "up-early"]
    assert candidate_batches(catalog, ALL, cam, "default", "2.0.0") == []
    assert names(candidate_batches(catalog, ALL, cam, "MCU", "1.0.0")) == ["mcu-up"]
    assert candidate_batches(catalog, ALL, DeviceId("a1Other", "cam-2"), "default", "1.0.0") == []
