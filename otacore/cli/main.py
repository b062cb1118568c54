"""`otactl`: validate the catalog, reload the running server, show upgrade progress, list
devices, add packages, back up and restore.

It reads the admin token (data_dir/admin-token or admin.token in broker.yaml) and never writes
one: only the server makes it, and puts it back if it is deleted while the server runs.

Exit status: 0 done, 1 any error (usage errors included), 2 only from `plan --exit-code`
when a reload would change something."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sqlite3
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, NoReturn

from otacore.catalog.model import Package, load_catalog
from otacore.catalog.loading import LoadedCatalog, prepare_catalog
from otacore.config.broker_yaml import load_settings
from otacore.storage.data_dir import NoAdminToken, database_path, read_admin_token, read_server_info
from otacore.errors import ConfigError, ConfigIssue
from otacore.log_hygiene import clean_field
from otacore.cli.package_add import PackageAddError, add_package
from otacore.downloads.package_files import HashCache
from otacore.cli.plan import plan_reload
from otacore.catalog.reload_rules import reload_issues
from otacore.config.settings import Settings
from otacore.views.status import batch_report, batch_summaries
from otacore.storage.store import Store, StoreError, database_error, load_state



class _Parser(argparse.ArgumentParser):
    """Usage errors exit 1 like any other error: 2 means only "would change" (plan --exit-code)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="otactl", description="Manage the OTA server: validate and reload the catalog, watch "
                     "progress, list devices, add packages, retry or cancel devices. Exit status: 0 done, 1 error, "
                     "2 only from plan --exit-code when a reload would change something.")
    parser.add_argument("--config", default="config/broker.yaml", help="broker.yaml (default: %(default)s)")
    parser.add_argument("--catalog", metavar="PATH", help="catalog file (overrides broker.yaml)")
    parser.add_argument("--data-dir", metavar="DIR", help="the server's data_dir (overrides broker.yaml)")
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser("validate", help="check the catalog; print every error, or a summary")
    validate.add_argument("--json", action="store_true", help="machine-readable output")
    commands.add_parser("reload", help="validate, then make the running server load the catalog")
    retry = commands.add_parser("retry", help="give failed devices of a running batch another job")
    retry.add_argument("batch")
    retry.add_argument("devices", nargs="*", help="only these devices (default: every failed one)")
    cancel = commands.add_parser("cancel", help="cancel devices' open jobs in a batch (it won't take them again)")
    cancel.add_argument("batch")
    cancel.add_argument("devices", nargs="+")
    for action, text in (("pause", "stop a batch's new jobs and pushes (jobs under way go on)"),
                         ("resume", "resume a paused or halted batch")):
        command = commands.add_parser(action, help=text)
        command.add_argument("batch")
    plan = commands.add_parser("plan", help="what a reload would do, against the running server's database; "
                                            "changes nothing")
    plan.add_argument("--exit-code", action="store_true", help="exit 2 when the reload would change something")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    prune = commands.add_parser("prune", help="remove the finished history of batches that left the catalog "
                                "and ended over DAYS ago (the running server does it)")
    prune.add_argument("--days", type=float, help="default: the server's retention_days")
    prune.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    status = commands.add_parser("status", help="progress per batch, or per device of one batch")
    status.add_argument("batch", nargs="?", help="show this batch's devices")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--removed", action="store_true", help="also batches that left the catalog (their "
                        "jobs and history stay in the database)")
    status.add_argument("--watch", type=float, metavar="SECONDS", help="redraw every SECONDS until Ctrl-C "
                        "(progress bars on a terminal, plain text otherwise)")
    devices = commands.add_parser("devices", help="devices the running server knows: versions, online, last "
                                                  "seen, latest job")
    devices.add_argument("--product", metavar="P")
    devices.add_argument("--module", metavar="M", help="devices that reported this module")
    devices.add_argument("--version", metavar="V", help="devices on this version (of --module, or of any module)")
    devices.add_argument("--state", metavar="STATE", help="devices whose latest job is in this state")
    online = devices.add_mutually_exclusive_group()
    online.add_argument("--online", dest="online", action="store_const", const=True, help="connected now")
    online.add_argument("--offline", dest="online", action="store_const", const=False, help="not connected")
    devices.add_argument("--json", action="store_true", help="machine-readable output")
    package = commands.add_parser("package", help="add a firmware image to the catalog")
    package_commands = package.add_subparsers(dest="package_command", required=True)
    add = package_commands.add_parser("add", help="copy FILE into packages_dir and add its package entry to the "
                                                  "catalog (comments and formatting kept)")
    add.add_argument("file", type=Path, metavar="FILE")
    add.add_argument("--product", required=True, metavar="P")
    add.add_argument("--version", required=True, metavar="V")
    add.add_argument("--module", metavar="M", help="default: the product's default module")
    add.add_argument("--id", metavar="ID", help="package id (default: PRODUCT-MODULE-VERSION)")
    add.add_argument("--sign-method", choices=("SHA256", "MD5"), default="SHA256",
                     help="hash devices check (default: %(default)s)")
    _add_backup_commands(commands)
    return parser


