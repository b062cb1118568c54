"""The catalog (ota.yaml): products, modules, devices, packages and batches, fully validated.

`load_catalog` either returns a Catalog that is safe to run, or raises ConfigError listing
every problem with file, line and key. It checks package files are regular files the server
can read and that fit the limits, but does not hash them (package_files.py does that, once,
with a cache).
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import json
import math
import os
import re
import stat as stat_module
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otacore.errors import ConfigError, ConfigIssue
from otacore.catalog.rollout_policy import MAX_MINUTES, POLICY_KEYS, RolloutPolicy, read_policy, shown
from otacore.config.settings import Settings
from otacore.catalog.versions import VERSION_PATTERN as _VERSION_PATTERN, is_version
from otacore.config.yamlmarks import MarkedList, MarkedMap, YamlSyntaxError, load_marked

DEFAULT_MODULE = "default"
PRODUCT_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
DEVICE_NAME_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,64}\Z")
MODULE_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
PACKAGE_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}\Z")
BATCH_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}\Z")
# `/sys/{pk}/{dn}` and `/ota/device/...` are protocol topics: a product with one of these
# keys would own `/{pk}/{dn}/#` inside them, reaching other devices' topics.
RESERVED_PRODUCT_KEYS = frozenset({"sys", "ota"})
SIGN_METHODS = {"md5": "MD5", "sha256": "SHA256"}
# ext_data goes into every upgrade message a device gets: plain JSON, and small.
MAX_EXT_VALUES = 1000
# Batches in one catalog: each is decided on every report and shown on every status poll.
MAX_BATCHES = 1000
# ext_data and the notice, as JSON in a push: with this bound every OTA message a device
# receives fits in 16 KiB (docs/protocol.md, "Buffer sizes").
MAX_EXT_BYTES = 8192


@dataclass(frozen=True)
class Module:
    name: str
    alias: str = ""
    description: str = ""


@dataclass(frozen=True)
class Device:
    name: str
    secret: str | None = None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Product:
    key: str
    name: str
    secret: str | None
    modules: dict[str, Module]
    devices: dict[str, Device]

    def device_secret(self, device_name: str) -> str | None:
        """The listed secret, else the one derived from the product secret, else None."""
        device = self.devices.get(device_name)
        if device is not None and device.secret:
            return device.secret
        if self.secret and DEVICE_NAME_RE.match(device_name):
            return derive_device_secret(self.secret, device_name)
        return None

    def has_device(self, device_name: str) -> bool:
        return self.device_secret(device_name) is not None


@dataclass(frozen=True)
class Package:
    id: str
    name: str
    product: str
    module: str
    version: str
    type: str  # full | diff
    file: Path
    sign_method: str  # MD5 | SHA256
    verify: bool = False
    base_version: str | None = None
    description: str = ""
    notice: str | None = None
    ext_data: dict[str, Any] = field(default_factory=dict)
    diff_from: tuple[str, ...] = ()
    line: int = field(default=0, compare=False)  # where it stands in the catalog, for errors
    file_line: int = field(default=0, compare=False)  # where its `file` key stands

    @property
    def is_diff(self) -> bool:
        return self.type == "diff"


@dataclass(frozen=True)
class Batch:
    name: str
    package: str
    type: str  # verify | upgrade
    protocol: str  # http | https | mqtt
    mode: str  # static | dynamic
    push: bool
    devices: tuple[str, ...] | None = None
    src_versions: tuple[str, ...] | None = None
    timeout_minutes: int | None = None  # a told device silent this long fails its job
    position: int = 0  # index in the file: later batches win over earlier ones
    line: int = field(default=0, compare=False)
    policy: RolloutPolicy = field(default_factory=RolloutPolicy)  # the optional rollout keys


@dataclass(frozen=True)
class Catalog:
    path: Path
    packages_dir: Path
    products: dict[str, Product]
    packages: dict[str, Package]
    batches: dict[str, Batch]

    def full_package(self, product: str, module: str, version: str) -> Package | None:
        for package in self.packages.values():
            if (package.product, package.module, package.version, package.type) == (product, module, version, "full"):
                return package
        return None

    def device_secret(self, product_key: str, device_name: str) -> str | None:
        product = self.products.get(product_key)
        return product.device_secret(device_name) if product else None


def derive_device_secret(product_secret: str, device_name: str) -> str:
    """docs/protocol.md section 1: hex(HMAC-SHA256(productSecret, deviceName))."""
    return hmac.new(product_secret.encode(), device_name.encode(), hashlib.sha256).hexdigest()


def _path(parent: str, name: Any) -> str:
    return f"{parent}.{name}" if parent else str(name)


class _Checker:
    """Collects issues while reading one YAML document."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.issues: list[ConfigIssue] = []

    def add(self, line: int, key: str, message: str) -> None:
        self.issues.append(ConfigIssue(self.path, line, key, message))

    def mapping(self, value: Any, line: int, key: str) -> MarkedMap | None:
        if isinstance(value, MarkedMap):
            return value
        self.add(line, key, f"must be a mapping of keys, got {_kind(value)}")
        return None

    def items(self, parent: MarkedMap, name: str, required: bool = False) -> list[tuple[int, str, MarkedMap]]:
        """The list under `parent[name]` as (line, key path, mapping) for each valid item."""
        if name not in parent or parent[name] is None:
            if required:
                self.add(parent.line, name, "is required")
            return []
        value = parent[name]
        if not isinstance(value, MarkedList):
            self.add(parent.line_of(name), name, f"must be a list, got {_kind(value)}")
            return []
        result = []
        for index, item in enumerate(value):
            key = f"{name}[{index}]"
            mapping = self.mapping(item, value.line_of(index), key)
            if mapping is not None:
                result.append((value.line_of(index), key, mapping))
        return result

    def known_keys(self, item: MarkedMap, key: str, allowed: set[str]) -> None:
        for name in item:
            if name not in allowed:
                self.add(item.line_of(name), _path(key, name),
                         f"unknown key; expected one of {', '.join(sorted(allowed))}")

    def text(self, item: MarkedMap, key: str, name: str, *, required: bool = False,
             pattern: re.Pattern[str] | None = None, rule: str = "", default: str | None = None) -> str | None:
        if name not in item or item[name] is None:
            if required:
                self.add(item.line, _path(key, name), "is required")
            return default
        value = item[name]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            self.add(item.line_of(name), _path(key, name), f"must be text, got {_kind(value)}")
            return default
        if not _is_utf8(value):
            self.add(item.line_of(name), _path(key, name), f"{shown(value)} holds a lone surrogate (a \\ud800-"
                     "\\udfff escape), which UTF-8 cannot carry; write the character itself")
            return default
        if pattern is not None and not pattern.match(value):
            self.add(item.line_of(name), _path(key, name), f"{value!r} is not valid: {rule}")
            return default
        return value

    def flag(self, item: MarkedMap, key: str, name: str, default: bool) -> bool:
        value = item.get(name, default)
        if not isinstance(value, bool):
            self.add(item.line_of(name), _path(key, name), f"must be true or false, got {shown(value)}")
            return default
        return value

    def text_list(self, item: MarkedMap, key: str, name: str) -> list[tuple[int, str]] | None:
        if name not in item or item[name] is None:
            return None
        value = item[name]
        if not isinstance(value, MarkedList):
            self.add(item.line_of(name), _path(key, name), f"must be a list, got {_kind(value)}")
            return None
        result = []
        for index, entry in enumerate(value):
            if isinstance(entry, bool) or not isinstance(entry, (str, int, float)):
                self.add(value.line_of(index), f"{key}.{name}[{index}]", f"must be text, got {_kind(entry)}")
                continue
            result.append((value.line_of(index), str(entry)))
        return result


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_problem(value: Any) -> str | None:
    """Why `value` cannot go into a device's JSON message as it is, or None. Counts values as
    reached, so YAML aliases cannot make a small file a huge message."""
    stack, reached = [value], 0
    while stack:
        item = stack.pop()
        reached += 1
        if reached > MAX_EXT_VALUES:
            return f"holds more than {MAX_EXT_VALUES} values; devices get it in every upgrade message: keep it small"
        if isinstance(item, dict):
            for key, inner in item.items():
                if not isinstance(key, str):
                    return f"has the key {shown(key)}: keys must be text; quote it"
                stack += [key, inner]
        elif isinstance(item, list):
            stack += item
        elif isinstance(item, str):
            if not _is_utf8(item):
                return f"holds {shown(item)} with a lone surrogate, which UTF-8 cannot carry; write the character " \
                       "itself"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"holds {item!r}, which JSON cannot carry; write a finite number or quote it"
        elif not (item is None or isinstance(item, (bool, int))):
            return f"holds {shown(item)} ({type(item).__name__}), which JSON cannot carry; quote it to send text"
    return None


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", MarkedMap: "a mapping", list: "a list", MarkedList: "a list",
            bool: "true/false", int: "a number", float: "a number", str: "text"}.get(type(value), type(value).__name__)


