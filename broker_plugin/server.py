"""`ota-server`: runs the amqtt broker with the OTA plugins from broker.yaml (docs/configuration.md),
or, with `cluster:` among the OTA plugin's keys, a worker on a RabbitMQ cluster (docs/cluster.md).

A thin wrapper: it reads broker.yaml, applies the command-line overrides, checks the OTA
settings and the catalog (a bad config, a data_dir in use or a damaged database is a one-line
exit), and starts amqtt's Broker. It stops on SIGINT/SIGTERM (exit status 0), or with status 1
when the OTA runtime finds its data_dir or database deleted or replaced under it.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from otacore.catalog.model import load_catalog
from otacore.config.broker_yaml import BrokerConfigFile, read_broker_config
from otacore.storage.data_dir import DataDirInUse
from otacore.errors import ConfigError, Refused
from otacore.config.settings import PLUGIN_PATH, Settings, split_host_port

log = logging.getLogger("ota.server")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ota-server", description="OTA server: amqtt broker + OTA plugin + HTTP file server, in one process. "
                                       "SIGHUP (or `otactl reload`) reloads the catalog.")
    parser.add_argument("--config", default="config/broker.yaml", help="broker.yaml (default: %(default)s)")
    parser.add_argument("--mqtt-bind", metavar="HOST:PORT", help="MQTT listener address (overrides listeners.default.bind)")
    parser.add_argument("--http-bind", metavar="HOST:PORT", help="file server address (overrides http.bind)")
    parser.add_argument("--public-url", metavar="URL", help="base of download URLs in pushes (overrides http.public_url)")
    parser.add_argument("--catalog", metavar="PATH", help="catalog file (overrides catalog)")
    parser.add_argument("--data-dir", metavar="DIR", help="SQLite, diffs and secrets folder (overrides data_dir)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def apply_overrides(config: BrokerConfigFile, args: argparse.Namespace) -> dict[str, Any]:
    """The amqtt config dict with flags applied and the OTA plugin's paths made absolute."""
    broker = config.broker_dict()
    options = config.plugin_options(broker)
    if args.mqtt_bind:
        split_host_port(args.mqtt_bind)
        listeners = broker.setdefault("listeners", {})
        listeners.setdefault("default", {"type": "tcp"})["bind"] = args.mqtt_bind
    http = dict(options.get("http") or {})
    if args.http_bind:
        split_host_port(args.http_bind)
        http["bind"] = args.http_bind
    if args.public_url:
        http["public_url"] = args.public_url
    if http:
        options["http"] = http
    if args.catalog:
        options["catalog"] = str(Path(args.catalog).resolve())
    if args.data_dir:
        options["data_dir"] = str(Path(args.data_dir).resolve())
    options["base_dir"] = str(config.path.parent)
    return broker


def busy_addresses(broker_config: dict[str, Any], settings: Any) -> list[str]:
    """Addresses we are about to listen on that something else holds already. Checked before
    anything starts, so a second server fails fast without touching the data_dir."""
    wanted = [str(listener["bind"]) for listener in (broker_config.get("listeners") or {}).values()
              if isinstance(listener, dict) and listener.get("bind") and listener.get("type", "tcp") == "tcp"]
    wanted.append(f"{settings.http_host}:{settings.http_port}")
    if settings.tls_port is not None:
        wanted.append(f"{settings.tls_host}:{settings.tls_port}")
    busy = []
    for address in wanted:
        host, port = split_host_port(address)
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's servers do
                probe.bind((host, port))
        except OSError:
            busy.append(address)
    return busy


