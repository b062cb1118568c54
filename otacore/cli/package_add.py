"""`otactl package add`: copy a firmware image into the catalog's packages_dir and add its
package entry to the catalog file, leaving every other byte of the file as it was.

The catalog is read with ruamel.yaml in round-trip mode, which knows where each entry stands
and how the packages list is written (block or flow items, indentation, key order). The new
entry is rendered by ruamel in that style and inserted after the last package; the file is
not dumped whole, because a whole dump re-indents lists, rewraps long flow mappings and moves
the comments that follow the last item. The result is then checked with the server's own
catalog loader; on any error the catalog and packages_dir are put back as they were.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import secrets
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from otacore.catalog.model import DEFAULT_MODULE, MODULE_NAME_RE, PACKAGE_ID_RE, PRODUCT_KEY_RE, load_catalog
from otacore.errors import ConfigError
from otacore.downloads.package_files import hash_file
from otacore.config.settings import Settings
from otacore.catalog.versions import VERSION_PATTERN

# Where keys of a new entry go when the last entry does not show the order.
KEY_ORDER = ("id", "name", "product", "module", "version", "type", "file", "sign_method")

# The most a copied image's permission bits may be: the server only reads it (as its own user,
# the one otactl runs as to read the admin token). The copy keeps the source's bits within
# this, so it is never more open than the source nor executable or writable by others.
MAX_PACKAGE_MODE = 0o644

# What to do when writing into packages_dir fails, by errno.
_WRITE_HINTS = {
    errno.ENOSPC: "free some space there", errno.EDQUOT: "free some space there (disk quota)",
    errno.EACCES: "check that you may write there", errno.EPERM: "check that you may write there",
    errno.EROFS: "that file system is read-only", errno.ENAMETOOLONG: "give the image a shorter file name",
    errno.EFBIG: "that file system cannot hold a file this big",
}


class PackageAddError(Exception):
    """Nothing was changed; the message says what is wrong and what to do (one line)."""


@dataclass(frozen=True)
class AddedPackage:
    id: str
    product: str
    module: str
    version: str
    sign_method: str
    catalog: Path
    line: int  # where the entry starts in the catalog (1-based)
    file: Path  # in packages_dir
    copied: bool  # False: an identical file was there already
    size: int
    md5: str
    sha256: str


@dataclass(frozen=True)
class _Style:
    """How the catalog writes its package items: `{indent}-{gap}` and block or flow."""

    indent: str = "  "
    gap: str = " "
    flow: bool = False
    order: tuple[str, ...] = ()


def default_id(product: str, module: str, version: str) -> str:
    return f"{product}-{module}-{version}"


def add_package(settings: Settings, source: Path, product: str, version: str, module: str | None = None,
                package_id: str | None = None, sign_method: str = "SHA256") -> AddedPackage:
    """Copy `source` into packages_dir and add its entry to the catalog; PackageAddError (and
    nothing changed) when anything is wrong, including what the catalog loader refuses."""
    try:
        return _add_package(settings, source, product, version, module, package_id, sign_method)
    except OSError as exc:  # one no step below foresaw: still one line (what was changed is put back)
        where = f"{exc.filename}: " if exc.filename else ""
        raise PackageAddError(f"{where}{exc.strerror or exc}; check the paths and their permissions") from None


def _add_package(settings: Settings, source: Path, product: str, version: str, module: str | None,
                 package_id: str | None, sign_method: str) -> AddedPackage:
    module = module or DEFAULT_MODULE
    package_id = package_id or default_id(product, module, version)
    _check_names(product, module, version, package_id, sign_method)
    catalog_path = settings.catalog_path.resolve()  # a symlinked catalog: edit the file itself
    try:
        with open(catalog_path, encoding="utf-8", newline="") as handle:
            original = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise PackageAddError(f"cannot read the catalog {catalog_path} ({exc}); pass --catalog or check it") from None
    root = _parse(catalog_path, original)
    packages_dir = (catalog_path.parent / str(root.get("packages_dir") or "packages")).resolve()
    if not os.path.isdir(packages_dir):  # False for any error too (a folder we may not search)
        raise PackageAddError(f"packages_dir {packages_dir} is not a folder you can reach; create it, fix its "
                              f"permissions or fix packages_dir in {catalog_path}")
    existing = root.get("packages")
    if isinstance(existing, list) and any(isinstance(item, dict) and str(item.get("id")) == package_id
                                          for item in existing):
        raise PackageAddError(f"{catalog_path}: package id {package_id!r} is taken; pass another --id")
    source_mode = _check_source(source, settings)
    target = packages_dir / source.name
    copied, digest = _place(source, target, source_mode & MAX_PACKAGE_MODE)
    fields = {"id": package_id, "product": product, "version": version, "file": source.name,
              "sign_method": sign_method}
    if module != DEFAULT_MODULE:
        fields["module"] = module
    try:
        text, line = _with_entry(catalog_path, original, root, fields)
        _replace_text(catalog_path, original, text)
        try:
            _check_result(catalog_path, settings, package_id, fields, module)
        except BaseException:
            _replace_text(catalog_path, text, original)
            raise
    except BaseException:
        if copied:
            _remove_quietly(target)
        raise
    return AddedPackage(package_id, product, module, version, sign_method, catalog_path, line, target, copied,
                        *digest)


def _check_names(product: str, module: str, version: str, package_id: str, sign_method: str) -> None:
    checks = ((PRODUCT_KEY_RE, product, "--product", "1-64 of A-Z a-z 0-9 _ -"),
              (MODULE_NAME_RE, module, "--module", "1-64 of A-Z a-z 0-9 . _ -"),
              (VERSION_PATTERN, version, "--version", "three dot-separated numbers like 2.0.0"),
              (PACKAGE_ID_RE, package_id, "--id", "1-128 of A-Z a-z 0-9 . _ -"))
    for pattern, value, flag, rule in checks:
        if not pattern.match(value):
            raise PackageAddError(f"{flag} {value!r} is not valid: {rule}")
    if sign_method not in ("SHA256", "MD5"):
        raise PackageAddError(f"--sign-method {sign_method!r} is not supported; use SHA256 or MD5")


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.width = 4096  # one flow entry stays on one line
    yaml.version = (1, 1)  # the server reads YAML 1.1 (PyYAML): 'on', 'yes', '010' get quoted
    return yaml


def _parse(path: Path, text: str) -> CommentedMap:
    try:
        root = _yaml().load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise PackageAddError(f"{where}: invalid YAML: {exc.problem or exc}; fix it first (otactl validate)") from None
    except YAMLError as exc:
        raise PackageAddError(f"{path}: invalid YAML: {exc}; fix it first (otactl validate)") from None
    if not isinstance(root, CommentedMap):
        raise PackageAddError(f"{path}: the catalog is not a mapping of keys; fix it first (otactl validate)")
    return root


def _check_source(source: Path, settings: Settings) -> int:
    """The permission bits of the regular file `source` names (through symlinks), once it is
    known to be an image the server would serve; PackageAddError otherwise."""
    try:
        info = source.stat()
    except FileNotFoundError:
        problem = "is a symlink to a missing file" if source.is_symlink() else "does not exist"
        raise PackageAddError(f"{source} {problem}; name the firmware image to add") from None
    except OSError as exc:  # ENAMETOOLONG, ELOOP, EACCES on a folder on the way
        raise PackageAddError(f"cannot read {source} ({exc.strerror or exc}); check the path and its "
                              "permissions") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO, socket or device"
        raise PackageAddError(f"{source} is not a regular file ({kind}); name the firmware image to add")
    if not any(source.name.lower().endswith(ending) for ending in settings.extensions):
        raise PackageAddError(f"{source.name!r} has an ending the server does not serve; allowed: "
                              f"{' '.join(settings.extensions)} (limits.extensions in broker.yaml)")
    if info.st_size == 0:
        raise PackageAddError(f"{source} is empty; name the real image")
    if info.st_size > settings.max_file_bytes:
        raise PackageAddError(f"{source} has {info.st_size} bytes, over limits.max_file_mb ({settings.max_file_mb} MB)")
    return stat.S_IMODE(info.st_mode)


def _place(source: Path, target: Path, mode: int) -> tuple[bool, tuple[int, str, str]]:
    """Copy `source` to `target` with permission bits `mode`, unless the very same bytes are
    there: (copied, (size, md5, sha256) of the file in packages_dir). A different file there
    is refused."""
    if os.path.lexists(target):
        if not target.is_file():
            raise PackageAddError(f"{target} exists and is not a regular file; remove it or rename {source.name}")
        try:
            theirs, ours = hash_file(target), hash_file(source)
        except OSError as exc:
            raise PackageAddError(f"cannot compare {source} with {target} ({exc.strerror or exc}); check that "
                                  "both are readable") from None
        if theirs != ours:
            raise PackageAddError(f"{target} exists with other content than {source}; give the new image "
                                  "another file name (or remove the old file if no package uses it)")
        return False, (target.stat().st_size, *ours)
    try:
        # Non-blocking: a FIFO put in its place since the check gives no bytes (then the
        # loader's "is empty" puts everything back) instead of waiting for a writer forever.
        reader = os.fdopen(os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb")
    except OSError as exc:
        raise PackageAddError(f"cannot read {source} ({exc.strerror or exc}); check its permissions") from None
    temporary = _temporary_beside(target)
    try:
        with reader, _new_file(temporary, mode) as writer:
            shutil.copyfileobj(reader, writer, 1024 * 1024)
        os.link(temporary, target)  # never over a file that appeared meanwhile
    except FileExistsError:
        raise PackageAddError(f"{target} appeared while copying; run the command again") from None
    except OSError as exc:
        hint = _WRITE_HINTS.get(exc.errno, "check that folder")
        raise PackageAddError(f"cannot copy {source} into {target.parent} ({exc.strerror or exc}); {hint}") from None
    finally:
        _remove_quietly(temporary)
    return True, (target.stat().st_size, *hash_file(target))


def _temporary_beside(path: Path) -> Path:
    """A name for a file made next to `path` and then renamed or linked to it; short whatever
    `path`'s name (`.{name}.tmp` is over the 255-byte limit for a 250-byte name)."""
    return path.with_name(f".otactl-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _new_file(path: Path, mode: int) -> io.BufferedWriter:
    """A file made for us alone (0600 while the bytes go in), then given `mode` exactly: the
    umask neither widens nor narrows what _place decided."""
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(handle, mode)
        return os.fdopen(handle, "wb")
    except BaseException:
        os.close(handle)
        raise


def _remove_quietly(path: Path) -> None:
    """Clean-up that never raises over the error that made it necessary (the name may be
    the very one the file system refused)."""
    with contextlib.suppress(OSError):
        path.unlink()


def _with_entry(path: Path, text: str, root: CommentedMap, fields: dict[str, str]) -> tuple[str, int]:
    """The catalog text with the new entry after the last package, and the entry's line."""
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if "\r\n" in text else "\n"
    packages = root.get("packages")
    if isinstance(packages, CommentedSeq) and (packages.fa.flow_style() or not packages):  # [...] or []
        raise PackageAddError(f"{path}:{root.lc.key('packages')[0] + 1}: packages is written as a flow list "
                              "([...]); write it as a block list (- id: ...) and try again")
    if packages is not None and not isinstance(packages, CommentedSeq):
        raise PackageAddError(f"{path}:{root.lc.key('packages')[0] + 1}: packages must be a list; fix it first "
                              "(otactl validate)")
    if packages:
        style = _style_of(lines, packages, root)
        at = _after_last_item(lines, root, "packages")
        entry = _render(fields, style)
    else:
        style = _Style()
        entry = _render(fields, style)
        if "packages" in root:  # `packages:` with nothing under it
            at = root.lc.key("packages")[0] + 1
        else:  # a new section, before `batches:` and the comment lines right above it
            at = root.lc.key("batches")[0] if "batches" in root else len(lines)
            while at > 0 and lines[at - 1].lstrip().startswith("#"):
                at -= 1
            entry = ["packages:"] + entry
    if at == len(lines) and lines and not lines[-1].endswith(("\n", "\r")):
        lines[-1] += newline  # a last line without its newline
    lines[at:at] = [line + newline for line in entry]
    return "".join(lines), at + 1 + (entry[0] == "packages:")


def _style_of(lines: list[str], packages: CommentedSeq, root: CommentedMap) -> _Style:
    last = packages[-1]
    row, column = packages.lc.item(len(packages) - 1)
    dash = re.fullmatch(r"( *)-( +)", lines[row][:column]) if row < len(lines) else None
    indent, gap = (dash.group(1), dash.group(2)) if dash else (" " * (root.lc.key("packages")[1] + 2), " ")
    if isinstance(last, CommentedMap):
        return _Style(indent, gap, bool(last.fa.flow_style()), tuple(str(key) for key in last))
    return _Style(indent, gap)


def _after_last_item(lines: list[str], root: CommentedMap, key: str) -> int:
    """The index of the line after the last content line of `key`'s value: comments and
    blank lines before the next key belong to what follows."""
    start = root.lc.key(key)[0]
    following = [root.lc.key(other)[0] for other in root if root.lc.key(other)[0] > start]
    end = min(following) if following else len(lines)
    while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
        end -= 1
    return end


def _render(fields: dict[str, str], style: _Style) -> list[str]:
    entry = CommentedMap((key, fields[key]) for key in _ordered(fields, style.order))
    if style.flow:
        entry.fa.set_flow_style()
    buffer = io.StringIO()
    _yaml().dump(entry, buffer)
    # Without the `%YAML 1.1` directive and the `---` that follows it (alone on its line, or
    # before a flow mapping).
    body = re.sub(r"\A%YAML[^\n]*\n---[ \n]", "", buffer.getvalue()).splitlines()
    if style.flow:
        return [f"{style.indent}-{style.gap}{' '.join(body)}"]
    pad = style.indent + " " * (1 + len(style.gap))
    return [f"{style.indent}-{style.gap}{body[0]}"] + [pad + line for line in body[1:]]


def _ordered(fields: dict[str, Any], template: tuple[str, ...]) -> list[str]:
    """Our keys in the order the last entry uses; a key it lacks goes after its usual predecessor."""
    def rank(key: str) -> tuple[float, int]:
        if key in template:
            return template.index(key), KEY_ORDER.index(key)
        before = [template.index(k) for k in KEY_ORDER[:KEY_ORDER.index(key)] if k in template]
        return (max(before) if before else -1) + 0.5, KEY_ORDER.index(key)

    return sorted(fields, key=rank)


def _replace_text(path: Path, expected: str, text: str) -> None:
    """Write `text` over the catalog, if it still holds `expected` (nobody edited it meanwhile)."""
    with open(path, encoding="utf-8", newline="") as handle:
        if handle.read() != expected:
            raise PackageAddError(f"{path} changed while the package was being added; run the command again")
    temporary = _temporary_beside(path)
    try:
        with open(temporary, "x", encoding="utf-8", newline="") as handle:
            handle.write(text)
        shutil.copymode(path, temporary)
        os.replace(temporary, path)
    except OSError as exc:
        _remove_quietly(temporary)
        raise PackageAddError(f"cannot write {path} ({exc.strerror or exc}); check that it and its folder are "
                              "writable") from None


def _check_result(path: Path, settings: Settings, package_id: str, fields: dict[str, str], module: str) -> None:
    """The server's own loader must accept the new catalog and read the entry back as added."""
    try:
        catalog = load_catalog(path, settings)
    except ConfigError as exc:
        raise PackageAddError(f"refused: {exc.one_line()}") from None
    package = catalog.packages.get(package_id)
    if package is None or (package.product, package.module, package.version, package.file.name,
                           package.sign_method) != (fields["product"], module, fields["version"], fields["file"],
                                                    fields["sign_method"]):
        raise PackageAddError(f"{path}: the entry did not read back as written; add package {package_id} by hand")