VERSION_RULE = "write three dot-separated numbers like 2.0.0"


def load_catalog(path: Path, settings: Settings) -> Catalog:
    """Read and validate the catalog at `path`; ConfigError lists every problem found."""
    path = Path(path)
    if not path.is_file():
        problem = "is not a file" if path.exists() else "not found"
        raise ConfigError([ConfigIssue(path, 0, "", f"catalog file {problem}; pass --catalog or set `catalog` "
                                                    "in broker.yaml")])
    try:
        document = load_marked(path)
    except YamlSyntaxError as exc:
        raise ConfigError([ConfigIssue(path, exc.line, "", exc.problem)]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue(path, 0, "", f"cannot read the catalog: {exc}")]) from None
    check = _Checker(path)
    if document is None:
        document = MarkedMap()
        document.line, document.key_lines = 1, {}
    root = check.mapping(document, 1, "")
    if root is None:
        raise ConfigError(check.issues)
    check.known_keys(root, "", {"packages_dir", "products", "packages", "batches"})
    packages_dir = _resolve_dir(path.parent / (check.text(root, "", "packages_dir") or "packages"))
    if not packages_dir.is_dir():
        check.add(root.line_of("packages_dir"), "packages_dir", f"{packages_dir} is not a folder; create it or fix the path")

    products = _read_products(check, root)
    packages = _read_packages(check, root, products, packages_dir, settings)
    batches = _read_batches(check, root, products, packages, settings)
    if check.issues:
        raise ConfigError(check.issues)
    return Catalog(path=path, packages_dir=packages_dir, products=products, packages=packages, batches=batches)


