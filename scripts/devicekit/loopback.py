"""An `ota-server` process on free 127.0.0.1 ports, for the tests and the benchmarks: the
server the simulated devices talk to, run as its own process (it is not imported)."""
from __future__ import annotations

import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the repository: the server's working directory


def _port_slice() -> range:
    """The ports this process hands out: below the kernel's ephemeral range (a port in it can be
    taken by any client's outgoing connection between the pick and the server's bind), and,
    when pytest-xdist runs several test processes side by side, this process's own share."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as ports:
            ephemeral = int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    low = 10000 if ephemeral > 12000 else 1024
    workers = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1), 1)
    # A crashed test process's replacement is numbered on (gw3 of 3): it takes the slice of
    # the one it replaces, not ports in (or past) the ephemeral range.
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0) % workers
    share = (ephemeral - low) // workers
    return range(low + index * share, low + (index + 1) * share)


_PORTS = _port_slice()
_next_port = itertools.count(random.randrange(len(_PORTS)))  # where this process starts in its share


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A 127.0.0.1 port nothing is bound to (TCP, or UDP with SOCK_DGRAM), never one this
    process handed out lately: the caller binds it a moment later."""
    for _ in range(len(_PORTS)):
        port = _PORTS[next(_next_port) % len(_PORTS)]
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise OSError(f"no free 127.0.0.1 port in {_PORTS.start}-{_PORTS.stop - 1}")


def write_broker_yaml(root: Path, mqtt_port: int, http_port: int, max_file_mb: int | None = None,
                      max_connections: int = 50000) -> Path:
    """broker.yaml in `root` with the three OTA plugins, catalog `ota.yaml` and data_dir `var`."""
    limits = f"\n    limits: {{max_file_mb: {max_file_mb}}}" if max_file_mb else ""
    path = root / "broker.yaml"
    path.write_text(f"""
listeners:
  default: {{type: tcp, bind: 127.0.0.1:{mqtt_port}, max_connections: {max_connections}}}
plugins:
  broker_plugin.auth.DeviceAuthPlugin: {{}}
  broker_plugin.acl.DeviceTopicPlugin: {{}}
  broker_plugin.ota.OtaPlugin:
    catalog: ota.yaml
    data_dir: var
    http: {{bind: 127.0.0.1:{http_port}, public_url: http://127.0.0.1:{http_port}}}{limits}
""", encoding="utf-8")
    return path


class ServerProcess:
    """Runs `command` (default: ota-server) with `--config`; `start` returns once MQTT accepts."""

    def __init__(self, config: Path, mqtt_port: int, command: list[str] | None = None,
                 capture: bool = True, extra_args: tuple[str, ...] = (), log: Path | None = None) -> None:
        """`capture`: keep what it prints (read by `stop`); `log`: append it to this file instead."""
        self.config, self.mqtt_port = config, mqtt_port
        self.command = command or [sys.executable, "-m", "broker_plugin.server"]
        self.capture, self.extra_args, self.log = capture and log is None, extra_args, log
        self.process: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 30) -> None:
        output: Any = subprocess.PIPE if self.capture else None
        if self.log is not None:
            output = self.log.open("a", encoding="utf-8")
        self.process = subprocess.Popen([*self.command, "--config", str(self.config), *self.extra_args], cwd=ROOT,
                                        stdout=output, stderr=subprocess.STDOUT if output else None, text=True)
        if self.log is not None:
            output.close()  # the child holds its own copy
        deadline = time.time() + timeout
        while True:
            if self.process.poll() is not None or time.time() > deadline:
                printed = self.process.stdout.read() if self.capture and self.process.stdout else ""
                self.stop()
                raise RuntimeError(f"ota-server did not start: {printed}")
            try:
                socket.create_connection(("127.0.0.1", self.mqtt_port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to clean up."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        (self.config.parent / "var" / "server.json").unlink(missing_ok=True)

    def stop(self) -> str:
        """SIGTERM and wait; returns what it printed (when captured)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        output, _ = self.process.communicate(timeout=30)
        return output or ""
