"""Benchmark: firmware/get round trips per second while the broker holds many filters.

Starts `ota-server` as its own process on free 127.0.0.1 ports. One idle device holds N
subscription filters (all in its own namespace); one device sends thing.ota.firmware.get
and waits for each get_reply, sequentially, for a few seconds. Runs with replies sent
straight to the device's session (the product) and, for comparison, through amqtt's
`broadcast_message` (scripts/bench/broadcast_plugin.py), which walks every filter.

    .venv/bin/python scripts/bench/reply_path.py --filters 0 2000 10000
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt

from devicekit.loopback import ServerProcess, free_port, write_broker_yaml
from devicekit.signing import derive_device_secret

PK, PRODUCT_SECRET = "a1Reply", "reply-secret"


def start_server(root: Path, broadcast: bool) -> tuple[ServerProcess, int]:
    (root / "packages").mkdir()
    (root / "ota.yaml").write_text(f"packages_dir: packages\nproducts:\n  - {{key: {PK}, secret: {PRODUCT_SECRET}}}\n")
    mqtt_port = free_port()
    config = write_broker_yaml(root, mqtt_port, free_port())
    launcher = [str(Path(__file__).with_name("broadcast_plugin.py"))] if broadcast else ["-m", "broker_plugin.server"]
    server = ServerProcess(config, mqtt_port, command=[sys.executable, *launcher], capture=False,
                           extra_args=("--log-level", "WARNING"))
    server.start()
    return server, mqtt_port


def client(port: int, name: str) -> aiomqtt.Client:
    # TCP_NODELAY: paho leaves Nagle on, which adds ~40 ms to each small request/reply turn.
    return aiomqtt.Client("127.0.0.1", port, identifier=name, username=f"{name}&{PK}",
                          password=derive_device_secret(PRODUCT_SECRET, name),
                          socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])


async def measure(port: int, filters: int, seconds: float) -> float:
    async with client(port, "idle") as idle, client(port, "asker") as asker:
        for start in range(0, filters, 100):  # SUBSCRIBE carries up to 100 filters per packet here
            await idle.subscribe([(f"/{PK}/idle/f{i}", 0) for i in range(start, min(filters, start + 100))])
        reply_topic = f"/sys/{PK}/asker/thing/ota/firmware/get_reply"
        await asker.subscribe(reply_topic, qos=0)
        ask_topic = f"/sys/{PK}/asker/thing/ota/firmware/get"
        messages = asker.messages
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            await asker.publish(ask_topic, json.dumps({"id": str(count), "version": "1.0", "params": {}}), qos=0)
            await anext(messages)
            count += 1
        return count / (time.perf_counter() - started)


async def run(args: argparse.Namespace) -> None:
    rows = [("filters", "direct to session", "broadcast_message")]
    for filters in args.filters:
        rates = []
        for broadcast in (False, True):
            with tempfile.TemporaryDirectory(prefix="ota-reply-") as tmp:
                server, port = start_server(Path(tmp), broadcast)
                try:
                    rates.append(await measure(port, filters, args.seconds))
                finally:
                    server.stop()
        rows.append((str(filters), f"{rates[0]:.0f} /s", f"{rates[1]:.0f} /s"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--filters", type=int, nargs="+", default=[0, 2000, 10000])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