def _resolve_dir(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: not a folder, which the caller reports
        return path.absolute()


def _read_products(check: _Checker, root: MarkedMap) -> dict[str, Product]:
    products: dict[str, Product] = {}
    for line, key, item in check.items(root, "products", required=True):
        check.known_keys(item, key, {"key", "name", "secret", "modules", "devices", "description"})
        product_key = check.text(item, key, "key", required=True, pattern=PRODUCT_KEY_RE,
                                 rule="1-64 of A-Z a-z 0-9 _ -")
        if product_key in RESERVED_PRODUCT_KEYS:
            check.add(item.line_of("key"), _path(key, "key"),
                      f"{product_key!r} is reserved: its topics would overlap /{product_key}/...; choose another key")
            product_key = None
        name = check.text(item, key, "name", default=product_key) or ""
        secret = check.text(item, key, "secret")
        modules = {DEFAULT_MODULE: Module(DEFAULT_MODULE, "default module")}
        for mline, mkey, module in check.items(item, "modules"):
            mkey = f"{key}.{mkey}"
            check.known_keys(module, mkey, {"name", "alias", "description"})
            module_name = check.text(module, mkey, "name", required=True, pattern=MODULE_NAME_RE,
                                     rule="1-64 of A-Z a-z 0-9 . _ -")
            if module_name is None:
                continue
            if module_name in modules and module_name != DEFAULT_MODULE:
                check.add(mline, f"{mkey}.name", f"module {module_name!r} is listed twice")
            modules[module_name] = Module(module_name, check.text(module, mkey, "alias") or "",
                                          check.text(module, mkey, "description") or "")
        devices: dict[str, Device] = {}
        for dline, dkey, device in check.items(item, "devices"):
            dkey = f"{key}.{dkey}"
            check.known_keys(device, dkey, {"name", "secret", "tags", "description"})
            device_name = check.text(device, dkey, "name", required=True, pattern=DEVICE_NAME_RE,
                                     rule="1-64 of A-Z a-z 0-9 _ . : @ -")
            device_secret = check.text(device, dkey, "secret")
            tags = check.text_list(device, dkey, "tags") or []
            if device_name is None:
                continue
            if device_name in devices:
                check.add(dline, f"{dkey}.name", f"device {device_name!r} is listed twice in this product")
            if not device_secret and not secret:
                check.add(dline, dkey, f"device {device_name!r} has no secret and product has no `secret` to derive one from; add either")
            devices[device_name] = Device(device_name, device_secret, tuple(tag for _, tag in tags))
        if not devices and not secret:
            check.add(line, key, "a product needs `devices` or a `secret` (to derive device secrets)")
        if product_key is None:
            continue
        if product_key in products:
            check.add(item.line_of("key"), f"{key}.key", f"product {product_key!r} is defined twice")
        products[product_key] = Product(product_key, name, secret, modules, devices)
    return products


def _read_packages(check: _Checker, root: MarkedMap, products: dict[str, Product],
                   packages_dir: Path, settings: Settings) -> dict[str, Package]:
    packages: dict[str, Package] = {}
    lines: dict[str, tuple[int, str, MarkedMap]] = {}
    diff_lines: dict[str, list[int]] = {}
    allowed = {"id", "name", "product", "module", "version", "type", "file", "base_version", "sign_method",
               "verify", "description", "notice", "ext_data", "diff_from"}
    for line, key, item in check.items(root, "packages"):
        check.known_keys(item, key, allowed)
        package_id = check.text(item, key, "id", required=True, pattern=PACKAGE_ID_RE, rule="1-128 of A-Z a-z 0-9 . _ -")
        product_key = check.text(item, key, "product", required=True)
        module = check.text(item, key, "module", default=DEFAULT_MODULE) or DEFAULT_MODULE
        version = check.text(item, key, "version", required=True, pattern=_VERSION_PATTERN, rule=VERSION_RULE)
        kind = check.text(item, key, "type", default="full")
        if kind not in ("full", "diff"):
            check.add(item.line_of("type"), f"{key}.type", f"{kind!r} is not a package type; use full or diff")
        sign = check.text(item, key, "sign_method", default="MD5") or "MD5"
        if sign.lower() not in SIGN_METHODS:
            check.add(item.line_of("sign_method"), f"{key}.sign_method", f"{sign!r} is not supported; use SHA256 or MD5")
        product = products.get(product_key or "")
        if product_key and product is None:
            check.add(item.line_of("product"), f"{key}.product", f"unknown product {product_key!r}; define it under products")
        if product is not None and module not in product.modules:
            check.add(item.line_of("module"), f"{key}.module",
                      f"product {product.key!r} has no module {module!r}; add it under the product's modules")
        file_path = _check_package_file(check, item, key, packages_dir, settings)
        base_version = check.text(item, key, "base_version", pattern=_VERSION_PATTERN, rule=VERSION_RULE)
        if kind == "diff" and base_version is None and "base_version" not in item:
            check.add(line, f"{key}.base_version", "a diff package needs base_version (the version the patch applies to)")
        if kind == "full" and "base_version" in item:
            check.add(item.line_of("base_version"), f"{key}.base_version", "only diff packages have a base_version")
        diff_from_lines = check.text_list(item, key, "diff_from") or []
        diff_from = [v for _, v in diff_from_lines]
        if kind == "diff" and diff_from:
            check.add(item.line_of("diff_from"), f"{key}.diff_from", "only full packages can list diff_from")
        ext_data = item.get("ext_data") or {}
        if not isinstance(ext_data, dict):
            check.add(item.line_of("ext_data"), f"{key}.ext_data", "must be a mapping of text keys to values")
            ext_data = {}
        elif (problem := _json_problem(ext_data)) is not None:
            check.add(item.line_of("ext_data"), f"{key}.ext_data", problem)
            ext_data = {}
        notice = check.text(item, key, "notice")
        sent = {**ext_data, "_package_udi": json.dumps({"ota_notice": notice}, ensure_ascii=False)} if notice \
            else ext_data  # as otacore/protocol/offers.py puts them in a push
        extra = len(json.dumps(sent, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace"))
        if extra > MAX_EXT_BYTES:
            name = "ext_data" if ext_data else "notice"
            check.add(item.line_of(name), f"{key}.{name}", f"ext_data and notice take {extra} bytes in every "
                      f"upgrade message, more than {MAX_EXT_BYTES}: keep them small (devices size their receive "
                      "buffers by this bound)")
            notice, ext_data = None, {}
        if package_id is None or version is None or product_key is None or file_path is None:
            continue
        if package_id in packages:
            check.add(item.line_of("id"), f"{key}.id", f"package id {package_id!r} is used twice")
            continue
        packages[package_id] = Package(
            id=package_id, name=check.text(item, key, "name", default=package_id) or package_id,
            product=product_key, module=module, version=version, type=kind or "full", file=file_path,
            sign_method=SIGN_METHODS.get(sign.lower(), "MD5"), verify=check.flag(item, key, "verify", False),
            base_version=base_version, description=check.text(item, key, "description") or "",
            notice=notice, ext_data=dict(ext_data), diff_from=tuple(diff_from), line=line,
            file_line=item.line_of("file"))
        lines[package_id] = (line, key, item)
        diff_lines[package_id] = [dline for dline, _ in diff_from_lines]

    seen_full: dict[tuple[str, str, str], str] = {}
    for package in packages.values():
        line, key, item = lines[package.id]
        if package.type == "full":
            ident = (package.product, package.module, package.version)
            if ident in seen_full:
                check.add(item.line_of("version"), f"{key}.version",
                          f"{package.version} of module {package.module!r} already has full package {seen_full[ident]!r}")
            seen_full[ident] = package.id
    for package in packages.values():
        line, key, item = lines[package.id]
        if package.is_diff and package.base_version:
            if package.base_version == package.version:
                check.add(item.line_of("base_version"), f"{key}.base_version", "must differ from version")
            elif (package.product, package.module, package.base_version) not in seen_full:
                check.add(item.line_of("base_version"), f"{key}.base_version",
                          f"no full package of module {package.module!r} has version {package.base_version}; "
                          "add it so the server can state the patched image's size and hash")
        for index, old in enumerate(package.diff_from):
            where = f"{key}.diff_from[{index}]"
            old_line = diff_lines[package.id][index]
            if not is_version(old):
                check.add(old_line, where, f"{old!r} is not valid: {VERSION_RULE}")
            elif old == package.version:
                check.add(old_line, where, "a package cannot be a diff from its own version")
            elif (package.product, package.module, old) not in seen_full:
                check.add(old_line, where,
                          f"no full package of module {package.module!r} has version {old}; add it or drop {old}")
    return packages


def _check_package_file(check: _Checker, item: MarkedMap, key: str, packages_dir: Path,
                        settings: Settings) -> Path | None:
    name = check.text(item, key, "file", required=True)
    if name is None:
        return None
    line, where = item.line_of("file"), f"{key}.file"
    try:
        candidate = (packages_dir / name).resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop, before Python 3.13
        check.add(line, where, f"{packages_dir / name} is a symlink loop; point the link at the image file")
        return None
    if Path(name).is_absolute() or not candidate.is_relative_to(packages_dir):
        check.add(line, where, f"{name!r} leaves packages_dir; name a file inside {packages_dir}")
        return None
    if not any(name.lower().endswith(ending) for ending in settings.extensions):
        check.add(line, where, f"{name!r} has an ending that is not allowed; allowed: {' '.join(settings.extensions)}")
        return None
    problem = _file_problem(packages_dir / name, candidate, settings)
    if problem is not None:
        check.add(line, where, problem)
        return None
    return candidate


def _file_problem(named: Path, candidate: Path, settings: Settings) -> str | None:
    """What keeps `candidate` (`named` with its links resolved) from being served, or None."""
    try:
        stat = candidate.stat()
    except FileNotFoundError:
        if named.is_symlink():
            return f"{named} is a symlink to {candidate}, which does not exist; fix the link or copy the file"
        return f"{candidate} does not exist; copy the file into packages_dir"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{named} is a symlink loop; point the link at the image file"
        return f"{candidate} cannot be read ({exc.strerror}); make it a readable file"
    if stat_module.S_ISDIR(stat.st_mode):
        return f"{candidate} is a folder, not a file; name the image file itself"
    if not stat_module.S_ISREG(stat.st_mode):
        return f"{candidate} is not a regular file (a FIFO, socket or device); copy the real image there"
    if stat.st_size == 0:
        return f"{candidate} is empty; copy the real image into packages_dir"
    if stat.st_size > settings.max_file_bytes:
        return f"{stat.st_size} bytes is over limits.max_file_mb ({settings.max_file_mb} MB)"
    return _unreadable(candidate)


def _unreadable(path: Path) -> str | None:
    """Open it the way the server will (os.access() would ask about the real user id, and
    says yes to root for any file)."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
    except PermissionError:
        return f"{path} is not readable by the server's user; fix its permissions (chmod/chown)"
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror}); make it a readable file"
    return None


def _read_batches(check: _Checker, root: MarkedMap, products: dict[str, Product],
                  packages: dict[str, Package], settings: Settings) -> dict[str, Batch]:
    batches: dict[str, Batch] = {}
    allowed = {"name", "package", "type", "devices", "src_versions", "protocol", "mode", "push", "description",
               "timeout_minutes", *POLICY_KEYS}
    items = check.items(root, "batches")
    if len(items) > MAX_BATCHES:
        check.add(root.line_of("batches"), "batches", f"{len(items)} batches; at most {MAX_BATCHES}: remove "
                  "finished ones (their jobs and history stay in the database)")
        return batches
    for position, (line, key, item) in enumerate(items):
        check.known_keys(item, key, allowed)
        name = check.text(item, key, "name", required=True, pattern=BATCH_NAME_RE, rule="1-128 of A-Z a-z 0-9 . _ -")
        package_id = check.text(item, key, "package", required=True)
        package = packages.get(package_id or "")
        if package_id and package is None:
            check.add(item.line_of("package"), f"{key}.package", f"unknown package {package_id!r}; define it under packages")
        kind = check.text(item, key, "type", default="upgrade")
        if kind not in ("verify", "upgrade"):
            check.add(item.line_of("type"), f"{key}.type", f"{kind!r} is not a batch type; use verify or upgrade")
        protocol = check.text(item, key, "protocol", default="http")
        if protocol not in ("http", "https", "mqtt"):
            check.add(item.line_of("protocol"), f"{key}.protocol", f"{protocol!r} is not a protocol; use http, https or mqtt")
        elif protocol == "https" and not settings.tls_enabled:
            check.add(item.line_of("protocol"), f"{key}.protocol",
                      "https needs http.tls (certfile, keyfile) in broker.yaml; set it or use http")
        elif protocol == "http" and not settings.plain_http:
            check.add(item.line_of("protocol"), f"{key}.protocol",
                      "the file server speaks only HTTPS (http.tls without http.tls.bind); use https, "
                      "or give TLS its own http.tls.bind")
        mode = check.text(item, key, "mode", default="static")
        if mode not in ("static", "dynamic"):
            check.add(item.line_of("mode"), f"{key}.mode", f"{mode!r} is not a mode; use static or dynamic")
        push = check.flag(item, key, "push", True)
        timeout = item.get("timeout_minutes")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int) or
                                    not 1 <= timeout <= MAX_MINUTES):
            check.add(item.line_of("timeout_minutes"), f"{key}.timeout_minutes",
                      f"{shown(timeout)} is not valid: a whole number of minutes from 1 to {MAX_MINUTES:,} (a "
                      "year), or leave it out")
            timeout = None
        devices = check.text_list(item, key, "devices")
        if kind == "verify" and not devices:
            check.add(item.line_of("devices"), f"{key}.devices", "a verify batch must list the devices it tries the package on")
        product = products.get(package.product) if package else None
        for dline, device_name in devices or []:
            if product is not None and not product.has_device(device_name):
                check.add(dline, f"{key}.devices", f"device {device_name!r} does not belong to product {product.key!r}; "
                                                     "list it under the product's devices")
        if devices and len({d for _, d in devices}) != len(devices):
            check.add(item.line_of("devices"), f"{key}.devices", "lists a device twice")
        policy = read_policy(check, item, key)
        src_versions = check.text_list(item, key, "src_versions")
        for vline, version in src_versions or []:
            if not is_version(version):
                check.add(vline, f"{key}.src_versions", f"{version!r} is not valid: {VERSION_RULE}")
            elif package is not None and version == package.version:
                check.add(vline, f"{key}.src_versions", f"{version} is the package's own version")
        if package is not None and package.is_diff and src_versions and \
                any(v != package.base_version for _, v in src_versions):
            check.add(item.line_of("src_versions"), f"{key}.src_versions",
                      f"a diff package only applies to its base_version {package.base_version}")
        if name is None or package is None:
            continue
        if name in batches:
            check.add(item.line_of("name"), f"{key}.name", f"batch name {name!r} is used twice")
            continue
        batches[name] = Batch(
            name=name, package=package.id, type=kind or "upgrade", protocol=protocol or "http",
            mode=mode or "static", push=push,
            devices=tuple(d for _, d in devices) if devices else None,
            src_versions=tuple(v for _, v in src_versions) if src_versions else None,
            timeout_minutes=timeout, position=position, line=line, policy=policy)
    return batches