def cmd_validate(settings: Settings, as_json: bool = False) -> int:
    """Every catalog error, and every change the server's database would refuse on reload."""
    try:
        loaded = prepare_catalog(settings)
        database = database_path(settings.data_dir)
        if settings.cluster_postgres or database.exists():
            issues = asyncio.run(_reload_issues(loaded, settings))
            if issues:
                raise ConfigError(issues)
    except ConfigError as exc:
        _print_issues(exc.issues, as_json)
        print(f"{len(exc.issues)} error(s); nothing was loaded", file=sys.stderr)
        return 1
    catalog = loaded.catalog
    devices = sum(len(p.devices) for p in catalog.products.values())
    if as_json:
        print(json.dumps({"ok": True, "catalog": str(catalog.path), "products": len(catalog.products),
                          "devices": devices, "packages": len(catalog.packages), "batches": [
                              {"name": b.name, "type": b.type, "package": b.package,
                               "version": catalog.packages[b.package].version, "protocol": b.protocol,
                               "mode": b.mode, "push": b.push} for b in catalog.batches.values()]}, indent=2))
        return 0
    print(f"{catalog.path}: OK: {len(catalog.products)} products, {devices} listed devices, "
          f"{len(catalog.packages)} packages, {len(catalog.batches)} batches")
    for batch in catalog.batches.values():
        package = catalog.packages[batch.package]
        print(f"  batch {batch.name}: {batch.type} {package.id} ({package.version}) via {batch.protocol}, "
              f"{batch.mode}, push {'on' if batch.push else 'off'}")
    return 0


def _print_issues(issues: list[ConfigIssue], as_json: bool) -> None:
    """Catalog errors on stdout: a line each, or `{"ok": false, "errors": [...]}`."""
    if as_json:
        print(json.dumps({"ok": False, "errors": [
            {"file": str(issue.path), "line": issue.line, "key": issue.key, "message": issue.message,
             "text": str(issue)} for issue in issues]}, indent=2))
        return
    for issue in issues:
        print(issue)


async def _open_store(settings: Settings) -> Store:
    """The journal's reads: PostgreSQL when broker.yaml has cluster.postgres (the workers'
    shared journal), else the SQLite database in data_dir. StoreError when it cannot be used."""
    if settings.cluster_postgres:
        from otacore.storage.pg_store import PgStore
        return await PgStore.open(settings.cluster_postgres)
    return await Store.open(database_path(settings.data_dir))


async def _reload_issues(loaded: LoadedCatalog, settings: Settings) -> list[ConfigIssue]:
    try:
        store = await _open_store(settings)
    except StoreError as exc:
        from otacore.storage.postgres_backend import NoJournal
        if isinstance(exc, NoJournal):
            return []  # no worker has run yet: nothing to refuse
        raise
    try:
        return reload_issues(loaded.catalog, loaded.files, await store.batches())
    finally:
        await store.close()


