"""`ota-server` and `otactl` as a user runs them: the console scripts installed in this
venv, real processes on free 127.0.0.1 ports (devicekit.loopback starts and stops them)."""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from devicekit.loopback import ServerProcess, free_port, write_broker_yaml
from support.harness import OtaServer

BIN = Path(sys.executable).parent  # this venv's console scripts: ota-server, otactl


def otactl(config: Path, *args: str, prefix: Sequence[str] = (), timeout: float = 60) \
        -> subprocess.CompletedProcess[str]:
    """`otactl --config CONFIG ARGS...` (after `prefix`, e.g. setpriv), its output as text."""
    return subprocess.run([*prefix, str(BIN / "otactl"), "--config", str(config), *args], capture_output=True,
                          text=True, timeout=timeout)


def ota_server_exit(config: Path, *args: str, prefix: Sequence[str] = (), timeout: float = 60) \
        -> subprocess.CompletedProcess[str]:
    """`ota-server --config CONFIG ARGS...` run to its exit, for the starts it refuses."""
    return subprocess.run([*prefix, str(BIN / "ota-server"), "--config", str(config), *args], capture_output=True,
                          text=True, timeout=timeout)


def server_process(config: Path, *, prefix: Sequence[str] = (), **options: Any) -> ServerProcess:
    """The installed `ota-server` console script (after `prefix`, e.g. `unshare --user`) with
    `config`, waited for on the MQTT port the config binds; `options` as for ServerProcess
    (capture, extra_args, log). Not started yet."""
    bind = yaml.safe_load(config.read_text())["listeners"]["default"]["bind"]
    return ServerProcess(config, int(bind.rsplit(":", 1)[1]), command=[*prefix, str(BIN / "ota-server")], **options)


class LiveServer:
    """A real `ota-server` process on free 127.0.0.1 ports, configured by a broker.yaml it
    writes in `root` (catalog root/ota.yaml, which the test writes; data_dir root/var).
    `view` is an OtaServer on the same ports that is never started: what a `Device` connects
    to. `prefix` and `options` as for `server_process`."""

    def __init__(self, root: Path, *, prefix: Sequence[str] = (), **options: Any) -> None:
        self.root, self.var = root, root / "var"
        self.db = self.var / "ota.sqlite3"
        self.mqtt_port, self.http_port = free_port(), free_port()
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.config = write_broker_yaml(root, self.mqtt_port, self.http_port)
        self.process = server_process(self.config, prefix=prefix, **options)
        self.view = OtaServer(root, mqtt_port=self.mqtt_port, http_port=self.http_port)

    async def start(self) -> LiveServer:
        """Start it (again, after `kill`); returns once MQTT accepts."""
        await asyncio.to_thread(self.process.start)
        return self

    async def stop(self) -> str:
        """SIGTERM and wait; what it printed."""
        return await asyncio.to_thread(self.process.stop)

    async def kill(self) -> None:
        """SIGKILL: a crash."""
        await asyncio.to_thread(self.process.kill)

    async def otactl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`otactl` with this server's config."""
        return await asyncio.to_thread(otactl, self.config, *args)


@contextlib.contextmanager
def ordinary_user(tmp_path: Path, prefix: str) -> Iterator[tuple[list[str], Path]]:
    """(command prefix, folder) to run commands as an ordinary user: nothing and `tmp_path`
    for one. Root reads and writes anything: then the prefix is `setpriv` to `nobody`, and the
    folder a new one under /tmp named `prefix...` that nobody can reach, removed afterwards;
    the test is skipped where setpriv is missing."""
    if os.geteuid() != 0:
        yield [], tmp_path
        return
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot run otactl as an ordinary user")
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    root.chmod(0o755)
    try:
        yield ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"], root
    finally:
        shutil.rmtree(root)


LINKKIT_VERSION = "1.2.13"


def linkkit_python() -> Path:
    """A Python with Aliyun's linkkit SDK (it needs paho-mqtt < 2; the project uses 2.x): a venv
    of its own beside the project's, made once (.venv/linkkit-VERSION) and kept for later runs."""
    root = Path(__file__).resolve().parents[2]
    venv = root / ".venv" / f"linkkit-{LINKKIT_VERSION}"
    ready = venv / ".installed"
    if not ready.exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"aliyun-iot-linkkit=={LINKKIT_VERSION}",
                        "paho-mqtt<2"], check=True, capture_output=True)
        ready.touch()
    return venv / "bin" / "python"
