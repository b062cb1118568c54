"""Client side of scripts/bench/anchors.py: a compact MQTT 3.1.1 client and the three
client roles the bench runs as separate processes.

    python anchor_lib.py idle      --port P --count N ...   connect N idle devices (a shard), sit
    python anchor_lib.py active    --port P --count 50 ...  version report -> push loop, print JSON
    python anchor_lib.py responder --port P --size B        paho: answer every report with a push

The client speaks just what the benchmark needs (CONNECT, SUBSCRIBE, PUBLISH QoS 0/1, PUBACK,
PINGREQ) on asyncio protocols, with TCP_NODELAY, so one process drives thousands of round
trips per second. The active role reports its own CPU use over the measured window so a
saturated client shows up in the results. Imports nothing from the server.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import resource
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

HOST = "127.0.0.1"  # loopback only, always

# ---------------------------------------------------------------------------- wire format


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack(">H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def encode_connect(client_id: str, username: str | None, password: str | None, keepalive: int) -> bytes:
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = _str("MQTT") + bytes([4, flags]) + struct.pack(">H", keepalive) + _str(client_id)
    if username is not None:
        body += _str(username)
    if password is not None:
        body += _str(password)
    return _packet(0x10, body)


def encode_subscribe(pid: int, topic: str, qos: int) -> bytes:
    return _packet(0x82, struct.pack(">H", pid) + _str(topic) + bytes([qos]))


def encode_publish(topic: str, payload: bytes, qos: int, pid: int = 0) -> bytes:
    head = _str(topic) + (struct.pack(">H", pid) if qos else b"")
    return _packet(0x30 | (qos << 1), head + payload)


def encode_puback(pid: int) -> bytes:
    return b"\x40\x02" + struct.pack(">H", pid)


PINGREQ = b"\xc0\x00"


class MqttError(Exception):
    pass


def _fixed_header(buf: bytearray, pos: int, end: int) -> tuple[int, int] | None:
    """(body start, body length) of the packet at `pos`, or None while its header is incomplete."""
    length, shift, i = 0, 0, pos + 1
    while i < end:
        byte = buf[i]
        i += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return i, length
        shift += 7
    return None


# ---------------------------------------------------------------------------- the client


class MqttClient(asyncio.Protocol):
    """One MQTT 3.1.1 connection. `on_message(topic, payload)` gets every PUBLISH (QoS 1 is
    acknowledged before the callback runs)."""

    def __init__(self, on_message: Callable[[str, bytes], None] | None) -> None:
        loop = asyncio.get_running_loop()
        self.on_message = on_message
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.connack: asyncio.Future[int] = loop.create_future()
        self.waiters: dict[int, asyncio.Future[int]] = {}
        self.pid = 0

    @classmethod
    async def open(cls, port: int, client_id: str, username: str | None = None, password: str | None = None,
                   keepalive: int = 600, on_message: Callable[[str, bytes], None] | None = None,
                   timeout: float = 60.0) -> MqttClient:
        """Connect and wait for CONNACK; MqttError if refused."""
        loop = asyncio.get_running_loop()
        _, client = await asyncio.wait_for(loop.create_connection(lambda: cls(on_message), HOST, port), timeout)
        client.transport.write(encode_connect(client_id, username, password, keepalive))
        code = await asyncio.wait_for(client.connack, timeout)
        if code != 0:
            client.close()
            raise MqttError(f"CONNACK return code {code}")
        return client

    # asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        error = MqttError(f"connection lost: {exc or 'closed by peer'}")
        for future in [self.connack, *self.waiters.values()]:
            if not future.done():
                future.set_exception(error)
        self.waiters.clear()

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        pos, end = 0, len(buf)
        while (header := _fixed_header(buf, pos, end)) is not None:
            start, length = header
            if start + length > end:
                break
            self._dispatch(buf[pos], bytes(buf[start:start + length]))
            pos = start + length
        if pos:
            del buf[:pos]

    def _dispatch(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == 3:
            (tlen,) = struct.unpack_from(">H", body)
            topic = body[2:2 + tlen].decode()
            rest = 2 + tlen
            if first & 0x06:
                (pid,) = struct.unpack_from(">H", body, rest)
                rest += 2
                self.transport.write(encode_puback(pid))
            if self.on_message is not None:
                self.on_message(topic, body[rest:])
        elif kind in (4, 9):  # PUBACK, SUBACK
            (pid,) = struct.unpack_from(">H", body)
            future = self.waiters.pop(pid, None)
            if future is not None and not future.done():
                future.set_result(body[2] if kind == 9 else 0)
        elif kind == 2 and not self.connack.done():
            self.connack.set_result(body[1])

    # requests ---------------------------------------------------------------------------
    def _next_pid(self) -> int:
        self.pid = self.pid % 65535 + 1
        return self.pid

    def _expect(self, pid: int) -> asyncio.Future[int]:
        future = asyncio.get_running_loop().create_future()
        self.waiters[pid] = future
        return future

    async def subscribe(self, topic: str, qos: int = 1) -> int:
        """The granted QoS (0x80: refused)."""
        pid = self._next_pid()
        future = self._expect(pid)
        self.transport.write(encode_subscribe(pid, topic, qos))
        return await future

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> asyncio.Future[int] | None:
        """Send now; for QoS 1 returns the future of its PUBACK."""
        if qos == 0:
            self.transport.write(encode_publish(topic, payload, 0))
            return None
        pid = self._next_pid()
        future = self._expect(pid)
        self.transport.write(encode_publish(topic, payload, 1, pid))
        return future

    def ping(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(PINGREQ)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"\xe0\x00")  # DISCONNECT
            self.transport.close()


# ---------------------------------------------------------------------------- devices


def device_password(product_secret: str, device_name: str) -> str:
    """The plain device secret the OTA server accepts: hex(HMAC-SHA256(productSecret, dn))."""
    return hmac.new(product_secret.encode(), device_name.encode(), hashlib.sha256).hexdigest()


async def open_device(port: int, pk: str, dn: str, product_secret: str, keepalive: int,
                      on_message: Callable[[str, bytes], None] | None = None) -> MqttClient:
    """Connect as device `dn` and subscribe to its upgrade topic at QoS 1."""
    client = await MqttClient.open(port, dn, f"{dn}&{pk}", device_password(product_secret, dn), keepalive,
                                   on_message)
    granted = await asyncio.wait_for(client.subscribe(f"/ota/device/upgrade/{pk}/{dn}", 1), 60)
    if granted >= 0x80:
        client.close()
        raise MqttError(f"SUBSCRIBE refused ({granted:#x})")
    return client


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