def _running_server(settings: Settings) -> dict[str, Any]:
    info = read_server_info(settings.data_dir)
    if info is None:
        raise SystemExit(f"otactl: no running server uses {settings.data_dir}; start ota-server with the "
                         "same --config/--data-dir")
    return info


def _admin_request(settings: Settings, method: str, path: str,
                   body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    base = _running_server(settings)["http_url"]
    try:
        token = read_admin_token(settings.data_dir, settings.admin_token)
    except NoAdminToken as exc:
        raise SystemExit(f"otactl: {exc}") from None
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base}{path}", method=method, data=data, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    context = None
    if base.startswith("https://") and settings.tls_certfile is not None:
        # Our own server at a loopback address: trust exactly its certificate, whatever name it bears.
        context = ssl.create_default_context(cafile=settings.tls_certfile)
        context.check_hostname = False
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    try:
        with urllib.request.urlopen(request, timeout=120, context=context) as response:  # noqa: S310
            return response.status, _json_body(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, _json_body(exc.read() or b"{}")
    except urllib.error.URLError as exc:
        raise SystemExit(f"otactl: cannot reach the server at {base}: {exc.reason}") from None


def _json_body(raw: bytes) -> dict[str, Any]:
    """The server answers JSON objects; anything else (a proxy's page) becomes its message."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict):
        return body
    return {"message": f"unexpected answer: {clean_field(raw[:200].decode('utf-8', 'replace'), 200)}"}


def cmd_reload(settings: Settings) -> int:
    served = Path(_running_server(settings).get("catalog") or settings.catalog_path)
    if served != settings.catalog_path:
        print(f"the server reloads its own catalog {served}, not {settings.catalog_path}")
        settings = dataclasses.replace(settings, catalog_path=served)
    if cmd_validate(settings) != 0:
        return 1
    status, body = _admin_request(settings, "POST", "/admin/api/reload")
    if status != 200:
        for error in body.get("errors", [body.get("message", "reload failed")]):
            print(error)
        return 1
    print(f"reloaded: {body['products']} products, {body['packages']} packages, {body['batches']} batches")
    return 0


def cmd_prune(settings: Settings, days: float | None, dry_run: bool) -> int:
    body: dict[str, Any] = {"dry_run": dry_run}
    if days is not None:
        body["days"] = days
    status, reply = _admin_request(settings, "POST", "/admin/api/prune", body)
    if status != 200:
        print(f"otactl: {reply.get('message', 'prune failed')}", file=sys.stderr)
        return 1
    verb = "would remove" if dry_run else "removed"
    for batch, jobs in reply["batches"].items():
        print(f"{batch}: {verb} {jobs} job(s) and their history")
    print(f"{verb} {reply['jobs']} job(s) of batches removed from the catalog and ended over {reply['days']:g} "
          "day(s) ago; each device's latest job stays")
    return 0


def cmd_batch_action(settings: Settings, action: str, batch: str, devices: list[str]) -> int:
    body = {"devices": devices} if devices else None
    status, reply = _admin_request(settings, "POST", f"/admin/api/batches/{urllib.parse.quote(batch, safe='')}/"
                                                     f"{action}", body)
    if status != 200:
        print(f"otactl: {reply.get('message', f'{action} failed')}", file=sys.stderr)
        return 1
    count = reply["retried" if action == "retry" else "canceled"]
    print(f"{batch}: {count} job(s) {'retried' if action == 'retry' else 'canceled'}")
    return 0


def cmd_pause(settings: Settings, action: str, batch: str) -> int:
    status, reply = _admin_request(settings, "POST",
                                   f"/admin/api/batches/{urllib.parse.quote(batch, safe='')}/{action}")
    if status != 200:
        print(f"otactl: {reply.get('message', f'{action} failed')}", file=sys.stderr)
        return 1
    rollout = reply.get("rollout") or {}
    print(f"{batch}: {'paused' if action == 'pause' else 'resumed'}; now {_rollout_line(rollout)}")
    return 0


def cmd_plan(settings: Settings, exit_code: bool, as_json: bool) -> int:
    """A reload previewed against the database (read-only), as `validate` checks it first."""
    try:
        loaded = prepare_catalog(settings)
    except ConfigError as exc:
        _print_issues(exc.issues, as_json)
        print(f"{len(exc.issues)} error(s); a reload would change nothing", file=sys.stderr)
        return 1
    if settings.cluster_postgres:
        from otacore.storage.postgres_backend import load_all
        state = asyncio.run(load_all(settings.cluster_postgres))
    else:
        database = database_path(settings.data_dir)
        if not database.exists():
            raise SystemExit(f"otactl: no database at {database}; has the server run with this data_dir?")
        try:
            with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
                state = load_state(db)
        except sqlite3.Error as exc:
            raise SystemExit(f"otactl: {database_error(database, exc)}") from None
    issues = reload_issues(loaded.catalog, loaded.files, state.batches)
    if issues:
        _print_issues(issues, as_json)
        print(f"{len(issues)} error(s); the server would refuse this reload", file=sys.stderr)
        return 1
    lines = plan_reload(loaded.catalog, state, {k: v[0] for k, v in state.package_status.items()})
    if as_json:
        print(json.dumps([{"batch": line.batch, "action": line.action, "detail": line.detail,
                           "targets": line.targets} for line in lines], indent=2))
    else:
        for line in lines:
            print(line)
        if not any(line.changes for line in lines):
            print("a reload would change nothing")
    return 2 if exit_code and any(line.changes for line in lines) else 0


def _rollout_line(rollout: dict[str, Any]) -> str:
    text = rollout.get("state", "active")
    if rollout.get("reason"):
        text += f": {rollout['reason']}"
    if rollout.get("until"):
        text += f" (until {rollout['until']})"
    return text


async def _status(settings: Settings, batch: str | None, removed: bool = False) -> dict[str, Any]:
    db = database_path(settings.data_dir)
    if not settings.cluster_postgres and not db.exists():
        raise SystemExit(f"otactl: no database at {db}; has the server run with this data_dir?")
    try:
        catalog = load_catalog(settings.catalog_path, settings)
    except ConfigError:
        catalog = None  # still show what the database knows
    store = await _open_store(settings)
    try:
        hashes = HashCache(settings.data_dir / "file-hashes.json")  # as the server left it

        def sha_of(package: Package) -> str:
            return hashes.digest(package.file).sha256

        if batch is None:
            return {"batches": await batch_summaries(store, catalog, sha_of=sha_of, removed=removed)}
        report = await batch_report(store, catalog, batch, sha_of=sha_of)
        if report is None:
            raise SystemExit(f"otactl: no batch named {batch!r}; `otactl status` lists them")
        return report
    except sqlite3.Error as exc:  # e.g. a damaged page met while reading
        raise SystemExit(f"otactl: {database_error(db, exc)}") from None
    finally:
        await store.close()


def _table(rows: list[list[str]]) -> str:
    # Cells carry what devices sent (`desc`, versions): escaped, never terminal escapes or newlines.
    rows = [[clean_field(str(cell), 120) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _counts(summary: dict[str, Any]) -> str:
    parts = [f"{state} {n}" for state, n in summary["counts"].items()]
    if summary["waiting_report"]:
        parts.append(f"waiting_report {summary['waiting_report']}")
    return ", ".join(parts) or "no devices yet"


def cmd_status(settings: Settings, batch: str | None, as_json: bool, removed: bool = False) -> int:
    _print_status(asyncio.run(_status(settings, batch, removed)), batch, as_json)
    return 0


def _print_status(report: dict[str, Any], batch: str | None, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    if batch is None:
        rows = [["BATCH", "PACKAGE", "STATE", "DONE", "DEVICES"]]
        for s in report["batches"]:
            rows.append([s["name"], s["package"], s["state"], f"{s['done_percent']}%", _counts(s)])
        print(_table(rows))
        for s in report["batches"]:
            if "rollout" in s:
                print(clean_field(f"{s['name']}: {_rollout_line(s['rollout'])}", 300))
        return
    s = report["batch"]
    print(f"batch {s['name']}: {s['type']} {s['package']} via {s['protocol']}, {s['mode']}, "
          f"state {s['state']}, package {s['package_status']}; {s['done_percent']}% done "
          f"({s['succeeded_percent']}% succeeded) of {s['total']}")
    if "rollout" in s:
        rollout = s["rollout"]
        print(clean_field(f"rollout: {_rollout_line(rollout)}", 300))
        for wave in rollout.get("waves", []):
            print(f"  wave {wave['wave']} ({wave['percent']:g}%): {'open' if wave['open'] else 'closed'}, "
                  f"{wave['jobs']} job(s), {wave['succeeded']} succeeded, {wave['finished']} finished")
    rows = [["DEVICE", "STATE", "FROM", "TO", "PROGRESS", "SERVED", "UPDATED", "LAST MESSAGE"]]
    for d in report["devices"]:
        updated = time.strftime("%H:%M:%S", time.localtime(d["updated_at"])) if d.get("updated_at") else "-"
        message = d.get("message") or ""
        if d.get("code") is not None:
            message = f"[{d['code']}] {message}"
        rows.append([d["device"], d["state"], d.get("from", "-"), d.get("to", "-"), f"{d['progress']}%",
                     f"{d['served_percent']}%", updated, message])
    print(_table(rows))


def cmd_watch(settings: Settings, batch: str | None, as_json: bool, every: float, removed: bool = False) -> int:
    """On a terminal: progress bars per batch (rich), redrawn in place. Otherwise (a pipe, a
    file) the plain status each time, or with --json one JSON document per line. Ctrl-C: 0."""
    fetching, pending = [False], [False]

    def fetch() -> dict[str, Any]:
        fetching[0] = True
        try:
            return asyncio.run(_status(settings, batch, removed))
        finally:
            fetching[0] = False
            if pending[0]:
                raise KeyboardInterrupt

    def interrupted(*_: Any) -> None:
        # Not inside asyncio.run: interrupted while it closes its loop, the loop is left
        # open and its __del__ prints a traceback at exit. It ends once the fetch returns.
        if fetching[0] and not pending[0]:  # a second Ctrl-C does not wait
            pending[0] = True
            return
        raise KeyboardInterrupt

    # Our own SIGINT handler: asyncio.run replaces only Python's default one, and a Ctrl-C
    # landing while it swaps handlers in and out (once per redraw) could be lost.
    signal.signal(signal.SIGINT, interrupted)
    if sys.stdout.isatty() and not as_json:
        from otacore.cli.status_watch import watch_live  # rich is only needed here
        return watch_live(fetch, every, batch is not None)
    try:
        while True:
            report = fetch()
            if as_json:
                print(json.dumps(report))
            else:
                print(f"-- {time.strftime('%Y-%m-%d %H:%M:%S')}")
                _print_status(report, batch, False)
            sys.stdout.flush()
            time.sleep(max(every, 0.2))
    except KeyboardInterrupt:
        return 0


def cmd_devices(settings: Settings, args: argparse.Namespace) -> int:
    """Every matching device, paged through GET /admin/api/devices 500 at a time."""
    params = {name: value for name, value in (("product", args.product), ("module", args.module),
                                              ("version", args.version), ("state", args.state)) if value}
    if args.online is not None:
        params["online"] = "true" if args.online else "false"
    devices: dict[tuple[str, str], dict[str, Any]] = {}  # a device added meanwhile may shift a page
    offset = 0
    while True:
        query = urllib.parse.urlencode({**params, "offset": offset, "limit": 500})
        status, body = _admin_request(settings, "GET", f"/admin/api/devices?{query}")
        if status != 200:
            print(f"otactl: {body.get('message', f'the server answered {status}')}", file=sys.stderr)
            return 1
        for device in body["devices"]:
            devices[(device["product"], device["device"])] = device
        offset += len(body["devices"])
        if not body["devices"] or offset >= body["total"]:
            break
    listed = [devices[key] for key in sorted(devices)]
    if args.json:
        print(json.dumps({"total": len(listed), "devices": listed}, indent=2))
        return 0
    if not listed:
        print("no devices match" if params else "no devices yet: none reported a version or is listed in the "
                                                "catalog")
        return 0
    rows = [["DEVICE", "PRODUCT", "VERSIONS", "ONLINE", "LAST SEEN", "JOB"]]
    for d in listed:
        versions = d["versions"]
        shown = versions.get("default", "-") if set(versions) <= {"default"} else \
            " ".join(f"{module}={version}" for module, version in versions.items())
        seen = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["last_seen"])) if d["last_seen"] else "-"
        job = d["job"]
        text = "-"
        if job is not None:
            text = f"{job['batch']} {job['state']} {job['progress']}%"
            if job["code"] is not None:
                text += f" [{job['code']}] {job['message']}"
        rows.append([d["device"], d["product"], shown, "yes" if d["online"] else "no", seen, text])
    print(_table(rows))
    return 0


def shown_path(path: Any) -> str:
    """A file name for the terminal: control and bidi characters escaped, never cut."""
    return clean_field(str(path), limit=1 << 20)


def cmd_package_add(settings: Settings, args: argparse.Namespace) -> int:
    try:
        added = add_package(settings, args.file, args.product, args.version, module=args.module,
                            package_id=args.id, sign_method=args.sign_method)
    except PackageAddError as exc:
        print(f"otactl: {exc}; nothing was changed", file=sys.stderr)
        return 1
    source, copy = shown_path(args.file), shown_path(added.file)  # a name may hold newlines or escapes
    if added.copied:
        print(f"copied {source} to {copy} ({added.size} bytes)")
    else:
        print(f"{copy} is already this file ({added.size} bytes); not copied")
    print(f"added package {added.id} to {added.catalog}:{added.line}: product {added.product}, module "
          f"{added.module}, version {added.version}, sign_method {added.sign_method}")
    print(f"  md5 {added.md5}  sha256 {added.sha256}")
    print("next: `otactl plan` shows what a reload would do; `otactl reload` applies it")
    return 0


def _add_backup_commands(commands: Any) -> None:
    backup = commands.add_parser("backup", help="copy the live database, keys, catalog and packages into one "
                                                "archive (the server keeps running)")
    backup.add_argument("file", type=Path, metavar="FILE", help="archive to write (gzip'ed when it ends in .gz "
                        "or .tgz); mode 0600")
    restore = commands.add_parser("restore", help="put a backup's database, keys, catalog and packages in place "
                                                  "for a server that is not running")
    restore.add_argument("file", type=Path, metavar="FILE")
    restore.add_argument("--data-dir", dest="restore_data_dir", type=Path, metavar="DIR",
                         help="data_dir to restore into (default: --data-dir before the command, or broker.yaml's)")
    restore.add_argument("--catalog-dir", type=Path, metavar="DIR", help="put the catalog here under its own "
                         "name, packages in the packages_dir it names (default: the catalog path broker.yaml names)")
    restore.add_argument("--force", action="store_true", help="replace a database (kept aside) and files that "
                         "differ from the backup's")


_NOT_WITH_POSTGRES = ("otactl: {command} covers data_dir's SQLite database; this server's journal is in PostgreSQL "
                      "(cluster.postgres): back it up and restore it with pg_dump and pg_restore")


def cmd_backup(settings: Settings, args: argparse.Namespace) -> int:
    """`otactl backup FILE`: the catalog the running server serves, else the configured one."""
    from otacore.cli.backup import BackupError, create_backup
    if settings.cluster_postgres:
        print(_NOT_WITH_POSTGRES.format(command="backup"), file=sys.stderr)
        return 1
    info = read_server_info(settings.data_dir) or {}
    catalog = Path(info["catalog"]) if info.get("catalog") else None
    try:
        done = create_backup(settings, args.file, catalog)
    except BackupError as exc:
        print(f"otactl: {exc}", file=sys.stderr)
        return 1
    print(f"backed up {database_path(settings.data_dir)} (schema {done.schema_version}, {done.jobs} jobs), its keys, "
          f"{done.catalog} and {done.packages} package file(s) to {shown_path(done.path)} ({done.size} bytes, "
          f"{done.seconds:.1f} s)")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    """`otactl restore FILE`: broker.yaml is read only for the places not given."""
    from otacore.cli.backup import BackupError, restore_backup
    data_dir, catalog_path = args.restore_data_dir or args.data_dir, None
    if data_dir is None or args.catalog_dir is None:
        try:
            settings = load_settings(Path(args.config), catalog=args.catalog, data_dir=args.data_dir)
        except ConfigError as exc:
            print(f"otactl: {exc.one_line()} (or give restore both --data-dir and --catalog-dir)", file=sys.stderr)
            return 1
        if settings.cluster_postgres:
            print(_NOT_WITH_POSTGRES.format(command="restore"), file=sys.stderr)
            return 1
        data_dir = data_dir or settings.data_dir
        catalog_path = None if args.catalog_dir else settings.catalog_path
    try:
        done = restore_backup(args.file, Path(data_dir), catalog_dir=args.catalog_dir, catalog_path=catalog_path,
                              force=args.force)
    except BackupError as exc:
        print(f"otactl: {exc}", file=sys.stderr)
        return 1
    print(f"restored the backup of {done.created_at} (server {done.server_version}, schema {done.schema_version}): "
          f"database and keys into {done.data_dir}, catalog {done.catalog}, {done.packages} package file(s) in "
          f"{done.packages_dir}")
    for old in done.replaced:
        print(f"  the replaced database is kept as {old}")
    print(f"next: start ota-server with data_dir {done.data_dir} and catalog {done.catalog} (broker.yaml, or "
          "--data-dir and --catalog)")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `otactl status | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:  # exit codes stay 0, 1 and 2 (status --watch ends with 0 itself)
        print("otactl: interrupted", file=sys.stderr)
        return 1


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "restore":
        return cmd_restore(args)  # for a new machine: needs broker.yaml only for places not given
    try:
        settings = load_settings(Path(args.config), catalog=args.catalog, data_dir=args.data_dir)
    except ConfigError as exc:
        print(f"otactl: {exc.one_line()}", file=sys.stderr)
        return 1
    try:
        return _run(args, settings)
    except StoreError as exc:
        print(f"otactl: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "validate":
        return cmd_validate(settings, args.json)
    if args.command == "reload":
        return cmd_reload(settings)
    if args.command in ("retry", "cancel"):
        return cmd_batch_action(settings, args.command, args.batch, args.devices)
    if args.command in ("pause", "resume"):
        return cmd_pause(settings, args.command, args.batch)
    if args.command == "prune":
        return cmd_prune(settings, args.days, args.dry_run)
    if args.command == "plan":
        return cmd_plan(settings, args.exit_code, args.json)
    if args.command == "devices":
        return cmd_devices(settings, args)
    if args.command == "package":
        return cmd_package_add(settings, args)
    if args.command == "backup":
        return cmd_backup(settings, args)
    if args.watch:
        return cmd_watch(settings, args.batch, args.json, args.watch, args.removed)
    return cmd_status(settings, args.batch, args.json, args.removed)


if __name__ == "__main__":
    sys.exit(main())
