"""Client side of scripts/bench/anchors.py: the three client roles the bench runs as
separate processes.

    python anchor_lib.py idle      --port P --count N ...   connect N idle devices (a shard), sit
    python anchor_lib.py active    --port P --count 50 ...  version report -> push loop, print JSON
    python anchor_lib.py responder --port P --size B        paho: answer every report with a push

The devices are devicekit.mqtt_client's compact asyncio MQTT client (CONNECT, SUBSCRIBE,
PUBLISH QoS 0/1, PUBACK, PINGREQ, with TCP_NODELAY), so one process drives thousands of round
trips per second. The active role reports its own CPU use over the measured window so a
saturated client shows up in the results. Imports nothing from the server.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import socket
import sys
import time
from typing import Any

from devicekit.mqtt_client import HOST, MqttClient, MqttError, open_device


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# ---------------------------------------------------------------------------- role: idle


async def run_idle(args: argparse.Namespace) -> None:
    """Connect devices `shard`, `shard + shards`, ... below `count` (`concurrency` at a time) and
    sit until stdin closes. Prints {"ready": ...}, waits for a line on stdin (so several
    processes start together), connects, prints the result (rate, errors, own CPU)."""
    gate = asyncio.Semaphore(args.concurrency)
    clients: list[MqttClient] = []
    errors: dict[str, int] = {}

    async def one(i: int) -> None:
        async with gate:
            try:
                clients.append(await open_device(args.port, args.pk, f"{args.prefix}{i:06d}", args.product_secret,
                                                 args.keepalive))
            except (OSError, MqttError, asyncio.TimeoutError) as exc:
                errors[describe(exc)] = errors.get(describe(exc), 0) + 1

    print(json.dumps({"ready": True}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.readline)
    started, cpu_start = time.perf_counter(), cpu_seconds()
    await asyncio.gather(*(one(i) for i in range(args.shard, args.count, args.shards)))
    seconds = time.perf_counter() - started
    print(json.dumps({"connected": len(clients), "failed": sum(errors.values()), "seconds": seconds,
                      "errors": errors, "client_cpu_pct": 100 * (cpu_seconds() - cpu_start) / seconds}), flush=True)
    await sit(clients, args.keepalive)


async def sit(clients: list[MqttClient], keepalive: int) -> None:
    """Keep the connections (PINGREQ at half the keep-alive) until stdin reaches EOF."""
    loop = asyncio.get_running_loop()
    eof = loop.run_in_executor(None, sys.stdin.buffer.read)
    while not eof.done():
        await asyncio.wait([eof], timeout=keepalive / 2)
        for client in clients:
            client.ping()
    for client in clients:
        client.close()
    await asyncio.sleep(0.2)


# ---------------------------------------------------------------------------- role: active


class ActiveDevice:
    """Reports version 1.0.0 at QoS 1 and waits for the push, over and over."""

    def __init__(self, pk: str, dn: str) -> None:
        self.name = dn
        self.report_topic = f"/ota/device/inform/{pk}/{dn}"
        self.waiter: asyncio.Future[bytes] | None = None
        self.client: MqttClient | None = None
        self.last_push = b""
        self.stray = 0  # pushes that arrived while nobody waited (after a timeout)

    def on_message(self, topic: str, payload: bytes) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(payload)
        else:
            self.stray += 1

    async def loop(self, samples: list[tuple[float, float]], errors: dict[str, int], stop: asyncio.Event,
                   timeout: float) -> None:
        loop = asyncio.get_running_loop()
        n = 0
        while not stop.is_set():
            n += 1
            self.waiter = loop.create_future()
            started = time.perf_counter()
            ack = self.client.publish(self.report_topic, b'{"id":"%d","params":{"version":"1.0.0"}}' % n)
            try:
                self.last_push = await asyncio.wait_for(self.waiter, timeout)
                done = time.perf_counter()
                await asyncio.wait_for(ack, timeout)
            except (asyncio.TimeoutError, MqttError) as exc:
                errors[describe(exc)] = errors.get(describe(exc), 0) + 1
                if isinstance(exc, MqttError):
                    return
                continue
            samples.append((done, done - started))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_active(args: argparse.Namespace) -> None:
    """Connect `count` active devices, warm up, measure `seconds`; print JSON lines: window
    start, window end, results."""
    devices = [ActiveDevice(args.pk, f"{args.prefix}{i:04d}") for i in range(args.count)]
    for device in devices:
        device.client = await open_device(args.port, args.pk, device.name, args.product_secret, 60,
                                          device.on_message)
    samples: list[tuple[float, float]] = []
    errors: dict[str, int] = {}
    stop = asyncio.Event()
    tasks = [asyncio.create_task(d.loop(samples, errors, stop, args.timeout)) for d in devices]
    await asyncio.sleep(args.warmup)
    print(json.dumps({"window": "start"}), flush=True)  # the bench samples server CPU at these lines
    window_start, cpu_start = time.perf_counter(), cpu_seconds()
    await asyncio.sleep(args.seconds)
    window_end, cpu_end = time.perf_counter(), cpu_seconds()
    print(json.dumps({"window": "end"}), flush=True)
    stop.set()
    await asyncio.wait(tasks, timeout=args.timeout + 5)
    latencies = [lat for at, lat in samples if window_start <= at <= window_end]
    seconds = window_end - window_start
    print(json.dumps({
        "round_trips": len(latencies), "seconds": seconds, "per_second": len(latencies) / seconds,
        "p50_ms": percentile(latencies, 0.50) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000,
        "client_cpu_pct": 100 * (cpu_end - cpu_start) / seconds, "errors": errors,
        "stray_pushes": sum(d.stray for d in devices), "push_bytes": len(devices[0].last_push),
        "push_sample": devices[0].last_push.decode(errors="replace"),
    }), flush=True)
    for device in devices:
        device.client.close()
    await asyncio.sleep(0.2)


# ---------------------------------------------------------------------------- role: responder


def push_template(size: int) -> str:
    """A push-shaped JSON body of about `size` bytes, with `%s` where the report's id goes."""
    data = {"size": 1073741824, "version": "1.1.0", "url": "", "signMethod": "SHA256", "sign": "0" * 64}
    skeleton = json.dumps({"code": "1000", "data": data, "id": "%s", "message": "success"})
    pad = max(0, size - len(skeleton) - 4)
    data["url"] = "http://127.0.0.1:8080/files/fw/big.bin?" + "x" * max(0, pad - 38)
    return json.dumps({"code": "1000", "data": data, "id": "%s", "message": "success"})


