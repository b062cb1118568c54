"""Hostile clients against an OTA server on the loopback: what one network peer can try.

N clients run at once for a duration; each loops, picking one attack at random each time:

  MQTT, no credentials needed
    refused_connect    CONNECTs the broker must refuse (protocol level 5, wrong password;
                       with --squat a valid login on another device's client id), then a
                       TCP reset (SO_LINGER 0) instead of a DISCONNECT
    idle_mqtt          sockets that send nothing, held open
    half_connect       half a CONNECT (or one announcing more bytes than it sends), held open
    connect_cycle      connect/close cycles (bare TCP, and logins closed without DISCONNECT)
    huge_connect       CONNECTs with a 64 KiB client id and a 64 KiB username
    bad_will           a will of QoS 3, wills on OTA topics (a forged retained upgrade push,
                       a progress report, a get_reply) and on another device's topic
  MQTT, with the credentials of the client's own device (--device)
    publish_flood      PUBLISH floods on its OTA topics: malformed JSON, deep nesting,
                       huge payloads (up to --max-payload-mb)
    evil_progress      progress reports whose desc holds newlines, ANSI escapes, fake log lines
    retained_big       retained publishes of 1 MB on its own topics and a retained fake
                       upgrade push on its upgrade topic; then checks what comes back
    subscribe_1000     1,000 SUBSCRIBE filters (one packet, or 1,000 packets), some outside
                       its namespace
    session_churn      clean_session=0 with a new client id on every connect, then a reset
    block_hog          MQTT block requests of 128 KiB at QoS 0 (for a real stream: the device
                       reports --version to be pushed one) on a socket never read (reading
                       paused, 4 KiB receive buffer); `timeout` = the server kept it open
  MQTT, one device's secret on many machines (--clones N --clone NAME, besides --clients)
    cloned_credential  N connections logged in at once with that one secret, each its own
                       client id, held as long as the server keeps them and reconnecting
                       --clone-retry s after it closes one (a leaked secret, a cloned image)
  HTTP, no credentials needed (a signed URL the device was pushed is used when known)
    slowloris          request headers trickled a byte at a time, never finished
    http_idle          sockets that send nothing, held open
    http_bad_auth      non-ASCII / non-UTF-8 Authorization headers (Bearer and Basic)
    http_bad_range     garbage Range, If-Range and offset/length on /files/
    http_path_tricks   dot segments, encoded slashes, NULs and over-long names in /files/
    http_huge_headers  a 1 MB header, 5,000 headers, a 100 KB request line

Per attack kind it prints how many were done and how the server answered:

  accepted     the server took it (CONNACK 0, SUBACK granted, HTTP 2xx/3xx, the connection
               still answers a PINGREQ after a flood)
  refused      a protocol refusal (CONNACK != 0, SUBACK 0x80, HTTP 4xx)
  closed       the server closed or reset the connection
  timeout      no answer within the wait (for held sockets: still open when we let go)
  error        an error answer (HTTP 5xx) or something no correct server sends
  unreachable  could not connect at all (the server is down or not accepting)

and `notes`: things that look like server misbehaviour (a forged push delivered, a file
leaked through a path trick, a 5xx, ...), and the CONNACKs of squats. A refused CONNECT
reset before its answer counts as `closed`. At the end it checks that both listeners still
answer (`server_alive`; exit status 2 if not). Only 127.0.0.1 or ::1 are ever contacted;
the tool uses the standard library only and imports nothing from the server.

    .venv/bin/python scripts/hostile_clients.py --mqtt-port 1883 --http-port 8080 \\
        --clients 20 --duration 30 --device evil-0001 --product a1DemoCam \\
        --product-secret demo-product-secret
    # only the floods, with PUBLISHes of up to 200 MB (amqtt reads each one whole):
    .venv/bin/python scripts/hostile_clients.py --mqtt-port 1883 --http-port 8080 \\
        --clients 4 --duration 20 --device evil-0001 --attacks publish_flood --max-payload-mb 200
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import random
import signal
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from devicekit import mqtt_wire
from devicekit.signing import derive_device_secret, now_ms, signed_login

LOOPBACK = ("127.0.0.1", "::1")
OUTCOMES = ("accepted", "refused", "closed", "timeout", "error", "unreachable")
MQTT_ATTACKS_ANON = ("refused_connect", "idle_mqtt", "half_connect", "connect_cycle", "huge_connect", "bad_will")
MQTT_ATTACKS_DEVICE = ("publish_flood", "evil_progress", "retained_big", "subscribe_1000", "session_churn",
                       "block_hog")
HTTP_ATTACKS = ("slowloris", "http_idle", "http_bad_auth", "http_bad_range", "http_path_tricks",
                "http_huge_headers")
ALL_ATTACKS = MQTT_ATTACKS_ANON + MQTT_ATTACKS_DEVICE + HTTP_ATTACKS
IO_TIMEOUT = 5.0  # a connect or an answer that takes longer counts as `timeout`
MAX_NOTES = 20  # distinct notes kept per attack kind


# --------------------------------------------------------------------- bookkeeping


class Unreachable(Exception):
    """The connect itself failed: the server is down or not accepting."""


class ConnectTimeout(Exception):
    pass


@dataclass
class KindStats:
    done: int = 0
    outcomes: Counter = field(default_factory=Counter)
    http_status: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    seconds_to_close: list[float] = field(default_factory=list)  # held sockets the server closed

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"done": self.done, **{o: self.outcomes.get(o, 0) for o in OUTCOMES}}
        if self.http_status:
            out["http_status"] = {str(k): v for k, v in sorted(self.http_status.items(), key=lambda kv: str(kv[0]))}
        if self.seconds_to_close:
            closes = sorted(self.seconds_to_close)
            out["closed_after_s"] = {"min": round(closes[0], 2), "median": round(closes[len(closes) // 2], 2),
                                     "max": round(closes[-1], 2)}
        if self.notes:
            out["notes"] = dict(self.notes.most_common())
        return out


class Report:
    def __init__(self) -> None:
        self.kinds: dict[str, KindStats] = {}
        self.started = time.monotonic()

    def stats(self, kind: str) -> KindStats:
        return self.kinds.setdefault(kind, KindStats())

    def record(self, kind: str, outcome: str) -> None:
        stats = self.stats(kind)
        stats.done += 1
        stats.outcomes[outcome] += 1

    def note(self, kind: str, text: str) -> None:
        notes = self.stats(kind).notes
        if text in notes or len(notes) < MAX_NOTES:
            notes[text] += 1

    def totals(self) -> dict[str, int]:
        total: Counter = Counter()
        for stats in self.kinds.values():
            total["done"] += stats.done
            total.update(stats.outcomes)
        return {k: total.get(k, 0) for k in ("done", *OUTCOMES)}


@dataclass
class Identity:
    """A device's login: name, product key and secret (the catalog's, or derived)."""

    name: str
    product_key: str
    secret: str
    push: dict[str, Any] | None = None  # the last upgrade push its connections saw

    @property
    def username(self) -> str:
        return f"{self.name}&{self.product_key}"

    def signed_login(self) -> tuple[str, str]:
        """(client id, password) of the Aliyun signed form, with a fresh timestamp."""
        return signed_login(self.secret, self.name, self.product_key, now_ms() + random.randrange(1000))

    def topic(self, kind: str) -> str:
        pk, dn = self.product_key, self.name
        return {"inform": f"/ota/device/inform/{pk}/{dn}", "progress": f"/ota/device/progress/{pk}/{dn}",
                "upgrade": f"/ota/device/upgrade/{pk}/{dn}",
                "get": f"/sys/{pk}/{dn}/thing/ota/firmware/get",
                "get_reply": f"/sys/{pk}/{dn}/thing/ota/firmware/get_reply",
                "download": f"/sys/{pk}/{dn}/thing/file/download",
                "download_reply": f"/sys/{pk}/{dn}/thing/file/download_reply"}[kind]


# ------------------------------------------------------------------------- clients


class Siege:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.host: str = args.host
        self.report = Report()
        self.stop = asyncio.Event()
        self.deadline = time.monotonic() + args.duration
        self.identities = [Identity(name, args.product, args.secret or derive_device_secret(args.product_secret, name))
                           for name in args.device]
        self.victims: list[str] = args.impersonate
        self.squat: list[str] = args.squat
        enabled = set(args.attacks)
        self.anon_attacks = [a for a in ALL_ATTACKS if a in enabled and a not in MQTT_ATTACKS_DEVICE]
        self.device_attacks = [a for a in ALL_ATTACKS if a in enabled]
        self.payload_max = int(args.max_payload_mb * 1024 * 1024)
        self.held_clones = self.most_clones = 0  # --clones: logged-in connections held now, and at most

    # -- plumbing

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def hold_time(self) -> float:
        return min(self.args.hold, self.remaining())

    async def open(self, port: int, *, rcvbuf: int | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(IO_TIMEOUT):
                return await mqtt_wire.open_raw(port, host=self.host, rcvbuf=rcvbuf, nodelay=True, limit=2 ** 22)
        except TimeoutError:
            raise ConnectTimeout() from None
        except OSError as exc:
            raise Unreachable(str(exc)) from None

    async def connack(self, reader: asyncio.StreamReader) -> int:
        """The CONNACK return code; raises ConnectionError / TimeoutError / ValueError."""
        return await mqtt_wire.connack(reader, IO_TIMEOUT)

    async def login(self, me: Identity, *, clean: bool = True, client_id: str | None = None,
                    rcvbuf: int | None = None, plain: bool | None = None,
                    will: tuple[str, bytes, int, bool] | None = None,
                    ) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter]:
        """Log in as `me`; returns (CONNACK code, reader, writer). Signed password, or the
        plain secret (then any client id)."""
        reader, writer = await self.open(self.args.mqtt_port, rcvbuf=rcvbuf)
        if plain is None:
            plain = client_id is not None or random.random() < 0.3
        if plain:
            cid, password = client_id or f"{me.name}-{random.getrandbits(32):08x}", me.secret
        else:
            cid, password = me.signed_login()
        writer.write(mqtt_wire.connect(cid, me.username, password, clean=clean, will=will))
        try:
            code = await self.connack(reader)
        except BaseException:
            mqtt_wire.reset(writer)
            raise
        return code, reader, writer

    def note_push(self, me: Identity | None, topic: str, payload: bytes) -> None:
        if me is None or topic != me.topic("upgrade"):
            return
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            data = json.loads(payload).get("data")
            if isinstance(data, dict) and (data.get("url") or data.get("streamId") is not None):
                me.push = data

    async def drain(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, me: Identity | None,
                    seconds: float) -> list[tuple[int, bytes]]:
        """Read what arrives for `seconds` (acking QoS 1 publishes); returns the packets.
        Raises ConnectionError when the server closes."""
        packets: list[tuple[int, bytes]] = []
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                first, body = await asyncio.wait_for(mqtt_wire.read_packet(reader), left)
            except TimeoutError:
                break
            except asyncio.IncompleteReadError:
                raise ConnectionResetError("server closed the connection") from None
            packets.append((first, body))
            if first >> 4 == 3:
                topic, qos, packet_id, payload = mqtt_wire.parse_publish(first, body)
                if packet_id is not None:
                    writer.write(mqtt_wire.puback(packet_id) if qos == 1 else mqtt_wire.pubrec(packet_id))
                self.note_push(me, topic, payload)
        return packets

    async def still_alive(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          me: Identity | None) -> str:
        """PINGREQ after an attack: `accepted` if the connection answers, else `closed`/`timeout`."""
        try:
            writer.write(mqtt_wire.PINGREQ)
            await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
            end = time.monotonic() + IO_TIMEOUT * 2
            while time.monotonic() < end:
                packets = await self.drain(reader, writer, me, min(1.0, end - time.monotonic()))
                if any(first >> 4 == 13 for first, _ in packets):
                    return "accepted"
            return "timeout"
        except (ConnectionError, OSError):
            return "closed"
        except TimeoutError:
            return "timeout"

    async def hold(self, kind: str, conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
                   trickle: bytes | None = None) -> None:
        """Hold sockets open until the server closes each, or the hold time ends; records
        one outcome per socket. `trickle`: bytes sent one at a time meanwhile (slowloris)."""
        start = time.monotonic()
        end = start + self.hold_time()

        async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sent = 0
            try:
                while (left := end - time.monotonic()) > 0:
                    step = min(left, random.uniform(0.3, 1.0)) if trickle is not None else left
                    try:
                        data = await asyncio.wait_for(reader.read(65536), step)
                    except TimeoutError:
                        if trickle is not None and sent < len(trickle):
                            writer.write(trickle[sent:sent + 1])
                            sent += 1
                        continue
                    if not data:
                        self.report.stats(kind).seconds_to_close.append(time.monotonic() - start)
                        self.report.record(kind, "closed")
                        return
                    status = http_status(data) if kind in HTTP_ATTACKS else None
                    if status is not None:
                        self.report.stats(kind).http_status[status] += 1
                        self.report.record(kind, classify_status(status))
                        if status >= 500:
                            self.report.note(kind, f"HTTP {status} to a held connection")
                    else:  # an MQTT answer to half a packet, or bytes that are no HTTP status line
                        self.report.record(kind, "refused" if kind in MQTT_ATTACKS_ANON else "error")
                        if kind in HTTP_ATTACKS:
                            self.report.note(kind, f"answer is no HTTP status line: {data[:40]!r}")
                    return
                self.report.record(kind, "timeout")
            except (ConnectionError, OSError):
                self.report.stats(kind).seconds_to_close.append(time.monotonic() - start)
                self.report.record(kind, "closed")
            finally:
                mqtt_wire.reset(writer)

        await asyncio.gather(*(one(r, w) for r, w in conns))

    async def open_many(self, port: int, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        conns = []
        for _ in range(count):
            conns.append(await self.open(port))
        return conns

    # -- MQTT without credentials

    async def refused_connect(self, kind: str, me: Identity | None) -> None:
        """A burst of CONNECTs that must be refused, each followed by a reset."""
        for _ in range(10):
            name = random.choice(self.victims) if self.victims and random.random() < 0.5 else \
                (me.name if me else f"nobody-{random.getrandbits(24):06x}")
            pk = me.product_key if me else self.args.product
            variant = random.choice(["level5", "wrong_password"] + (["squat"] if me and self.squat else []))
            if variant == "level5":
                secret = me.secret if me and name == me.name else "x" * 64
                packet = mqtt_wire.connect(name, f"{name}&{pk}", secret, level=5)
            elif variant == "wrong_password":
                packet = mqtt_wire.connect(name, f"{name}&{pk}", "wrong-" + "%032x" % random.getrandbits(128))
            else:  # a valid login of our own device on someone else's client id, maybe kept (clean 0)
                assert me is not None
                packet = mqtt_wire.connect(random.choice(self.squat), me.username, me.secret,
                                           clean=random.random() < 0.5)
            reader, writer = await self.open(self.args.mqtt_port)
            writer.write(packet)
            if random.random() < 0.3:  # reset before the answer can even be written
                mqtt_wire.reset(writer)
                self.report.record(kind, "closed")
                continue
            try:
                code = await self.connack(reader)
                outcome = "refused" if code else "accepted"
                if code == 0 and variant != "squat":  # a squat is accepted when nobody holds the id
                    self.report.note(kind, f"{variant} CONNECT accepted")
                if variant == "squat":  # accepted when the id is free, CONNACK 2 when another device holds it
                    self.report.stats(kind).notes[f"squat on a client id: CONNACK {code}"] += 1
            except (ConnectionError, asyncio.IncompleteReadError):
                outcome = "closed"
            except TimeoutError:
                outcome = "timeout"
            except ValueError as exc:
                outcome = "error"
                self.report.note(kind, str(exc))
            finally:
                mqtt_wire.reset(writer)
            self.report.record(kind, outcome)

    async def idle_mqtt(self, kind: str, me: Identity | None) -> None:
        await self.hold(kind, await self.open_many(self.args.mqtt_port, self.args.sockets_per_hold))

    async def half_connect(self, kind: str, me: Identity | None) -> None:
        conns = await self.open_many(self.args.mqtt_port, self.args.sockets_per_hold)
        for reader, writer in conns:
            full = mqtt_wire.connect(f"half-{random.getrandbits(32):x}", "half&a1Half", "x")
            choice = random.randrange(3)
            if choice == 0:
                writer.write(full[:9])  # half the variable header
            elif choice == 1:
                writer.write(b"\x10\xe8\x07" + full[3:40])  # announces 1000 bytes, sends 37
            else:
                writer.write(b"\x10")  # the first byte only
        await self.hold(kind, conns)

    async def connect_cycle(self, kind: str, me: Identity | None) -> None:
        for _ in range(20):
            if me is not None and random.random() < 0.5:
                code, reader, writer = await self.login(me)
                self.report.record(kind, "accepted" if code == 0 else "refused")
                if code:
                    self.report.note(kind, f"own login refused with CONNACK {code}")
                writer.close()  # a FIN, no DISCONNECT: the will (none) would be due
            else:
                reader, writer = await self.open(self.args.mqtt_port)
                writer.close()
                self.report.record(kind, "accepted")

    async def huge_connect(self, kind: str, me: Identity | None) -> None:
        for _ in range(3):
            cid = random.choice([b"x", b"\xc3\xa9", b"\x1b"]) * 65535
            cid = cid[:65535]
            suffix = f"&{me.product_key if me else self.args.product}"
            user = "u" * (65535 - len(suffix)) + suffix
            password = me.secret if me and random.random() < 0.5 else "wrong"
            reader, writer = await self.open(self.args.mqtt_port)
            writer.write(mqtt_wire.connect(cid, user, password))
            try:
                code = await self.connack(reader)
                self.report.record(kind, "refused" if code else "accepted")
                if code == 0:
                    self.report.note(kind, "64 KiB client id / username accepted")
            except (ConnectionError, asyncio.IncompleteReadError):
                self.report.record(kind, "closed")
            except TimeoutError:
                self.report.record(kind, "timeout")
            except ValueError as exc:
                self.report.record(kind, "error")
                self.report.note(kind, str(exc))
            finally:
                mqtt_wire.reset(writer)

    async def bad_will(self, kind: str, me: Identity | None) -> None:
        ident = me or Identity(f"nobody-{random.getrandbits(24):06x}", self.args.product, "x" * 64)
        fake = json.dumps({"code": "1000", "data": {"size": 1, "version": "9.9.9", "url": "http://evil.invalid/x.bin",
                                                     "sign": "00", "signMethod": "Md5", "md5": "00"},
                           "id": 1, "message": "success"}).encode()
        other = random.choice(self.victims) if self.victims else "someone-else"
        wills = [
            ("qos3", (f"/{ident.product_key}/{ident.name}/status", b"gone", 3, False)),
            ("forged_push", (ident.topic("upgrade"), fake, 1, True)),
            ("progress", (ident.topic("progress"), b'{"id":"1","params":{"step":"-1","desc":"will"}}', 1, False)),
            ("get_reply", (ident.topic("get_reply"), fake, 0, True)),
            ("other_device", (f"/{ident.product_key}/{other}/status", b"gone", 0, False)),
        ]
        for label, will in random.sample(wills, 3):
            code, reader, writer = await self.login(ident, will=will) if me else (None, *await self.open(self.args.mqtt_port))
            try:
                if code is None:
                    writer.write(mqtt_wire.connect(ident.name, ident.username, ident.secret, will=will))
                    code = await self.connack(reader)
                self.report.record(kind, "refused" if code else "accepted")
                if code == 0:
                    self.report.note(kind, f"will {label} accepted")
            except (ConnectionError, asyncio.IncompleteReadError):
                self.report.record(kind, "closed")
            except TimeoutError:
                self.report.record(kind, "timeout")
            except ValueError as exc:
                self.report.record(kind, "error")
                self.report.note(kind, str(exc))
            finally:
                mqtt_wire.reset(writer)  # had it been accepted, the will would be published now

    # -- MQTT with the device's own credentials

    async def logged_in(self, kind: str, me: Identity, **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        code, reader, writer = await self.login(me, **kwargs)
        if code != 0:
            mqtt_wire.reset(writer)
            self.report.record(kind, "refused")
            self.report.note(kind, f"own login refused with CONNACK {code}")
            return None
        return reader, writer

    SMALL_JUNK = (b"{", b"\xff\xfe\xfd", b"[]", b"null", b'"just a string"', b'{"id":1,"params":"x"}',
                  b'{"id":{},"params":{"version":["1"],"step":{"a":1},"desc":1e999}}',
                  b'{"params":{"version":"' + b"9" * 5000 + b'"}}',
                  b"[" * 100_000 + b"]" * 100_000,  # nesting deep enough to exhaust a recursive parser
                  b'{"params":{"step":"NaN","desc":NaN,"version":Infinity}}',
                  bytes(random.Random(1).getrandbits(8) for _ in range(1000)))

    def junk_payload(self) -> bytes:
        """Malformed JSON mostly; one in ten a huge payload (up to --max-payload-mb)."""
        if random.random() < 0.9 or not self.payload_max:
            return random.choice(self.SMALL_JUNK)
        size = random.randrange(self.payload_max // 4, self.payload_max + 1)
        return b'{"id":"1","params":{"version":"' + b"A" * size + b'","step":"1","desc":"' + b"d" * 64 + b'"}}'

    async def publish_flood(self, kind: str, me: Identity) -> None:
        conn = await self.logged_in(kind, me)
        if conn is None:
            return
        reader, writer = conn
        try:
            topics = [me.topic(t) for t in ("inform", "progress", "get", "download")]
            packet_id = 0
            for _ in range(random.randrange(30, 120)):
                qos = random.choice((0, 1, 2))
                packet_id = packet_id % 65535 + 1
                writer.write(mqtt_wire.publish(random.choice(topics), self.junk_payload(), qos=qos,
                                               packet_id=packet_id))
                await asyncio.wait_for(writer.drain(), IO_TIMEOUT * 2)
            self.report.record(kind, await self.still_alive(reader, writer, me))
        except (ConnectionError, OSError):
            self.report.record(kind, "closed")
        except TimeoutError:
            self.report.record(kind, "timeout")
        finally:
            mqtt_wire.reset(writer)

    async def evil_progress(self, kind: str, me: Identity) -> None:
        conn = await self.logged_in(kind, me)
        if conn is None:
            return
        reader, writer = conn
        evil = ["disk\nFAKE 00:00:00 INFO ota: all devices upgraded\n",
                "\x1b[2J\x1b[H\x1b[31mPWNED\x1b[0m", "line1\r\nline2\rline3\x00\x07\x08",
                "\u202eevil\u2066", "%s%s%n{0}${jndi:ldap://x}", "d" * 100_000]
        try:
            writer.write(mqtt_wire.publish(me.topic("inform"), json.dumps(
                {"id": "1", "params": {"version": self.args.version}}).encode(), qos=1, packet_id=1))
            await self.drain(reader, writer, me, 0.5)  # the push, if this device has a job
            for i in range(20):
                step = random.choice([str(random.randrange(1, 100)), random.randrange(1, 100), "50\n", "1e3", ""])
                body = {"id": str(i + 2), "params": {"step": step, "desc": random.choice(evil)}}
                if random.random() < 0.3:
                    body["params"]["module"] = random.choice(evil)[:200]
                writer.write(mqtt_wire.publish(me.topic("progress"), json.dumps(body, ensure_ascii=False).encode(),
                                               qos=1, packet_id=i + 2))
            await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
            self.report.record(kind, await self.still_alive(reader, writer, me))
        except (ConnectionError, OSError):
            self.report.record(kind, "closed")
        except TimeoutError:
            self.report.record(kind, "timeout")
        finally:
            mqtt_wire.reset(writer)

    async def retained_big(self, kind: str, me: Identity) -> None:
        conn = await self.logged_in(kind, me)
        if conn is None:
            return
        reader, writer = conn
        fake = json.dumps({"code": "1000", "id": 1, "message": "success",
                           "data": {"size": 4, "version": "6.6.6", "url": "http://evil.invalid/fw.bin",
                                    "sign": "0" * 32, "signMethod": "Md5", "md5": "0" * 32}}).encode()
        try:
            for i in range(random.randrange(1, 4)):
                writer.write(mqtt_wire.publish(f"/{me.product_key}/{me.name}/big/{i}", b"R" * (1 << 20),
                                               qos=random.choice((0, 1)), retain=True, packet_id=i + 1))
            writer.write(mqtt_wire.publish(me.topic("upgrade"), fake, qos=1, retain=True, packet_id=10))
            writer.write(mqtt_wire.publish(me.topic("get_reply"), fake, qos=0, retain=True))
            await asyncio.wait_for(writer.drain(), IO_TIMEOUT * 2)
            outcome = await self.still_alive(reader, writer, me)
        except (ConnectionError, OSError):
            outcome = "closed"
        except TimeoutError:
            outcome = "timeout"
        finally:
            mqtt_wire.reset(writer)
        self.report.record(kind, outcome)
        # What a fresh connection of the same device gets back from the broker's retained store.
        conn = await self.logged_in("retained_big", me)
        if conn is None:
            return
        reader, writer = conn
        try:
            writer.write(mqtt_wire.subscribe([(f"/{me.product_key}/{me.name}/#", 0), (me.topic("upgrade"), 1),
                                              (me.topic("get_reply"), 0)], packet_id=7))
            retained_bytes = 0
            for first, body in await self.drain(reader, writer, me, 1.0):
                if first >> 4 != 3:
                    continue
                topic = mqtt_wire.parse_publish(first, body)[0]
                if b"evil.invalid" in body:
                    self.report.note(kind, f"forged retained push delivered back on {topic}")
                elif first & 1:
                    retained_bytes += len(body)
            if retained_bytes > 128 * 1024:
                self.report.note(kind, "over 128 KiB of retained messages kept for one device")
        except (ConnectionError, OSError, TimeoutError):
            pass
        finally:
            mqtt_wire.reset(writer)

    async def subscribe_1000(self, kind: str, me: Identity) -> None:
        conn = await self.logged_in(kind, me)
        if conn is None:
            return
        reader, writer = conn
        foreign = ["#", "+/+/+", "/ota/device/upgrade/+/+", "$SYS/#", f"/ota/device/upgrade/{me.product_key}/#",
                   f"/sys/{me.product_key}/+/thing/file/download_reply"]
        filters = [(f"/{me.product_key}/{me.name}/f/{i}", random.choice((0, 1, 2))) for i in range(1000 - len(foreign))]
        filters += [(f, 1) for f in foreign]
        random.shuffle(filters)
        granted, refused_foreign = 0, 0
        try:
            if random.random() < 0.5:
                writer.write(mqtt_wire.subscribe(filters, packet_id=1))
                await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
                codes = await self.subacks(reader, writer, me, 1)
            else:
                for i, item in enumerate(filters):
                    writer.write(mqtt_wire.subscribe([item], packet_id=i + 1))
                await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
                codes = await self.subacks(reader, writer, me, len(filters))
            for (topic_filter, _), code in zip(filters, codes):
                if code < 0x80:
                    granted += 1
                    if topic_filter in foreign:
                        self.report.note(kind, f"foreign filter {topic_filter!r} granted")
                elif topic_filter in foreign:
                    refused_foreign += 1
            self.report.record(kind, "refused" if granted < len(filters) else "accepted")
            if granted > 500:
                self.report.note(kind, f"{granted} of 1000 filters granted to one client")
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            self.report.record(kind, "closed")
        except TimeoutError:
            self.report.record(kind, "timeout")
        finally:
            mqtt_wire.reset(writer)

    async def subacks(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, me: Identity,
                      count: int) -> list[int]:
        """Return codes of `count` SUBACKs (packet ids 1..count), in packet id order."""
        by_id: dict[int, bytes] = {}
        end = time.monotonic() + IO_TIMEOUT * 2
        while len(by_id) < count:
            if time.monotonic() > end:
                raise TimeoutError
            for first, body in await self.drain(reader, writer, me, 0.5):
                if first >> 4 == 9:
                    by_id[struct.unpack_from(">H", body)[0]] = body[2:]
        return [code for pid in sorted(by_id) for code in by_id[pid]]

    async def session_churn(self, kind: str, me: Identity) -> None:
        for i in range(20):
            cid = f"{me.name}|ts={random.getrandbits(48)}|"
            conn = await self.logged_in(kind, me, clean=False, client_id=cid)
            if conn is None:
                continue
            reader, writer = conn
            try:
                writer.write(mqtt_wire.subscribe([(f"/{me.product_key}/{me.name}/cmd/{i}", 1)], packet_id=1))
                await self.subacks(reader, writer, me, 1)
                self.report.record(kind, "accepted")
            except (ConnectionError, OSError):
                self.report.record(kind, "closed")
            except TimeoutError:
                self.report.record(kind, "timeout")
            finally:
                mqtt_wire.reset(writer)

    async def block_hog(self, kind: str, me: Identity) -> None:
        if me.push is None:  # ask for a job first: a real stream makes the server send real blocks
            conn = await self.logged_in(kind, me)
            if conn is None:
                return
            reader, writer = conn
            with contextlib.suppress(ConnectionError, OSError):
                writer.write(mqtt_wire.publish(me.topic("inform"), json.dumps(
                    {"id": "1", "params": {"version": self.args.version}}).encode(), qos=1))
                await self.drain(reader, writer, me, 1.0)
            mqtt_wire.reset(writer)
        push = me.push or {}
        conn = await self.logged_in(kind, me, rcvbuf=4096)
        if conn is None:
            return
        reader, writer = conn
        writer.transport.pause_reading()  # nothing leaves the kernel's (small) receive buffer
        request = {"id": "1", "version": "1.0", "params": {
            "fileToken": push.get("fileToken", ""),
            "fileInfo": {"streamId": push.get("streamId", random.randrange(1, 10_000)),
                         "fileId": push.get("streamFileId", 1)},
            "fileBlock": {"size": 131072, "offset": 0}}}
        packet = mqtt_wire.publish(me.topic("download"), json.dumps(request).encode())
        end = time.monotonic() + self.hold_time()
        try:
            for _ in range(200):  # up to 2,000 requests, never reading a reply
                if time.monotonic() > end:
                    raise TimeoutError
                writer.write(packet * 10)
                await asyncio.wait_for(writer.drain(), max(0.1, end - time.monotonic()))
            # All sent: wait for the server to notice the unread replies (or not).
            while time.monotonic() < end:
                writer.write(mqtt_wire.PINGREQ)
                await asyncio.wait_for(writer.drain(), max(0.1, end - time.monotonic()))
                await asyncio.sleep(0.5)
                if reader.at_eof() or writer.transport.is_closing():
                    raise ConnectionResetError
            self.report.record(kind, "timeout")
        except (ConnectionError, OSError):
            self.report.record(kind, "closed")
        except TimeoutError:
            self.report.record(kind, "timeout")
        finally:
            mqtt_wire.reset(writer)

    # -- HTTP

    def file_path(self, me: Identity | None) -> tuple[str, str]:
        """(path, query) of a real signed download URL when this device was pushed one."""
        url = (me.push or {}).get("url") if me else None
        if url:
            parts = urlsplit(url)
            return parts.path, parts.query
        return "/files/fw-1.1.0/fw-1.1.0.bin", ""

    async def http(self, kind: str, request: bytes, *, keep: int = 4096) -> tuple[int | None, bytes]:
        """Send a raw request; record and return (status, the first `keep` bytes of the answer)."""
        reader, writer = await self.open(self.args.http_port)
        data = b""
        try:
            writer.write(request)
            await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
            data = b""
            async with asyncio.timeout(IO_TIMEOUT):
                while len(data) < keep:
                    chunk = await reader.read(keep - len(data))
                    if not chunk:
                        break
                    data += chunk
                    head, sep, body = data.partition(b"\r\n\r\n")
                    if sep and (length := content_length(head)) is not None and len(body) >= length:
                        break
        except TimeoutError:
            if not data:
                self.report.record(kind, "timeout")
                return None, b""
        except (ConnectionError, OSError):
            pass  # what was read so far is the answer
        finally:
            mqtt_wire.reset(writer)
        status = http_status(data)
        if status is None:
            self.report.record(kind, "closed" if not data else "error")
            if data:
                self.report.note(kind, f"answer is no HTTP status line: {data[:40]!r}")
            return None, data
        self.report.stats(kind).http_status[status] += 1
        self.report.record(kind, classify_status(status))
        if status >= 500:
            self.report.note(kind, f"HTTP {status}: {first_line(request)}")
        return status, data

    async def slowloris(self, kind: str, me: Identity | None) -> None:
        path, query = self.file_path(me)
        conns = await self.open_many(self.args.http_port, max(1, self.args.sockets_per_hold // 2))
        request = (f"GET {path}{'?' + query if query else ''} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   "User-Agent: slow\r\nRange: bytes=0-1\r\nX-Slow: " + "z" * 200 + "\r\n\r\n").encode()
        await self.hold(kind, conns, trickle=request)

    async def http_idle(self, kind: str, me: Identity | None) -> None:
        """Sockets that send nothing, and keep-alive sockets left silent after one request."""
        conns = await self.open_many(self.args.http_port, self.args.sockets_per_hold)
        half = len(conns) // 2
        end = time.monotonic() + self.hold_time()

        async def after_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                answer = await asyncio.wait_for(reader.read(4096), IO_TIMEOUT)
                start = time.monotonic()
                if http_status(answer) is None:
                    self.report.record(kind, "closed" if not answer else "error")
                    return
                data = await asyncio.wait_for(reader.read(4096), max(0.1, end - start))
                if data:
                    self.report.record(kind, "error")
                    self.report.note(kind, f"unasked bytes on an idle keep-alive connection: {data[:40]!r}")
                else:
                    self.report.stats(kind).seconds_to_close.append(time.monotonic() - start)
                    self.report.record(kind, "closed")
            except TimeoutError:
                self.report.record(kind, "timeout")
            except (ConnectionError, OSError):
                self.report.record(kind, "closed")
            finally:
                mqtt_wire.reset(writer)

        await asyncio.gather(self.hold(kind, conns[half:]), *(after_request(r, w) for r, w in conns[:half]))

    async def http_bad_auth(self, kind: str, me: Identity | None) -> None:
        user = f"{me.name}&{me.product_key}" if me else "nobody&a1None"
        values = [b"Bearer \xc3\xa9\xe2\x82\xac\xf0\x9f\x92\xa3", b"Bearer \xff\xfe\xfd\x80",
                  b"Basic " + base64.b64encode(user.encode() + b":\xff\xfe"),
                  b"Basic " + base64.b64encode(b"\xc3\x28:\xa0\xa1"), b"Basic \xe9\xe9\xe9==",
                  b"Basic " + base64.b64encode("\u00fc\u00f1\u00ee:\u00e7\u00f8d\u00e9".encode("latin-1")),
                  b"\xe2\x80\x8bBearer x", b"Bearer " + b"\x00" * 8, b"Basic ====", b"Basic " + b"A" * 8001]
        targets = [b"GET /admin/api/status", b"GET /admin/", b"POST /admin/api/reload",
                   b"GET /admin/api/jobs/1", b"POST /admin/api/batches/x/retry",
                   b"GET /base-api/api/v1/get_ota_info?productKey=a&deviceKey=b",
                   b"POST /base-api/api/v1/write_ota_info"]
        for _ in range(6):
            target, value = random.choice(targets), random.choice(values)
            body = b'{"devices":["x"]}' if target.startswith(b"POST") else b""
            request = (target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: " + value
                       + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            status, data = await self.http(kind, request)
            if status is not None and status < 300:
                self.report.note(kind, f"HTTP {status} for {target.decode()} with a bogus Authorization")

    async def http_bad_range(self, kind: str, me: Identity | None) -> None:
        path, query = self.file_path(me)
        ranges = [b"bytes=-", b"bytes=999999999999999999999999-", b"bytes=5-1", b"items=0-1", b"bytes=--1",
                  b"bytes=0-0," * 2000 + b"0-0", b"bytes=\xff\xfe-\x00", b"bytes=-0", b"bytes=0-1-2",
                  b"bytes=1e3-2e3", b"bytes= 0 - 1 ", b"bytes=0x10-0x20", b"bytes=-99999999999999999999999",
                  b"bytes=0-18446744073709551616"]
        queries = [b"offset=-1&length=5", b"offset=99999999999999999999&length=1", b"offset=0&length=0",
                   b"offset=abc&length=%00", b"offset=1e9&length=1e9"]
        for _ in range(6):
            extra = b""
            q = query.encode()
            if random.random() < 0.3:
                q = (q + b"&" if q else b"") + random.choice(queries)
            if random.random() < 0.3:
                extra = b"If-Range: " + random.choice([b"\"\xff\"", b"W/\"x\"", b"Mon, 99 Foo 9999", b"*"]) + b"\r\n"
            target = path.encode() + (b"?" + q if q else b"")
            method = random.choice([b"GET", b"HEAD"])
            request = (method + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nRange: " + random.choice(ranges)
                       + b"\r\n" + extra + b"Connection: close\r\n\r\n")
            await self.http(kind, request, keep=1024)

    async def http_path_tricks(self, kind: str, me: Identity | None) -> None:
        real, query = self.file_path(me)
        q = ("?" + query) if query else ""
        key = real.split("/")[2] if real.count("/") >= 3 else "fw"
        paths = ["/files/../../etc/passwd", "/files/%2e%2e/%2e%2e/etc/passwd", "/files/..%2f..%2f/broker.yaml",
                 f"/files/{key}/..%2f..%2fbroker.yaml{q}", f"/files/{key}/%2e%2e%2fvar%2fadmin-token{q}",
                 "/files/%00/x", f"/files/{key}/x%00.bin{q}", "/files/" + "A" * 20_000 + "/x",
                 "//files//x", "/files/x\\..\\..\\etc\\passwd", "/files/\u00f8/\u00fc".encode().decode("latin-1"),
                 "/files/./././var/admin-token", f"/files/{key}/../../var/url-signing.key{q}",
                 "/files/..;/..;/etc/passwd", "/files/%252e%252e/%252e%252e/etc/passwd", "/files/x/y/z/../../..",
                 "/admin/../admin/api/status", "/files/var/ota.sqlite3", "/%2e%2e/%2e%2e/etc/passwd"]
        for _ in range(6):
            path = random.choice(paths)
            request = (b"GET " + path.encode("latin-1") + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            status, data = await self.http(kind, request, keep=65536)
            leaked = [m for m in (b"root:", b"listeners:", b"BEGIN", b"SQLite format", b"broker_plugin") if m in data]
            if status is not None and (status < 300 or leaked):
                self.report.note(kind, f"HTTP {status} for {path[:60]!r}" + (f" leaks {leaked}" if leaked else ""))

    async def http_huge_headers(self, kind: str, me: Identity | None) -> None:
        path, query = self.file_path(me)
        target = path + ("?" + query if query else "")
        variants = [
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {'b' * (1 << 20)}\r\n\r\n".encode(),
            (f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"X-H{i}: v\r\n" for i in range(5000))
             + "\r\n").encode(),
            f"GET /healthz?{'q' * 100_000} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode(),
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {'c=1; ' * 30_000}\r\n\r\n".encode(),
            (b"POST /base-api/api/v1/write_ota_info HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 99999999999\r\n"
             b"Authorization: Basic eDp5\r\n\r\n" + b"{" * 70_000),
            (b"POST /base-api/api/v1/write_ota_info HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
             b"\r\nffffffffffffffff\r\n" + b"x" * 70_000),
        ]
        for request in random.sample(variants, 3):
            await self.http(kind, request)

    # -- the loop

    async def client(self, index: int) -> None:
        me = self.identities[index % len(self.identities)] if self.identities and index >= self.args.anonymous \
            else None
        choices = self.device_attacks if me else self.anon_attacks
        rng_pause = random.Random(index)
        while not self.stop.is_set() and self.remaining() > 0.5:
            kind = random.choice(choices)
            try:
                async with asyncio.timeout(self.args.hold + 30):
                    await getattr(self, kind)(kind, me)
            except Unreachable as exc:
                self.report.record(kind, "unreachable")
                self.report.note(kind, f"connect failed: {exc}"[:120])
                await self.pause(0.5)
            except ConnectTimeout:
                self.report.record(kind, "timeout")
                self.report.note(kind, "connect timed out")
            except TimeoutError:
                self.report.record(kind, "timeout")
            except (ConnectionError, OSError, asyncio.IncompleteReadError):
                self.report.record(kind, "closed")
            except Exception as exc:  # noqa: BLE001 -- a bug here must not end the siege
                self.report.record(kind, "error")
                self.report.note(kind, f"client exception {type(exc).__name__}: {exc}"[:160])
            await self.pause(rng_pause.uniform(0, self.args.pause))

    async def cloned_credential(self, index: int) -> None:
        """One of --clones connections logged in with one device's secret (its own client id
        each), held for as long as the server lets it stay; reconnects --clone-retry s after
        the server closes it. A leaked secret on many machines, or a cloned firmware image."""
        me = Identity(self.args.clone, self.args.product,
                      self.args.secret or derive_device_secret(self.args.product_secret, self.args.clone))
        kind = "cloned_credential"
        while not self.stop.is_set() and self.remaining() > 0.5:
            started = time.monotonic()
            try:
                code, reader, writer = await self.login(me, client_id=f"{me.name}-clone-{index}-"
                                                                     f"{random.getrandbits(24):06x}", plain=True)
            except Unreachable as exc:
                self.report.record(kind, "unreachable")
                self.report.note(kind, f"connect failed: {exc}"[:120])
            except ConnectTimeout:
                self.report.record(kind, "timeout")
            except (TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError, ValueError):
                self.report.record(kind, "closed")
            else:
                if code != 0:
                    self.report.record(kind, "refused")
                    mqtt_wire.reset(writer)
                else:
                    self.report.record(kind, "accepted")
                    self.held_clones += 1
                    self.most_clones = max(self.most_clones, self.held_clones)
                    with contextlib.suppress(Exception):  # until the server closes it, or the siege ends
                        stop = asyncio.ensure_future(self.stop.wait())
                        read = asyncio.ensure_future(reader.read())
                        await asyncio.wait([stop, read], return_when=asyncio.FIRST_COMPLETED)
                        if read.done():
                            self.report.stats(kind).seconds_to_close.append(time.monotonic() - started)
                        stop.cancel()
                        read.cancel()
                    self.held_clones -= 1
                    mqtt_wire.reset(writer)
            await self.pause(self.args.clone_retry * random.uniform(0.5, 1.5))

    async def pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    async def server_alive(self) -> dict[str, bool]:
        """After the siege: do both listeners still answer?"""
        alive = {"mqtt": False, "http": False}
        with contextlib.suppress(Exception):
            reader, writer = await self.open(self.args.mqtt_port)
            writer.write(mqtt_wire.connect("probe", "probe&a1Probe", "wrong"))
            await self.connack(reader)
            alive["mqtt"] = True
            mqtt_wire.reset(writer)
        with contextlib.suppress(Exception):
            reader, writer = await self.open(self.args.http_port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = await asyncio.wait_for(reader.read(1024), IO_TIMEOUT)
            alive["http"] = http_status(data) is not None
            mqtt_wire.reset(writer)
        return alive

    async def status_loop(self) -> None:
        while not self.stop.is_set():
            await self.pause(self.args.status_every)
            line = {"elapsed_s": round(time.monotonic() - self.report.started, 1), **self.report.totals()}
            if self.args.clones:
                line["clones_held"] = self.held_clones
            print(json.dumps({"status": line}), file=sys.stderr, flush=True)

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Not a placeholder: loops without signal handlers (Windows, a non-main thread)
            # raise these; the run then ends by --duration alone.
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop.set)
        clients = [asyncio.create_task(self.client(i)) for i in range(self.args.clients)]
        clients += [asyncio.create_task(self.cloned_credential(i)) for i in range(self.args.clones)]
        status = asyncio.create_task(self.status_loop()) if self.args.status_every else None
        print(json.dumps({"status": {"started": self.args.clients}}), file=sys.stderr, flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), self.args.duration)
        self.stop.set()
        for task in clients:  # held sockets and floods end now, not at their own deadline
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        if status is not None:
            status.cancel()
            await asyncio.gather(status, return_exceptions=True)
        alive = await self.server_alive()
        return {"seconds": round(time.monotonic() - self.report.started, 1), "clients": self.args.clients,
                "totals": self.report.totals(), "server_alive": alive,
                **({"clones_held_at_most": self.most_clones} if self.args.clones else {}),
                "attacks": {kind: self.report.kinds[kind].as_dict() for kind in (*ALL_ATTACKS, "cloned_credential")
                            if kind in self.report.kinds}}


# -------------------------------------------------------------------------- helpers


def http_status(data: bytes) -> int | None:
    if not data.startswith(b"HTTP/1.") or len(data) < 12:
        return None
    try:
        return int(data[9:12])
    except ValueError:
        return None


def classify_status(status: int) -> str:
    return "accepted" if status < 400 else "refused" if status < 500 else "error"


def content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            with contextlib.suppress(ValueError):
                return int(value.strip())
    return None


def first_line(request: bytes) -> str:
    return request.split(b"\r\n", 1)[0][:80].decode("latin-1")


def render(result: dict[str, Any]) -> str:
    rows = [f"{'attack':<18} {'done':>6} " + " ".join(f"{o:>11}" for o in OUTCOMES) + "  notes"]
    for kind, stats in result["attacks"].items():
        notes = "; ".join(f"{n} (x{c})" for n, c in list(stats.get("notes", {}).items())[:3])
        extra = []
        if "http_status" in stats:
            extra.append("HTTP " + ",".join(f"{k}:{v}" for k, v in stats["http_status"].items()))
        if "closed_after_s" in stats:
            extra.append("closed after {min}-{max} s".format(**stats["closed_after_s"]))
        rows.append(f"{kind:<18} {stats['done']:>6} " + " ".join(f"{stats[o]:>11}" for o in OUTCOMES)
                    + "  " + " | ".join(extra + ([notes] if notes else [])))
    totals = result["totals"]
    rows.append(f"{'total':<18} {totals['done']:>6} " + " ".join(f"{totals[o]:>11}" for o in OUTCOMES))
    rows.append(f"{result['clients']} clients, {result['seconds']} s; server still answers: "
                f"MQTT {result['server_alive']['mqtt']}, HTTP {result['server_alive']['http']}")
    return "\n".join(rows)


def loopback(value: str) -> str:
    host = value.strip("[]")
    if host not in LOOPBACK:
        raise argparse.ArgumentTypeError(f"only {' or '.join(LOOPBACK)} may be attacked, not {value!r}")
    return host


def attack_list(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_ATTACKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown attacks {unknown}; known: {', '.join(ALL_ATTACKS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hostile_clients.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_argument_group("target (loopback only)")
    target.add_argument("--host", type=loopback, default="127.0.0.1",
                        help="the server's address: 127.0.0.1 or ::1, nothing else (default: %(default)s)")
    target.add_argument("--mqtt-port", type=int, required=True, help="the server's MQTT port")
    target.add_argument("--http-port", type=int, required=True, help="the server's HTTP port")
    creds = p.add_argument_group("credentials (for the attacks that log in; without --device only the "
                                 "anonymous MQTT and the HTTP attacks run)")
    creds.add_argument("--device", action="append", default=[], metavar="NAME",
                       help="device name whose credentials hostile clients hold; repeat for several "
                            "devices, clients take them in turn")
    creds.add_argument("--product", default="a1DemoCam", help="productKey of --device (default: %(default)s)")
    secret = creds.add_mutually_exclusive_group()
    secret.add_argument("--secret", help="the device secret (with one --device)")
    secret.add_argument("--product-secret", default="demo-product-secret",
                        help="derive each device's secret as hex(HMAC-SHA256(product secret, name)), as "
                             "device_sim.py does (default: %(default)s)")
    creds.add_argument("--version", default="1.0.0",
                       help="firmware version the hostile devices report to get a job (default: %(default)s)")
    creds.add_argument("--impersonate", type=lambda v: [n for n in v.split(",") if n], default=[], metavar="NAMES",
                       help="comma-separated names of other devices: targets of wrong-password and "
                            "protocol-5 CONNECTs (on their name as client id) and of wills on their topics")
    creds.add_argument("--squat", type=lambda v: [n for n in v.split(",") if n], default=[], metavar="CLIENT_IDS",
                       help="comma-separated client ids to log in on with our own valid credentials "
                            "(clean_session 0 or 1): ids another device holds must be refused")
    creds.add_argument("--clone", metavar="NAME",
                       help="with --clones: the device whose secret the cloned connections share")
    run = p.add_argument_group("the siege")
    run.add_argument("--clients", type=int, default=10, help="hostile clients at once (default: %(default)s)")
    run.add_argument("--anonymous", type=int, default=0, metavar="N",
                     help="the first N clients hold no credentials even with --device (default: %(default)s)")
    run.add_argument("--duration", type=float, default=30.0, help="seconds to attack (default: %(default)s); "
                     "SIGINT/SIGTERM end it early and still print the report")
    run.add_argument("--attacks", type=attack_list, default=list(ALL_ATTACKS), metavar="A,B,...",
                     help="only these attacks (default: all of them, see below)")
    run.add_argument("--hold", type=float, default=20.0,
                     help="seconds to hold idle / half-open / slowloris sockets before letting go; longer "
                          "than the server's 10 s connect/header deadlines and 15 s HTTP idle timeout shows "
                          "them enforced (default: %(default)s)")
    run.add_argument("--sockets-per-hold", type=int, default=10,
                     help="sockets each idle/half-open/slowloris attack opens (default: %(default)s)")
    run.add_argument("--max-payload-mb", type=float, default=4.0,
                     help="largest PUBLISH payload of a flood, in MB (default: %(default)s)")
    run.add_argument("--pause", type=float, default=0.2,
                     help="at most this many seconds (random) between one client's attacks (default: %(default)s)")
    run.add_argument("--clones", type=int, default=0, metavar="N",
                     help="besides --clients: N connections logged in at once with the one secret of --clone, "
                          "each its own client id, reconnecting when closed (default: %(default)s)")
    run.add_argument("--clone-retry", type=float, default=2.0, metavar="SECONDS",
                     help="about this long between a clone being closed and connecting again (default: %(default)s)")
    run.add_argument("--seed", type=int, help="random seed, for a repeatable mix")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the report as JSON (default: a table)")
    out.add_argument("--status-every", type=float, default=0, metavar="SECONDS",
                     help="print running totals as a JSON line to stderr every SECONDS (default: never)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.secret and len(args.device) > 1:
        parser.error("--secret is one device's secret: give one --device, or --product-secret")
    if args.clones and not args.clone:
        parser.error("--clones needs --clone NAME: the device whose secret they share")
    if args.clients < 1 or args.duration <= 0:
        parser.error("--clients and --duration must be positive")
    if args.seed is not None:
        random.seed(args.seed)
    result = asyncio.run(Siege(args).run())
    print(json.dumps(result, indent=2) if args.json else render(result), flush=True)
    return 0 if all(result["server_alive"].values()) else 2

