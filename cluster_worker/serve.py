"""`ota-server` in cluster mode: the worker runtime until SIGINT/SIGTERM, SIGHUP reloading the
catalog, exit status 1 when the data_dir is lost under it (as the embedded server)."""
from __future__ import annotations

import logging
import sys

from broker_plugin.server import one_line, take_signals
from otacore import log_hygiene
from otacore.config.settings import Settings

from .runtime import WorkerRuntime
from .worker import node_name

log = logging.getLogger("ota.server")


async def serve_worker(settings: Settings) -> int:
    # What devices put in the log, bounded and inert, as the embedded server's composition
    # root does before its broker starts (broker_plugin/assembly.py).
    log_hygiene.install(settings.log_field_max)
    log_hygiene.limit_floods()
    runtime = WorkerRuntime(settings)
    stop, ready = take_signals(runtime)
    try:
        await runtime.start()
    except Exception as exc:  # a damaged database, a data_dir in use, a port taken: one line
        await runtime.stop()
        print(f"ota-server: {one_line(exc)}", file=sys.stderr)
        return 1
    runtime.on_fatal = stop.set  # the runtime logged why
    if runtime.fatal_error is not None:
        stop.set()
    log.info("ready (cluster worker on %s); admin token in %s (or admin.token in broker.yaml)",
             ", ".join(node_name(url) for url in settings.cluster_amqp), settings.data_dir / "admin-token")
    ready.set()
    await stop.wait()
    log.info("shutting down")
    await runtime.stop()
    return 0 if runtime.fatal_error is None else 1