async def serve(broker_config: dict[str, Any], settings: Settings) -> int:
    # Imported late so `--help` and config errors stay fast.
    from amqtt.errors import BrokerError, PluginError, PluginLoadError

    from .amqtt_patches import AmqttInternalsChanged
    from .assembly import build_broker

    try:
        broker, runtime = build_broker(broker_config, settings)  # the composition root
    except (PluginError, PluginLoadError, ValueError, TypeError, AmqttInternalsChanged) as exc:
        cause = exc.__cause__ or exc
        print(f"ota-server: cannot build the broker from its config: {cause}", file=sys.stderr)
        return 1
    if runtime is None:
        print(f"ota-server: {PLUGIN_PATH} is not in broker.yaml plugins; add it", file=sys.stderr)
        return 2
    runtime.log_startup_error = False  # we print it as our one line
    stop, ready = take_signals(runtime)
    broker_log = logging.getLogger("amqtt.broker")
    level = broker_log.level
    broker_log.setLevel(logging.CRITICAL)  # a listener that cannot bind: our one line, not its traceback
    try:
        await broker.start()
    except BrokerError as exc:
        await runtime.stop()
        if runtime.startup_error is None:
            print(f"ota-server: cannot start the MQTT listener: {exc.__cause__ or exc}", file=sys.stderr)
            return 1
    else:
        if runtime.startup_error is not None:
            await broker.shutdown()
    finally:
        broker_log.setLevel(level)
    if runtime.startup_error is not None:
        print(f"ota-server: {one_line(runtime.startup_error)}", file=sys.stderr)
        return 1
    for name, listener in broker.listeners_config.items():
        if "bind" in listener:
            log.info("MQTT listener %r on %s", name, listener["bind"])
    log.info("ready; admin token in %s (or admin.token in broker.yaml)", runtime.settings.data_dir / "admin-token")
    runtime.on_fatal = stop.set  # the runtime logged why
    if runtime.fatal_error is not None:
        stop.set()
    ready.set()
    await stop.wait()
    log.info("shutting down")
    await broker.shutdown()
    return 0 if runtime.fatal_error is None else 1


def take_signals(runtime: Any) -> tuple[asyncio.Event, asyncio.Event]:
    """(stop, ready): SIGINT/SIGTERM set `stop`; SIGHUP reloads the catalog once `ready` is set.
    Taken before any listener opens: a SIGHUP that arrives once a client can connect but before
    the server is ready must reload, not kill the process with its default action."""
    loop = asyncio.get_running_loop()
    stop, ready = asyncio.Event(), asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(_reload_when(ready, runtime)))
    return stop, ready


def one_line(error: BaseException) -> str:
    from otacore.storage.store import StoreError  # late, like the broker: it pulls in aiosqlite

    if isinstance(error, ConfigError):
        return error.one_line()
    if isinstance(error, (StoreError, DataDirInUse)):
        return str(error)  # says what to do already
    return f"{type(error).__name__}: {error}"


async def _reload_when(ready: asyncio.Event, runtime: Any) -> None:
    await ready.wait()
    try:
        loaded = await runtime.reload_catalog()
        log.info("SIGHUP: catalog reloaded (%d batches)", len(loaded.catalog.batches))
    except ConfigError as exc:
        log.error("SIGHUP: reload refused, nothing changed: %s", exc.one_line())
    except Refused as exc:
        log.error("SIGHUP: reload refused: %s", exc.message)
    except Exception:  # a signal handler's task has nobody else to report to
        log.exception("SIGHUP: reload failed")


def raise_open_files_limit() -> None:
    """Every device is a socket: take the hard limit of open files, not the soft default (often 1,024)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    except (ImportError, ValueError, OSError) as exc:
        log.warning("cannot raise the open-files limit (%s); it caps how many devices can connect", exc)
        return
    log.debug("open-files limit %d", soft)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.WARNING if args.log_level != "DEBUG" else logging.DEBUG)
    try:
        config = read_broker_config(Path(args.config))
        broker_config = apply_overrides(config, args)
        settings = config.settings(broker_config)
        load_catalog(settings.catalog_path, settings)
        if settings.cluster_mode:  # a worker on a RabbitMQ cluster: no MQTT listener of its own
            broker_config = {**broker_config, "listeners": {}}
        busy = busy_addresses(broker_config, settings)
        if busy:
            print(f"ota-server: {', '.join(busy)} already in use (another ota-server?); stop it or pass "
                  "--mqtt-bind/--http-bind", file=sys.stderr)
            return 1
    except ConfigError as exc:
        print(f"ota-server: {exc.one_line()}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"ota-server: {exc}", file=sys.stderr)
        return 2
    raise_open_files_limit()
    try:
        # asyncio's own loop, not uvloop: under uvloop aiohttp cannot sendfile and reads
        # package files through a thread pool instead (slower, and buffers in memory).
        if settings.cluster_mode:
            from cluster_worker.serve import serve_worker
            return asyncio.run(serve_worker(settings))
        return asyncio.run(serve(broker_config, settings))
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"ota-server: cannot listen: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
