"""otacore/catalog/model.py: a valid catalog loads, and every error names file, line, key and a fix."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from devicekit import signing
from otacore.catalog.model import DEFAULT_MODULE, derive_device_secret, load_catalog
from otacore.errors import ConfigError, ConfigIssue
from otacore.config.settings import settings_from_mapping

# A small valid catalog; tests append items to its three lists. Extra products are
# products[2], extra packages packages[2], extra batches batches[1].
BASE_PRODUCTS = """\
packages_dir: packages
products:
  - key: a1Cam
    secret: prod-secret
    devices:
      - name: cam-1
  - key: a1Plug
    devices:
      - name: plug-1
        secret: plug-1-secret
"""
BASE_PACKAGES = """\
packages:
  - id: cam-1.0.0
    product: a1Cam
    version: 1.0.0
    file: cam-1.0.0.bin
  - id: plug-1.0.0
    product: a1Plug
    version: 1.0.0
    file: plug-1.0.0.bin
"""
BASE_BATCHES = """\
batches:
  - name: upgrade-plug
    package: plug-1.0.0
"""
PACKAGE_FILES = ["cam-1.0.0.bin", "cam-2.0.0.bin", "cam-patch.bin", "plug-1.0.0.bin", "plug-2.0.0.bin"]


def settings_for(tmp_path: Path, options: dict | None = None):
    return settings_from_mapping(options or {}, tmp_path / "broker.yaml")


def write_catalog(tmp_path: Path, text: str) -> Path:
    packages = tmp_path / "packages"
    packages.mkdir(exist_ok=True)
    for name in PACKAGE_FILES:
        (packages / name).write_bytes(b"firmware " + name.encode())
    path = tmp_path / "ota.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def catalog_text(products: str = "", packages: str = "", batches: str = "") -> str:
    def extra(block: str) -> str:
        return textwrap.indent(textwrap.dedent(block).strip("\n") + "\n", "  ") if block else ""
    return BASE_PRODUCTS + extra(products) + BASE_PACKAGES + extra(packages) + BASE_BATCHES + extra(batches)


def line_of(text: str, needle: str) -> int:
    """1-based line whose content (without indent and list dash) is exactly `needle`."""
    found = [number for number, line in enumerate(text.splitlines(), 1)
             if line.strip().removeprefix("- ") == needle]
    assert len(found) == 1, f"needle {needle!r} found on lines {found}"
    return found[0]


def load_errors(tmp_path: Path, text: str, options: dict | None = None) -> list[ConfigIssue]:
    path = write_catalog(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_catalog(path, settings_for(tmp_path, options))
    return caught.value.issues


def expect_issue(tmp_path: Path, *, key: str, needle: str, hint: str, options: dict | None = None,
                 **sections: str) -> ConfigIssue:
    """Load base + `sections`; there must be an issue for `key` on the line of `needle`
    in ota.yaml whose message contains `hint`."""
    text = catalog_text(**sections)
    issues = load_errors(tmp_path, text, options)
    matching = [issue for issue in issues if issue.key == key]
    assert matching, f"no issue for {key}; got {[str(i) for i in issues]}"
    issue = matching[0]
    assert issue.path == tmp_path / "ota.yaml"
    assert issue.line == line_of(text, needle), str(issue)
    assert hint.lower() in issue.message.lower(), str(issue)
    assert str(issue).startswith(f"{tmp_path / 'ota.yaml'}:{issue.line}: {key}: ")
    return issue


# --- a valid catalog --------------------------------------------------------------------------

VALID = """\
packages_dir: packages
products:
  - key: a1Cam
    name: Camera
    secret: prod-secret
    modules:
      - name: MCU
        alias: Main MCU
        description: Motor controller
    devices:
      - name: cam-1
        secret: cam-1-secret
        tags: [lab, east]
      - name: cam-2
  - key: a1Plug
    devices:
      - name: plug-1
        secret: plug-1-secret