def run_responder(args: argparse.Namespace) -> None:
    """One paho client: every report on /ota/device/inform/# gets a QoS 1 push back."""
    import paho.mqtt.client as mqtt

    template = push_template(args.size)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="anchor-responder",
                         protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(65535)
    client.max_queued_messages_set(0)

    def on_socket_open(cl: Any, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_connect(cl: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        cl.subscribe("/ota/device/inform/#", qos=1)

    def on_subscribe(cl: Any, userdata: Any, mid: Any, reasons: Any, properties: Any) -> None:
        print(json.dumps({"ready": True}), flush=True)

    def on_message(cl: Any, userdata: Any, msg: Any) -> None:
        _, _, _, _, pk, dn = msg.topic.split("/", 5)
        report_id = json.loads(msg.payload).get("id", "0")
        cl.publish(f"/ota/device/upgrade/{pk}/{dn}", template.replace("%s", str(report_id), 1), qos=1)

    client.on_socket_open, client.on_connect = on_socket_open, on_connect
    client.on_subscribe, client.on_message = on_subscribe, on_message
    client.connect(HOST, args.port, keepalive=600)
    client.loop_forever()


# ---------------------------------------------------------------------------- CLI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=["idle", "active", "responder"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pk", default="a1Anchor")
    parser.add_argument("--product-secret", default="anchor-secret")
    parser.add_argument("--prefix", default="dev-")
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--shard", type=int, default=0, help="idle: this process's share ...")
    parser.add_argument("--shards", type=int, default=1, help="idle: ... of this many processes")
    parser.add_argument("--concurrency", type=int, default=100, help="idle: connects in flight")
    parser.add_argument("--keepalive", type=int, default=600)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=10.0, help="active: per round trip")
    parser.add_argument("--size", type=int, default=400, help="responder: push bytes")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.role == "responder":
        run_responder(args)
    else:
        asyncio.run(run_idle(args) if args.role == "idle" else run_active(args))


if __name__ == "__main__":
    main()