packages:
  - id: cam-1.0.0
    product: a1Cam
    version: 1.0.0
    file: cam-1.0.0.bin
  - id: cam-2.0.0
    name: Camera 2.0.0
    product: a1Cam
    version: 2.0.0
    file: cam-2.0.0.bin
    sign_method: sha256
    verify: true
    notice: Night mode
    ext_data: {channel: beta}
    diff_from: [1.0.0]
  - id: cam-2.0.0-diff
    product: a1Cam
    version: 2.0.0
    type: diff
    base_version: 1.0.0
    file: cam-patch.bin
  - id: mcu-1.1.0
    product: a1Cam
    module: MCU
    version: 1.1.0
    file: plug-2.0.0.bin
batches:
  - name: verify-cam-2
    package: cam-2.0.0
    type: verify
    devices: [cam-1, cam-77]
    protocol: mqtt
  - name: upgrade-cam-2
    package: cam-2.0.0
    src_versions: [1.0.0]
    mode: dynamic
    push: false
"""


@pytest.fixture()
def valid_catalog(tmp_path):
    return load_catalog(write_catalog(tmp_path, VALID), settings_for(tmp_path))


def test_valid_catalog_loads_products_with_implicit_default_module(valid_catalog):
    assert set(valid_catalog.products) == {"a1Cam", "a1Plug"}
    cam = valid_catalog.products["a1Cam"]
    assert cam.name == "Camera" and cam.secret == "prod-secret"
    assert set(cam.modules) == {DEFAULT_MODULE, "MCU"}
    assert cam.modules["MCU"].alias == "Main MCU" and cam.modules["MCU"].description == "Motor controller"
    assert set(valid_catalog.products["a1Plug"].modules) == {DEFAULT_MODULE}
    assert valid_catalog.products["a1Plug"].name == "a1Plug"  # name defaults to the key


def test_valid_catalog_device_secrets_listed_and_derived(valid_catalog):
    cam = valid_catalog.products["a1Cam"]
    assert cam.devices["cam-1"].tags == ("lab", "east")
    assert valid_catalog.device_secret("a1Cam", "cam-1") == "cam-1-secret"
    derived = signing.derive_device_secret("prod-secret", "cam-2")  # as devices derive it
    assert derive_device_secret("prod-secret", "cam-2") == derived
    assert valid_catalog.device_secret("a1Cam", "cam-2") == derived
    assert valid_catalog.device_secret("a1Cam", "unlisted-9") == derive_device_secret("prod-secret", "unlisted-9")
    assert valid_catalog.device_secret("a1Plug", "plug-1") == "plug-1-secret"
    assert valid_catalog.device_secret("a1Plug", "unlisted-9") is None
    assert valid_catalog.device_secret("a1Nope", "cam-1") is None


def test_valid_catalog_packages(tmp_path, valid_catalog):
    packages = valid_catalog.packages
    assert set(packages) == {"cam-1.0.0", "cam-2.0.0", "cam-2.0.0-diff", "mcu-1.1.0"}
    base = packages["cam-1.0.0"]
    assert (base.module, base.type, base.sign_method, base.verify, base.name) == (DEFAULT_MODULE, "full", "MD5", False,
                                                                                 "cam-1.0.0")
    assert base.file == (tmp_path / "packages" / "cam-1.0.0.bin").resolve()
    full = packages["cam-2.0.0"]
    assert (full.sign_method, full.verify, full.notice, full.ext_data, full.diff_from) == (
        "SHA256", True, "Night mode", {"channel": "beta"}, ("1.0.0",))
    diff = packages["cam-2.0.0-diff"]
    assert diff.is_diff and diff.base_version == "1.0.0" and not full.is_diff
    assert packages["mcu-1.1.0"].module == "MCU"
    assert valid_catalog.full_package("a1Cam", DEFAULT_MODULE, "2.0.0") is full
    assert valid_catalog.full_package("a1Cam", "MCU", "2.0.0") is None
    assert valid_catalog.packages_dir == (tmp_path / "packages").resolve()


def test_valid_catalog_batches_with_positions_and_defaults(valid_catalog):
    verify, upgrade = valid_catalog.batches["verify-cam-2"], valid_catalog.batches["upgrade-cam-2"]
    assert (verify.position, upgrade.position) == (0, 1)
    assert (verify.type, verify.protocol, verify.mode, verify.push) == ("verify", "mqtt", "static", True)
    assert verify.devices == ("cam-1", "cam-77")  # cam-77 derives from the product secret
    assert verify.src_versions is None
    assert (upgrade.type, upgrade.protocol, upgrade.mode, upgrade.push) == ("upgrade", "http", "dynamic", False)
    assert upgrade.devices is None and upgrade.src_versions == ("1.0.0",)
    assert upgrade.package == "cam-2.0.0" and upgrade.line > verify.line > 0


def test_https_batch_loads_when_tls_is_configured(tmp_path):
    (tmp_path / "cert.pem").write_text("cert")
    (tmp_path / "key.pem").write_text("key")
    path = write_catalog(tmp_path, catalog_text(batches="- name: b-https\n  package: cam-1.0.0\n  protocol: https\n"))
    options = {"http": {"tls": {"certfile": "cert.pem", "keyfile": "key.pem", "bind": "127.0.0.1:8443"}}}
    catalog = load_catalog(path, settings_for(tmp_path, options))
    assert catalog.batches["b-https"].protocol == "https"


def test_http_batch_needs_plain_http_beside_tls(tmp_path):
    (tmp_path / "cert.pem").write_text("cert")
    (tmp_path / "key.pem").write_text("key")
    path = write_catalog(tmp_path, catalog_text())
    options = {"http": {"tls": {"certfile": "cert.pem", "keyfile": "key.pem"}}}  # TLS on http.bind itself
    with pytest.raises(ConfigError) as caught:
        load_catalog(path, settings_for(tmp_path, options))
    assert caught.value.issues[0].key == "batches[0].protocol"
    assert "http.tls.bind" in caught.value.issues[0].message


# --- YAML-level errors ------------------------------------------------------------------------

def test_missing_catalog_file_is_one_issue(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_catalog(tmp_path / "nope.yaml", settings_for(tmp_path))
    assert caught.value.issues[0].path == tmp_path / "nope.yaml"
    assert "not found" in caught.value.issues[0].message


def test_broken_yaml_syntax_reports_the_line_of_the_error(tmp_path):
    text = "packages_dir: packages\nproducts:\n  - key: a1Cam\n    name: Camera: bad\n"
    (issue,) = load_errors(tmp_path, text)
    assert (issue.path, issue.line) == (tmp_path / "ota.yaml", 4)
    assert "fix the YAML syntax" in issue.message


def test_duplicate_yaml_key_reports_the_second_occurrence(tmp_path):
    text = "products:\n  - key: a1Cam\n    secret: s\n    secret: t\n"
    (issue,) = load_errors(tmp_path, text)
    assert (issue.path, issue.line) == (tmp_path / "ota.yaml", 4)
    assert "duplicate key 'secret'" in issue.message and "fix the YAML syntax" in issue.message


def test_top_level_must_be_a_mapping(tmp_path):
    (issue,) = load_errors(tmp_path, "- a1Cam\n- a1Plug\n")
    assert (issue.path, issue.line) == (tmp_path / "ota.yaml", 1)
    assert "must be a mapping" in issue.message and "a list" in issue.message


def test_unknown_top_level_key_is_reported_on_its_line(tmp_path):
    text = catalog_text() + "pakages: []\n"
    issues = load_errors(tmp_path, text)
    (issue,) = [i for i in issues if i.key.endswith("pakages")]
    assert issue.line == line_of(text, "pakages: []")
    assert "unknown key; expected one of" in issue.message and "packages" in issue.message


def test_unknown_top_level_key_path_has_no_leading_dot(tmp_path):
    issues = load_errors(tmp_path, catalog_text() + "pakages: []\n")
    assert [i.key for i in issues] == ["pakages"]


def test_unknown_key_inside_an_item(tmp_path):
    expect_issue(tmp_path, key="packages[2].verison", needle="verison: 2.0.0", hint="unknown key; expected one of",
                 packages="- id: cam-2.0.0\n  product: a1Cam\n  verison: 2.0.0\n  file: cam-2.0.0.bin\n")


# --- products and devices ---------------------------------------------------------------------

def test_product_key_format(tmp_path):
    expect_issue(tmp_path, key="products[2].key", needle="key: a1 Cam!", hint="1-64 of",
                 products="- key: a1 Cam!\n  secret: s\n")


def test_product_without_devices_or_secret(tmp_path):
    expect_issue(tmp_path, key="products[2]", needle="key: a1Empty", hint="needs `devices` or a `secret`",
                 products="- key: a1Empty\n  name: Empty\n")


def test_device_without_secret_when_product_has_none(tmp_path):
    expect_issue(tmp_path, key="products[2].devices[0]", needle="name: lonely", hint="add either",
                 products="- key: a1NoSecret\n  devices:\n    - name: lonely\n")


def test_duplicate_product(tmp_path):
    expect_issue(tmp_path, key="products[2].key", needle='key: "a1Plug"', hint="'a1Plug' is defined twice",
                 products='- key: "a1Plug"\n  secret: s\n')


def test_duplicate_device(tmp_path):
    expect_issue(tmp_path, key="products[2].devices[1].name", needle='name: "d1"', hint="'d1' is listed twice",
                 products='- key: a1Dup\n  secret: s\n  devices:\n    - name: d1\n    - name: "d1"\n')


# --- packages ---------------------------------------------------------------------------------

def extra_package(**fields: str) -> str:
    values = {"id": "cam-2.0.0", "product": "a1Cam", "version": "2.0.0", "file": "cam-2.0.0.bin"} | fields
    lines = [f"{key}: {value}" for key, value in values.items() if value is not None]
    return "- " + "\n  ".join(lines) + "\n"


@pytest.mark.parametrize("version", ["2.0", "v1.0.0", "1.0.0.1", "01.0.0"])
def test_package_version_must_be_three_numbers(tmp_path, version):
    issue = expect_issue(tmp_path, key="packages[2].version", needle=f"version: {version}",
                         hint="three dot-separated numbers", packages=extra_package(version=version))
    assert repr(version) in issue.message


@pytest.mark.parametrize("ext_data, hint", [
    # A date: json.dumps raised at every push of the package.
    ("{released: 2026-01-01}", "holds 2026-01-01 (date), which JSON cannot carry; quote it"),
    ("{gain: .nan}", "holds nan, which JSON cannot carry"),
    ("{gain: [1, -.inf]}", "holds -inf, which JSON cannot carry"),
    ("{1: one}", "has the key 1: keys must be text"),
    ("{blob: !!binary aGVsbG8=}", "(bytes), which JSON cannot carry"),
    ('{note: "\\ud800"}', "lone surrogate"),
    ("{a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a], "
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b], d: [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]}",
     "holds more than 1000 values"),  # 10,000 values by aliases, in every upgrade message
])
def test_ext_data_must_be_small_plain_json(tmp_path, ext_data, hint):
    expect_issue(tmp_path, key="packages[2].ext_data", needle=f"ext_data: {ext_data}", hint=hint,
                 packages=extra_package(ext_data=ext_data))


def test_ext_data_and_notice_fit_8_kib_of_every_upgrade_message(tmp_path):
    blob, notice = "{blob: " + "x" * 9000 + "}", '"' + "é" * 4100 + '"'  # é: 2 bytes in UTF-8
    expect_issue(tmp_path, key="packages[2].ext_data", needle=f"ext_data: {blob}",
                 hint="ext_data and notice take 9011 bytes in every upgrade message, more than 8192",
                 packages=extra_package(ext_data=blob))
    expect_issue(tmp_path, key="packages[2].notice", needle=f"notice: {notice}", hint="more than 8192",
                 packages=extra_package(notice=notice))


def test_text_with_a_lone_surrogate_is_refused(tmp_path):
    # It would reach a device inside the push's JSON, whose UTF-8 encoding raises.
    expect_issue(tmp_path, key="packages[2].notice", needle='notice: "\\udc80 night mode"', hint="lone surrogate",
                 packages=extra_package(notice='"\\udc80 night mode"'))


@pytest.mark.parametrize("scalar, hint", [
    ("2026-02-30T00:00:00Z", "day is out of range for month"),
    ("2026-13-01", "month must be in 1..12"),
    ("1" + "0" * 5000, "too many digits"),
    ("0x" + "f" * 5000, "too many digits"),  # hex escapes Python's digit limit; str() of it would not
])
def test_a_scalar_yaml_cannot_build_is_a_line_error(tmp_path, scalar, hint):
    # PyYAML raised a bare ValueError for these: a traceback instead of file:line.
    text = catalog_text(packages=extra_package(notice=scalar))
    (issue,) = load_errors(tmp_path, text)
    assert issue.line == len(text.splitlines()) - len(BASE_BATCHES.splitlines()), str(issue)
    assert hint in issue.message and "fix the YAML syntax" in issue.message and len(str(issue)) < 200


def test_nesting_too_deep_is_a_line_error(tmp_path):
    text = catalog_text(packages=extra_package(ext_data="{a: " + "[" * 5000 + "]" * 5000 + "}"))
    (issue,) = load_errors(tmp_path, text)
    assert issue.line == line_of(text, "ext_data: {a: " + "[" * 5000 + "]" * 5000 + "}")
    assert "nest more than 100 deep" in issue.message


def test_bad_sign_method(tmp_path):
    expect_issue(tmp_path, key="packages[2].sign_method", needle="sign_method: SHA1", hint="use SHA256 or MD5",
                 packages=extra_package(sign_method="SHA1"))


def test_package_type_must_be_full_or_diff(tmp_path):
    expect_issue(tmp_path, key="packages[2].type", needle="type: delta", hint="use full or diff",
                 packages=extra_package(type="delta"))


def test_unknown_product(tmp_path):
    expect_issue(tmp_path, key="packages[2].product", needle="product: a1Nope", hint="define it under products",
                 packages=extra_package(product="a1Nope"))


def test_unknown_module(tmp_path):
    expect_issue(tmp_path, key="packages[2].module", needle="module: GPU", hint="add it under the product's modules",
                 packages=extra_package(module="GPU"))


def test_package_file_missing(tmp_path):
    expect_issue(tmp_path, key="packages[2].file", needle="file: nothere.bin", hint="copy the file into packages_dir",
                 packages=extra_package(file="nothere.bin"))


def test_package_file_ending_not_allowed(tmp_path):
    (tmp_path / "packages").mkdir()
    (tmp_path / "packages" / "notes.txt").write_text("x")
    expect_issue(tmp_path, key="packages[2].file", needle="file: notes.txt", hint="allowed: .bin",
                 packages=extra_package(file="notes.txt"))


def test_package_file_too_big(tmp_path):
    (tmp_path / "packages").mkdir()
    (tmp_path / "packages" / "big.bin").write_bytes(b"\0" * (1024 * 1024 + 1))
    expect_issue(tmp_path, key="packages[2].file", needle="file: big.bin", hint="over limits.max_file_mb (1 MB)",
                 options={"limits": {"max_file_mb": 1}}, packages=extra_package(file="big.bin"))


def test_package_file_exactly_at_the_limit_is_fine(tmp_path):
    (tmp_path / "packages").mkdir()
    (tmp_path / "packages" / "edge.bin").write_bytes(b"\0" * (1024 * 1024))
    path = write_catalog(tmp_path, catalog_text(packages=extra_package(file="edge.bin")))
    catalog = load_catalog(path, settings_for(tmp_path, {"limits": {"max_file_mb": 1}}))
    assert catalog.packages["cam-2.0.0"].file.name == "edge.bin"


def test_package_file_empty(tmp_path):
    (tmp_path / "packages").mkdir()
    (tmp_path / "packages" / "empty.bin").write_bytes(b"")
    expect_issue(tmp_path, key="packages[2].file", needle="file: empty.bin", hint="is empty",
                 packages=extra_package(file="empty.bin"))


def test_package_file_relative_path_trick(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"outside")
    expect_issue(tmp_path, key="packages[2].file", needle="file: ../x.bin", hint="leaves packages_dir",
                 packages=extra_package(file="../x.bin"))


def test_package_file_absolute_path(tmp_path):
    outside = tmp_path / "x.bin"
    outside.write_bytes(b"outside")
    expect_issue(tmp_path, key="packages[2].file", needle=f"file: {outside}", hint="leaves packages_dir",
                 packages=extra_package(file=str(outside)))


def test_duplicate_package_id(tmp_path):
    expect_issue(tmp_path, key="packages[2].id", needle='id: "cam-1.0.0"', hint="'cam-1.0.0' is used twice",
                 packages=extra_package(id='"cam-1.0.0"'))


def test_two_full_packages_of_one_version(tmp_path):
    expect_issue(tmp_path, key="packages[2].version", needle='version: "1.0.0"',
                 hint="already has full package 'cam-1.0.0'",
                 packages=extra_package(id="cam-1.0.0-again", version='"1.0.0"'))


def test_diff_without_base_version(tmp_path):
    expect_issue(tmp_path, key="packages[2].base_version", needle="id: cam-diff", hint="needs base_version",
                 packages=extra_package(id="cam-diff", type="diff", file="cam-patch.bin"))


def test_diff_whose_base_version_has_no_full_package(tmp_path):
    expect_issue(tmp_path, key="packages[2].base_version", needle="base_version: 0.9.0", hint="no full package",
                 packages=extra_package(id="cam-diff", type="diff", base_version="0.9.0", file="cam-patch.bin"))


def test_diff_from_names_a_version_without_full_package(tmp_path):
    expect_issue(tmp_path, key="packages[2].diff_from[0]", needle="diff_from: [0.5.0]", hint="add it or drop 0.5.0",
                 packages=extra_package(diff_from="[0.5.0]"))


def test_diff_from_on_a_diff_package(tmp_path):
    expect_issue(tmp_path, key="packages[2].diff_from", needle="diff_from: [1.0.0]",
                 hint="only full packages can list diff_from",
                 packages=extra_package(id="cam-diff", type="diff", base_version="1.0.0", file="cam-patch.bin",
                                        diff_from="[1.0.0]"))


def test_diff_from_issue_in_a_block_list_points_at_the_item_line(tmp_path):
    expect_issue(tmp_path, key="packages[2].diff_from[1]", needle="0.5.0", hint="add it or drop 0.5.0",
                 packages=extra_package(diff_from="\n    - 1.0.0\n    - 0.5.0"))


# --- batches ----------------------------------------------------------------------------------

def extra_batch(**fields: str) -> str:
    values = {"name": "b2", "package": "cam-1.0.0"} | fields
    return "- " + "\n  ".join(f"{key}: {value}" for key, value in values.items()) + "\n"


def test_batch_with_unknown_package(tmp_path):
    expect_issue(tmp_path, key="batches[1].package", needle="package: nope", hint="define it under packages",
                 batches=extra_batch(package="nope"))


@pytest.mark.parametrize("field, value, hint", [
    ("type", "canary", "use verify or upgrade"),
    ("protocol", "ftp", "use http, https or mqtt"),
    ("mode", "lazy", "use static or dynamic"),
])
def test_batch_bad_type_protocol_mode(tmp_path, field, value, hint):
    expect_issue(tmp_path, key=f"batches[1].{field}", needle=f"{field}: {value}", hint=hint,
                 batches=extra_batch(**{field: value}))


def test_https_batch_without_tls(tmp_path):
    expect_issue(tmp_path, key="batches[1].protocol", needle="protocol: https", hint="https needs http.tls",
                 batches=extra_batch(protocol="https"))


def test_verify_batch_without_devices(tmp_path):
    expect_issue(tmp_path, key="batches[1].devices", needle="name: b-verify", hint="must list the devices",
                 batches=extra_batch(name="b-verify", type="verify"))


def test_batch_device_not_in_product_without_secret(tmp_path):
    expect_issue(tmp_path, key="batches[1].devices", needle="devices: [plug-1, ghost]",
                 hint="device 'ghost' does not belong to product 'a1Plug'",
                 batches=extra_batch(package="plug-1.0.0", devices="[plug-1, ghost]"))


@pytest.mark.parametrize("version", ["1.0", "v0.9.0"])
def test_src_versions_must_be_three_numbers(tmp_path, version):
    expect_issue(tmp_path, key="batches[1].src_versions", needle=f"src_versions: [{version}]",
                 hint="three dot-separated numbers", batches=extra_batch(src_versions=f"[{version}]"))


def test_src_versions_equal_to_package_version(tmp_path):
    expect_issue(tmp_path, key="batches[1].src_versions", needle="src_versions: [0.9.0, 1.0.0]",
                 hint="1.0.0 is the package's own version", batches=extra_batch(src_versions="[0.9.0, 1.0.0]"))


def test_duplicate_batch_name(tmp_path):
    expect_issue(tmp_path, key="batches[1].name", needle='name: "upgrade-plug"', hint="'upgrade-plug' is used twice",
                 batches=extra_batch(name='"upgrade-plug"'))


@pytest.mark.parametrize("value", ['"yes"', "1"])
def test_push_must_be_a_boolean(tmp_path, value):
    expect_issue(tmp_path, key="batches[1].push", needle=f"push: {value}", hint="must be true or false",
                 batches=extra_batch(push=value))


@pytest.mark.parametrize("value, hint", [
    ("0", "from 1 to 525,600"),
    ("525601", "from 1 to 525,600"),
    ("1" + "0" * 400, "a number of about 401 digits is not valid"),  # was an OverflowError at the first timeout
    (".nan", "nan is not valid"),
    ("true", "True is not valid"),
    ("2.5", "a whole number of minutes"),
])
def test_timeout_minutes_is_a_whole_number_up_to_a_year(tmp_path, value, hint):
    expect_issue(tmp_path, key="batches[1].timeout_minutes", needle=f"timeout_minutes: {value}", hint=hint,
                 batches=extra_batch(timeout_minutes=value))


def test_timeout_minutes_of_a_year_loads(tmp_path):
    text = catalog_text(batches=extra_batch(timeout_minutes="525600"))
    catalog = load_catalog(write_catalog(tmp_path, text), settings_for(tmp_path))
    assert catalog.batches["b2"].timeout_minutes == 525_600


# --- reporting --------------------------------------------------------------------------------

def test_every_error_in_a_file_is_reported(tmp_path):
    text = catalog_text(products="- key: a1 Bad\n  secret: s\n",
                        packages=extra_package(version="2.0", sign_method="SHA1"),
                        batches=extra_batch(protocol="ftp", push='"no"'))
    keys = {issue.key for issue in load_errors(tmp_path, text)}
    assert {"products[2].key", "packages[2].version", "packages[2].sign_method",
            "batches[1].protocol", "batches[1].push"} <= keys


def test_config_error_one_line_is_one_line(tmp_path):
    text = catalog_text(packages=extra_package(version="2.0", sign_method="SHA1"))
    path = write_catalog(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_catalog(path, settings_for(tmp_path))
    error = caught.value
    assert len(error.issues) >= 2
    summary = error.one_line()
    assert "\n" not in summary
    assert summary.startswith(str(error.issues[0])) and f"and {len(error.issues) - 1} more" in summary
    assert str(error).count("\n") == len(error.issues) - 1


def test_more_than_1000_batches_are_refused_at_the_batches_key(tmp_path):
    batches = "".join(f"- {{name: b{i}, package: cam-1.1.0}}\n" for i in range(1000))  # and the base one
    issue = expect_issue(tmp_path, key="batches", needle="batches:", hint="1001 batches; at most 1000",
                         batches=batches)
    assert "remove finished ones" in issue.message


def test_a_catalog_over_32_mib_is_refused_before_it_is_parsed(tmp_path):
    text = catalog_text() + "# " + "x" * (32 * 2**20) + "\n"  # a comment: valid YAML, only too big
    [issue] = load_errors(tmp_path, text)
    assert str(issue) == f"{tmp_path / 'ota.yaml'}: {issue.message}" and "the file is over 32 MiB" in issue.message
