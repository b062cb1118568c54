"""Simulated OTA devices speaking the Alink OTA protocol (docs/protocol.md): the logic of
scripts/device_sim.py, and `run_device`/`run_fleet` for the tests and the benchmarks.

Each device connects over MQTT, reports its version, takes an upgrade (pushed or asked
for), downloads it over HTTP(S) ranges or MQTT blocks, verifies it, reports progress,
"reboots" and reports the new version. It plays third-party firmware, so it imports
nothing from the server. `main` is the command line (see scripts/device_sim.py --help).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import multiprocessing
import socket
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import aiomqtt
import bsdiff4
import yarl  # aiohttp's own URL type: lets us send the signed URL byte for byte

from devicekit.alink import (FILE_HASHES, MQTT_BLOCK_MAX, MQTT_BLOCK_MIN, Offer, as_int, parse_block_reply,
                             parse_content_range)
from devicekit.signing import SIGN_METHODS, derive_device_secret, now_ms, signed_login

HTTP_READ_PIECE = 8192
HTTP_RETRIES = 5  # a download whose connection fails resumes, like device SDKs do
# A CONNECT or SUBSCRIBE not answered within this is given up and the connect tried again
# (device SDKs reconnect with a backoff). With the whole device's timeout there, a connect a
# loaded broker never answered held its slot of the connect gate for 30 minutes, and 200 of
# them stopped every later connect of a 10,000-device fleet. Publishes keep the device's
# timeout: a PUBACK a loaded broker sends late is not a lost connection.
MQTT_WAIT = 30.0
MQTT_CONNECTS = 5


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass
class DeviceConfig:
    """Everything one simulated device needs; defaults match the demo catalog."""

    device_name: str
    product_key: str = "a1DemoCam"
    device_secret: str | None = None  # None: derived from product_secret
    product_secret: str = "demo-product-secret"
    version: str = "1.0.0"
    module: str = "default"
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    ask: bool = False  # firmware/get instead of waiting for a push
    plain_password: bool = False
    sign_method: str = "hmacsha256"
    chunk: int = 65536  # bytes per HTTP Range request / MQTT block; 0 = one open range
    drop_at: float | None = None  # percent at which to drop the connection once
    fail_step: int | None = None  # simulate this negative progress step
    boot_fail: bool = False  # report the old version after "reboot"
    base_image: str | None = None  # path of the current image, to apply diffs
    timeout: float = 60.0
    push_wait: float | None = None  # no push within this many s: "no upgrade"
    expect: str = "upgrade"  # "upgrade" or "no-upgrade": which outcome counts as ok
    progress_every: int = 25  # report progress every N percent
    tls_insecure: bool = False
    cafile: str | None = None

    @property
    def secret(self) -> str:
        if self.device_secret is not None:
            return self.device_secret
        return derive_device_secret(self.product_secret, self.device_name)


@dataclasses.dataclass
class DeviceResult:
    device_name: str
    outcome: str  # "upgraded" | "failed" | "no_upgrade" | "timeout"
    from_version: str
    to_version: str | None = None
    bytes_downloaded: int = 0
    seconds: float = 0.0
    protocol: str | None = None  # "http" | "https" | "mqtt"
    resumed: bool = False
    step: int | None = None  # negative progress step reported, if any
    reason: str = ""
    expected: bool = False  # the outcome the config asked for
    offer_at: float | None = None  # wall-clock time the push (or get_reply) arrived

    def summary(self) -> str:
        head = f"{self.device_name} {self.from_version}"
        if self.outcome == "upgraded":
            line = (f"{head} -> {self.to_version} ok {self.protocol} "
                    f"{self.bytes_downloaded} B {self.seconds:.2f} s")
            return line + (" resumed" if self.resumed else "")
        if self.outcome == "no_upgrade":
            return f"{head} no upgrade offered" + (f" ({self.reason})" if self.reason else "")
        if self.outcome == "timeout":
            return f"{head} failed timeout ({self.reason})"
        if self.step is None:
            return f"{head} failed ({self.reason})"
        return f"{head} failed step {self.step} ({self.reason})"


class DeviceFailure(Exception):
    """Ends a device as failed; `step` is reported upstream when not None."""

    def __init__(self, step: int | None, reason: str, simulated: bool = False) -> None:
        super().__init__(reason)
        self.step, self.reason, self.simulated = step, reason, simulated


class NoUpgrade(Exception):
    pass



# ------------------------------------------------------------------ protocol bits


def mqtt_credentials(cfg: DeviceConfig, now: int | None = None) -> tuple[str, str, str]:
    """(client id, username, password). The timestamp makes each connect's id unique."""
    username = f"{cfg.device_name}&{cfg.product_key}"
    if cfg.plain_password:
        return cfg.device_name, username, cfg.secret
    client_id, password = signed_login(cfg.secret, cfg.device_name, cfg.product_key,
                                       now if now is not None else now_ms(), method=cfg.sign_method)
    return client_id, username, password


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def load_json(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        raise DeviceFailure(None, f"{what} is not JSON: {raw[:80]!r}") from None
    if not isinstance(value, dict):
        raise DeviceFailure(None, f"{what} is not a JSON object: {raw[:80]!r}")
    return value


@functools.lru_cache(maxsize=8)
def read_base_image(path: str) -> bytes:
    # Cached: a fleet of devices shares one base image file.
    with open(path, "rb") as f:
        return f.read()


# ------------------------------------------------------------------------- MQTT link


class MqttLink:
    """One device's MQTT connection (reopenable) with an inbox per downstream topic."""

    def __init__(self, cfg: DeviceConfig, gate: asyncio.Semaphore | None) -> None:
        self.cfg = cfg
        self.gate = gate
        pk, dn = cfg.product_key, cfg.device_name
        self.topics = {
            "upgrade": f"/ota/device/upgrade/{pk}/{dn}",
            "get_reply": f"/sys/{pk}/{dn}/thing/ota/firmware/get_reply",
            "download_reply": f"/sys/{pk}/{dn}/thing/file/download_reply",
        }
        # Queues outlive reconnects; stale replies are skipped by id. None = link lost.
        self.inbox: dict[str, asyncio.Queue[bytes | None]] = {k: asyncio.Queue() for k in self.topics}
        self._by_topic = {t: k for k, t in self.topics.items()}
        self._client: aiomqtt.Client | None = None
        self._reader: asyncio.Task[None] | None = None
        self._next_id = 0

    def next_id(self) -> str:
        self._next_id += 1
        return str(self._next_id)

    async def open(self) -> None:
        """Connect and subscribe, trying again (1, 2, 4, 8 s apart) when the broker does not answer."""
        for attempt in range(MQTT_CONNECTS):
            try:
                return await self._open()
            except _NoAnswer:
                await self.close()
                if attempt == MQTT_CONNECTS - 1:
                    raise
                await asyncio.sleep(2 ** attempt)

    async def _open(self) -> None:
        client_id, username, password = mqtt_credentials(self.cfg)
        client = aiomqtt.Client(
            self.cfg.mqtt_host, self.cfg.mqtt_port, identifier=client_id,
            username=username, password=password, timeout=self.cfg.timeout,
            # paho leaves Nagle on: block request/reply round trips would stall on
            # delayed ACKs (~40 ms each) and we would measure TCP, not the server.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
                            # A device that reboots loses its TCP state: no FIN, no TIME_WAIT
                            # (10,000 of those would use up the loopback's ephemeral ports).
                            (socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))],
        )
        # The gate bounds simultaneous connects (the handshake is the broker's hot spot).
        async with self.gate or contextlib.nullcontext():
            try:
                async with asyncio.timeout(MQTT_WAIT):
                    await client.__aenter__()
            except aiomqtt.MqttCodeError as exc:  # refused: an answer, not tried again
                raise DeviceFailure(None, f"MQTT connect: {exc}") from None
            except (aiomqtt.MqttError, TimeoutError) as exc:
                raise _NoAnswer(None, f"MQTT connect: {str(exc) or f'no CONNACK within {MQTT_WAIT:g} s'}") from None
            self._client = client
            try:
                codes = await client.subscribe([(t, 1) for t in self.topics.values()], timeout=MQTT_WAIT)
            except aiomqtt.MqttError as exc:
                raise _NoAnswer(None, f"MQTT subscribe: {exc}") from None
        refused = [c for c in codes if int(getattr(c, "value", c)) >= 0x80]
        if refused:
            raise DeviceFailure(None, f"subscribe refused: {refused}")
        self._reader = asyncio.create_task(self._read(client))

    async def _read(self, client: aiomqtt.Client) -> None:
        try:
            async for msg in client.messages:
                kind = self._by_topic.get(msg.topic.value)
                if kind is not None:
                    self.inbox[kind].put_nowait(bytes(msg.payload))
        except aiomqtt.MqttError:
            # The broker went away: wake whoever waits instead of letting them time out.
            for queue in self.inbox.values():
                queue.put_nowait(None)

    async def receive(self, kind: str) -> bytes:
        payload = await self.inbox[kind].get()
        if payload is None:
            raise DeviceFailure(None, f"MQTT connection lost while waiting for {kind}")
        return payload

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)

    async def publish(self, topic: str, payload: dict[str, Any] | bytes) -> None:
        if self._client is None:
            raise DeviceFailure(None, "MQTT not connected")
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            await self._client.publish(topic, data, qos=1)
        except aiomqtt.MqttError as exc:
            raise DeviceFailure(None, f"MQTT publish to {topic}: {exc}") from None

    def _module_param(self) -> dict[str, str]:
        return {} if self.cfg.module == "default" else {"module": self.cfg.module}

    async def report_version(self, version: str) -> None:
        pk, dn = self.cfg.product_key, self.cfg.device_name
        params = {"version": version, **self._module_param()}
        await self.publish(f"/ota/device/inform/{pk}/{dn}", {"id": self.next_id(), "params": params})

    async def report_progress(self, step: int, desc: str) -> None:
        pk, dn = self.cfg.product_key, self.cfg.device_name
        params = {"step": str(step), "desc": desc[:128], **self._module_param()}
        await self.publish(f"/ota/device/progress/{pk}/{dn}", {"id": self.next_id(), "params": params})

    async def ask_firmware(self) -> dict[str, Any]:
        """Publish firmware/get (d) and return the reply's data (d')."""
        pk, dn = self.cfg.product_key, self.cfg.device_name
        req_id = self.next_id()
        await self.publish(f"/sys/{pk}/{dn}/thing/ota/firmware/get", {
            "id": req_id, "version": "1.0", "params": self._module_param(),
            "method": "thing.ota.firmware.get",
        })
        while True:
            reply = load_json(await self.receive("get_reply"), "firmware/get_reply")
            if str(reply.get("id")) != req_id:
                continue  # a late reply to an earlier request
            if str(reply.get("code")) != "200":
                raise DeviceFailure(None, f"firmware/get code {reply.get('code')}: {reply.get('message')}")
            return reply.get("data") or {}


# ------------------------------------------------------------------------- one device


class Device:
    """The state of one simulated device across its connections."""

    def __init__(self, cfg: DeviceConfig, gate: asyncio.Semaphore | None) -> None:
        self.cfg = cfg
        self.link = MqttLink(cfg, gate)
        self.stage = "starting"  # what we are doing: names the cause of a timeout
        self.result = DeviceResult(cfg.device_name, "failed", cfg.version)
        self.received = 0  # payload bytes read off the wire
        self._offset = 0  # bytes of the current HTTP download already hashed
        self._next_report = cfg.progress_every

    async def run(self) -> None:
        self.stage = "connecting"
        await self.link.open()
        await self.link.report_version(self.cfg.version)
        offer = await self._get_offer()
        self.result.offer_at = time.time()
        self.result.to_version, self.result.protocol = offer.version, offer.protocol
        self._simulate(-1, "simulated upgrade failure")
        hasher = self._new_hasher(offer.sign_method)
        keep = bytearray() if offer.is_diff and self.cfg.base_image else None
        self.stage = f"downloading over {offer.protocol}"
        if offer.url is None:
            await self._download_mqtt(offer, hasher, keep)
        else:
            await self._download_http(offer, hasher, keep)
        self.stage = "verifying"
        self._verify(offer, hasher, keep)
        self._simulate(-3, "simulated verify failure")
        self._simulate(-4, "simulated flash failure")
        await self.link.report_progress(100, "installed, rebooting")
        await self._reboot(offer)

    # -- getting the offer

    async def _get_offer(self) -> Offer:
        if self.cfg.ask:
            self.stage = "waiting for firmware/get_reply"
            data = await self.link.ask_firmware()
            if not data:
                raise NoUpgrade("firmware/get replied data {}")
            return self._parse_offer(data)
        self.stage = "waiting for upgrade push"
        while True:
            try:
                raw = await asyncio.wait_for(self.link.receive("upgrade"), self.cfg.push_wait)
            except asyncio.TimeoutError:
                raise NoUpgrade(f"no push within {self.cfg.push_wait:g} s") from None
            offer = self._parse_offer(load_json(raw, "upgrade push").get("data") or {})
            if offer.module == self.cfg.module:
                return offer
            self.stage = f"waiting for upgrade push (ignored one for module {offer.module})"

    def _parse_offer(self, data: Any) -> Offer:
        try:
            return Offer.parse(data)
        except (KeyError, ValueError) as exc:
            raise DeviceFailure(-1, f"bad upgrade data: {describe(exc)}") from None

    # -- progress and simulated failures

    def _simulate(self, step: int, desc: str) -> None:
        if self.cfg.fail_step == step:
            raise DeviceFailure(step, desc, simulated=True)

    async def _on_progress(self, done: int, total: int) -> None:
        """Report every `progress_every` percent; the -2 simulation strikes halfway."""
        percent = 100 * done // total if total else 100
        if self.cfg.fail_step == -2 and percent >= 50:
            raise DeviceFailure(-2, "simulated download failure", simulated=True)
        if self._next_report <= 0:
            return
        reached = None
        while self._next_report < 100 and percent >= self._next_report:
            reached, self._next_report = self._next_report, self._next_report + self.cfg.progress_every
        if reached is not None:
            await self.link.report_progress(reached, "downloading")

    def _drop_byte(self, total: int) -> int | None:
        if self.cfg.drop_at is None or self.result.resumed:
            return None
        return int(total * self.cfg.drop_at / 100)

    def _new_hasher(self, method: str) -> Any:
        factory = FILE_HASHES.get(method.lower())
        if factory is None:
            raise DeviceFailure(-3, f"unsupported signMethod {method!r}")
        return factory()

    # -- HTTP(S) download

    async def _download_http(self, offer: Offer, hasher: Any, keep: bytearray | None) -> None:
        """Ranged GETs of `chunk` bytes; on --drop-at, abort one response midway and
        resume with a fresh session from the bytes already received."""
        url = yarl.URL(offer.url, encoded=True)  # keep the signature's bytes untouched
        ssl_arg = self._ssl_context()
        self._offset, total = 0, offer.size
        retries = 0
        while True:  # again after a simulated drop, or a connection that failed (as SDKs retry)
            async with aiohttp.ClientSession(auto_decompress=False) as session:
                try:
                    await self._http_ranges(session, url, ssl_arg, self._offset, total, hasher, keep)
                    return
                except _Dropped as drop:
                    self._offset, total = drop.offset, drop.total
                    self.result.resumed = True
                except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                    retries += 1
                    if retries > HTTP_RETRIES:
                        raise DeviceFailure(-2, f"HTTP download after {self.received} B, {HTTP_RETRIES} retries: "
                                                f"{describe(exc)}") from None
                    await asyncio.sleep(min(2 ** retries, 10))  # then resume where it stopped
                except (aiohttp.ClientError, ValueError) as exc:
                    raise DeviceFailure(-2, f"HTTP download after {self.received} B: {describe(exc)}") from None

    async def _http_ranges(self, session: aiohttp.ClientSession, url: yarl.URL, ssl_arg: Any,
                           offset: int, total: int, hasher: Any,
                           keep: bytearray | None) -> None:
        """Fetch ranges from `offset` to the end of the file on one session."""
        while offset < total:
            open_ended = self.cfg.chunk <= 0
            last = None if open_ended else min(offset + self.cfg.chunk, total) - 1
            headers = {"Range": f"bytes={offset}-{'' if last is None else last}"}
            async with session.get(url, headers=headers, ssl=ssl_arg) as resp:
                if resp.status != 206:
                    raise ValueError(f"HTTP {resp.status} for {headers['Range']}, wanted 206")
                first, end, length = parse_content_range(resp.headers.get("Content-Range"))
                limit = length - 1 if last is None else min(last, length - 1)
                if first != offset or end < first or end > limit:
                    raise ValueError(f"Content-Range {first}-{end}/{length} for {headers['Range']}")
                total = length  # the server's file length rules the loop; size is verified later
                offset = self._offset = await self._read_body(resp, offset, end + 1, total, hasher, keep)

    async def _read_body(self, resp: aiohttp.ClientResponse, offset: int, stop: int, total: int,
                         hasher: Any, keep: bytearray | None) -> int:
        drop_at = self._drop_byte(total)
        piece = max(1, min(HTTP_READ_PIECE, (stop - offset) // 2))  # >= 2 reads per response
        async for data in resp.content.iter_chunked(piece):
            data = data[: stop - offset]
            self._consume(data, hasher, keep)
            offset = self._offset = offset + len(data)  # where a retry resumes
            await self._on_progress(offset, total)
            if drop_at is not None and offset >= drop_at and offset < stop:
                resp.close()  # body unread: aiohttp aborts the TCP connection
                raise _Dropped(offset, total)
        if offset != stop:
            raise ValueError(f"response ended at byte {offset}, Content-Range promised {stop}")
        return offset

    def _ssl_context(self) -> Any:
        if self.cfg.tls_insecure:
            return False
        if self.cfg.cafile:
            return ssl.create_default_context(cafile=self.cfg.cafile)
        return True  # aiohttp's default verification

    def _consume(self, data: bytes, hasher: Any, keep: bytearray | None) -> None:
        # Hash as we go: a thousand devices must not each hold a whole image.
        hasher.update(data)
        self.received += len(data)
        if keep is not None:
            keep += data

    # -- MQTT download

    async def _download_mqtt(self, offer: Offer, hasher: Any, keep: bytearray | None) -> None:
        """Request blocks (e) in order and check each reply (e'). On --drop-at, send a
        request, drop the MQTT connection before its reply, reconnect and ask again."""
        pk, dn = self.cfg.product_key, self.cfg.device_name
        topic = f"/sys/{pk}/{dn}/thing/file/download"
        size = min(max(self.cfg.chunk or MQTT_BLOCK_MAX, MQTT_BLOCK_MIN), MQTT_BLOCK_MAX)
        offset, total, token = 0, offer.size, None
        drop_at = self._drop_byte(total)
        while offset < total:
            req_id = self.link.next_id()
            params: dict[str, Any] = {
                "fileInfo": {"streamId": offer.stream_id, "fileId": offer.file_id},
                "fileBlock": {"size": size, "offset": offset},
            }
            if token is not None:
                params["fileToken"] = token
            await self.link.publish(topic, {"id": req_id, "version": "1.0", "params": params})
            if drop_at is not None and offset + size > drop_at:
                drop_at = None
                self.result.resumed = True
                await self.link.close()  # the reply in flight is lost with the connection
                await self.link.open()
                continue
            header, block = await self._await_block(req_id)
            data = header.get("data") or {}
            total = self._check_block(data, offset, size, total, len(block))
            token = data.get("fileToken") or token
            self._consume(block, hasher, keep)
            offset += len(block)
            await self._on_progress(offset, total)

    @staticmethod
    def _check_block(data: dict[str, Any], offset: int, size: int, total: int, got: int) -> int:
        """Check a block header against the request; returns the file length."""
        try:
            length = as_int(data.get("fileLength", total), "fileLength")
            want = min(size, length - offset)
            ok = (as_int(data.get("bOffset"), "bOffset") == offset and got == want
                  and as_int(data.get("bSize"), "bSize") == got)
        except ValueError as exc:
            raise DeviceFailure(-2, f"block header {data}: {exc}") from None
        if not ok:
            raise DeviceFailure(-2, f"block header {data} does not match offset {offset}, "
                                    f"expected {want} B, got {got} B")
        return length

    async def _await_block(self, req_id: str) -> tuple[dict[str, Any], bytes]:
        while True:
            raw = await self.link.receive("download_reply")
            try:
                header, block = parse_block_reply(raw)
            except ValueError as exc:
                raise DeviceFailure(-2, f"block reply: {exc}") from None
            if str(header.get("id")) != req_id:
                continue  # reply to a request lost in a drop
            if str(header.get("code")) != "200" or block is None:
                raise DeviceFailure(-2, f"block reply code {header.get('code')}: {header.get('msg')}")
            return header, block

    # -- verify, install, reboot

    def _verify(self, offer: Offer, hasher: Any, keep: bytearray | None) -> None:
        if self.received != offer.size:
            raise DeviceFailure(-3, f"size {self.received} != {offer.size}")
        digest = hasher.hexdigest()
        if digest != offer.sign or (offer.md5 is not None and digest != offer.md5):
            raise DeviceFailure(-3, f"{offer.sign_method} {digest} != {offer.sign}")
        if keep is not None:
            self._verify_patched(offer, bytes(keep))

    def _verify_patched(self, offer: Offer, patch: bytes) -> None:
        """Apply a diff to --base-image and check the target image's size and hash."""
        try:
            target_size = as_int(offer.ext["_target_size"], "_target_size")
            target_sign = str(offer.ext["_target_sign"]).lower()
            image = bsdiff4.patch(read_base_image(self.cfg.base_image), patch)
        except (KeyError, ValueError, OSError) as exc:
            raise DeviceFailure(-3, f"diff: {describe(exc)}") from None
        if len(image) != target_size:
            raise DeviceFailure(-3, f"patched size {len(image)} != _target_size {target_size}")
        digest = self._new_hasher(offer.sign_method)
        digest.update(image)
        if digest.hexdigest() != target_sign:
            raise DeviceFailure(-3, f"patched {offer.sign_method} {digest.hexdigest()} != _target_sign")

    async def _reboot(self, offer: Offer) -> None:
        self.stage = "rebooting"
        await self.link.close()
        await self.link.open()  # a fresh connection with a fresh timestamped client id
        booted = self.cfg.version if self.cfg.boot_fail else offer.version
        await self.link.report_version(booted)
        if self.cfg.boot_fail:
            raise DeviceFailure(None, f"boot failed: {offer.version} installed, reported "
                                      f"{booted} after reboot", simulated=True)


class _NoAnswer(DeviceFailure):
    """The broker did not answer a connect or subscribe in time, or the connection went."""


class _Dropped(Exception):
    """The simulated mid-transfer abort, with where to resume."""

    def __init__(self, offset: int, total: int) -> None:
        super().__init__(offset)
        self.offset, self.total = offset, total


# ---------------------------------------------------------------------- public API


async def run_device(cfg: DeviceConfig, gate: asyncio.Semaphore | None = None) -> DeviceResult:
    """Run one device to its end; never raises for protocol or network trouble.
    `gate` bounds how many devices connect at the same moment."""
    device = Device(cfg, gate)
    result = device.result
    start = time.monotonic()
    try:
        async with asyncio.timeout(cfg.timeout):
            try:
                await device.run()
                result.outcome = "upgraded"
            except DeviceFailure as exc:
                if exc.step is not None:
                    await _report_failure(device, exc)
                raise
            finally:
                result.bytes_downloaded = device.received
                with contextlib.suppress(Exception):
                    await device.link.close()
    except NoUpgrade as exc:
        result.outcome, result.reason = "no_upgrade", str(exc)
    except DeviceFailure as exc:
        result.outcome, result.step, result.reason = "failed", exc.step, exc.reason
        result.expected = exc.simulated  # only the failure the config asked for is ok
    except TimeoutError:
        result.outcome, result.reason = "timeout", f"{cfg.timeout:g} s {device.stage}"
        if device.stage == "waiting for upgrade push":
            result.reason += " (no batch wants it: already upgraded, not targeted, or the batch does not push)"
    except Exception as exc:  # noqa: BLE001 -- one broken device must not end the fleet
        result.outcome, result.reason = "failed", f"{device.stage}: {describe(exc)}"
    result.seconds = time.monotonic() - start
    if result.outcome == "upgraded":
        result.expected = cfg.fail_step is None and not cfg.boot_fail and cfg.expect == "upgrade"
    elif result.outcome == "no_upgrade":
        result.expected = cfg.expect == "no-upgrade"
    return result


async def _report_failure(device: Device, exc: DeviceFailure) -> None:
    """Report the negative step (c) like firmware would; best effort on the open link."""
    with contextlib.suppress(DeviceFailure):
        await device.link.report_progress(exc.step, exc.reason)


async def run_fleet(cfgs: Sequence[DeviceConfig], concurrency: int = 200,
                    on_result: Callable[[DeviceResult], None] | None = None) -> list[DeviceResult]:
    """Run all devices at once (at most `concurrency` connecting at a time); results in
    `cfgs` order. `on_result` sees each result as soon as its device ends."""
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(cfg: DeviceConfig) -> DeviceResult:
        result = await run_device(cfg, gate)
        if on_result is not None:
            on_result(result)
        return result

    return list(await asyncio.gather(*(one(c) for c in cfgs)))



def _run_slice(cfgs: Sequence[DeviceConfig], concurrency: int) -> list[DeviceResult]:
    return asyncio.run(run_fleet(cfgs, concurrency))


async def run_fleet_split(cfgs: Sequence[DeviceConfig], concurrency: int, procs: int,
                          pool: concurrent.futures.Executor | None = None) -> list[DeviceResult]:
    """`run_fleet` split over `procs` processes (those of `pool`, or spawned for this call):
    one Python process of simulated devices is saturated long before the server is, and a
    benchmark must measure the server. Results in `cfgs` order."""
    if procs <= 1:
        return await run_fleet(cfgs, concurrency)
    loop = asyncio.get_running_loop()
    spawned = concurrent.futures.ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) \
        if pool is None else None
    try:
        parts = await asyncio.gather(*(loop.run_in_executor(pool or spawned, _run_slice, cfgs[i::procs],
                                                            max(1, concurrency // procs)) for i in range(procs)))
    finally:
        if spawned is not None:
            spawned.shutdown()
    results = {r.device_name: r for part in parts for r in part}
    return [results[c.device_name] for c in cfgs]

# ---------------------------------------------------------------------------- CLI


def parse_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or "]" in port:  # no port given (or a bare [v6] address)
        host, port = value, "1883"
    try:
        return host.strip("[]") or "127.0.0.1", int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}") from None


EXAMPLES = """examples:
  device_sim.py                                 one device cam-0001 waits for a push
  device_sim.py --count 1000 --quiet            a fleet; only the totals line
  device_sim.py --devices gw-0001 --product a1GateWay --module MCU --ask
  device_sim.py --drop-at 50 --chunk 0          one open Range request, cut at 50%, resumed
  device_sim.py --fail-step -3                  report "verify failed"; exit 0 if it did
  device_sim.py --version 2.0.0 --push-wait 3 --expect no-upgrade
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="device_sim.py",
        description="Simulate OTA devices (Aliyun/SagooIoT Alink OTA over MQTT; the SDKs it "
                    "mimics are in docs/devices.md): connect, report the version, take an upgrade, download, "
                    "verify, report progress, reboot and report the new version. Prints one "
                    "line per device and a totals line; exits 1 if any device ended other "
                    "than expected.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    conn = p.add_argument_group("connection")
    conn.add_argument("--mqtt", type=parse_host_port, default="127.0.0.1:1883", metavar="HOST:PORT",
                      help="MQTT broker address (default: %(default)s)")
    conn.add_argument("--product", default="a1DemoCam", help="productKey (default: %(default)s)")
    secret = conn.add_mutually_exclusive_group()
    secret.add_argument("--secret", help="device secret (the same for every device)")
    secret.add_argument("--product-secret", default="demo-product-secret",
                        help="derive each device secret as hex(HMAC-SHA256(product secret, dn)) "
                             "(default: %(default)s)")
    conn.add_argument("--plain-password", action="store_true",
                      help="send the device secret as password (client id = dn) instead of the "
                           "signed form")
    conn.add_argument("--sign-method", choices=sorted(SIGN_METHODS), default="hmacsha256",
                      help="signmethod of the signed password (default: %(default)s)")
    conn.add_argument("--insecure", action="store_true", help="do not verify HTTPS certificates")
    conn.add_argument("--cafile", help="CA bundle to verify HTTPS downloads with")

    fleet = p.add_argument_group("devices")
    names = fleet.add_mutually_exclusive_group()
    names.add_argument("--devices", help="comma-separated device names")
    names.add_argument("--count", type=int, default=1, help="simulate N devices named PREFIX0001.. (default: 1)")
    fleet.add_argument("--prefix", default="cam-", help="device name prefix for --count (default: %(default)s)")
    fleet.add_argument("--first", type=int, default=1, help="number of the first device for --count (default: 1)")
    fleet.add_argument("--version", default="1.0.0", help="firmware version the devices run (default: %(default)s)")
    fleet.add_argument("--module", default="default", help="OTA module (default: %(default)s)")
    fleet.add_argument("--concurrency", type=int, default=200, help="max devices connecting at once (default: %(default)s)")
    fleet.add_argument("--timeout", type=float, default=60.0, help="seconds per device before it counts as failed (default: %(default)s)")

    flow = p.add_argument_group("behaviour")
    flow.add_argument("--ask", action="store_true",
                      help="ask with thing/ota/firmware/get instead of waiting for a push")
    flow.add_argument("--push-wait", type=float, metavar="SECONDS",
                      help="no push within this time ends the device as 'no upgrade' "
                           "(default: wait until --timeout)")
    flow.add_argument("--expect", choices=["upgrade", "no-upgrade"], default="upgrade",
                      help="which outcome counts as success for the exit code (default: upgrade)")
    flow.add_argument("--chunk", type=int, default=65536,
                      help="bytes per HTTP Range request or MQTT block (MQTT: clamped to "
                           "256..131072); 0 = one open-ended Range request (default: %(default)s)")
    flow.add_argument("--drop-at", type=float, metavar="PERCENT",
                      help="drop the connection once at this download percentage, then resume")
    flow.add_argument("--progress-every", type=int, default=25, metavar="PERCENT",
                      help="report download progress every PERCENT, 0 = never (default: %(default)s)")
    flow.add_argument("--fail-step", type=int, choices=[-1, -2, -3, -4],
                      help="simulate a failure: -1 upgrade (before download), -2 download "
                           "(at 50%%), -3 verify, -4 flash")
    flow.add_argument("--boot-fail", action="store_true",
                      help="after installing, report the old version (the image did not boot)")
    flow.add_argument("--base-image", metavar="PATH",
                      help="current image: diff pushes are patched with bsdiff4 and checked "
                           "against extData _target_size/_target_sign")
    p.add_argument("--quiet", action="store_true", help="print only the totals line")
    return p


def configs_from_args(args: argparse.Namespace) -> list[DeviceConfig]:
    if args.devices:
        names = [n.strip() for n in args.devices.split(",") if n.strip()]
    else:
        names = [f"{args.prefix}{i:04d}" for i in range(args.first, args.first + args.count)]
    host, port = args.mqtt  # argparse applies `type` to the string default too
    return [DeviceConfig(
        device_name=name, product_key=args.product, device_secret=args.secret,
        product_secret=args.product_secret, version=args.version, module=args.module,
        mqtt_host=host, mqtt_port=port, ask=args.ask, plain_password=args.plain_password,
        sign_method=args.sign_method, chunk=args.chunk, drop_at=args.drop_at,
        fail_step=args.fail_step, boot_fail=args.boot_fail, base_image=args.base_image,
        timeout=args.timeout, push_wait=args.push_wait, expect=args.expect,
        progress_every=args.progress_every, tls_insecure=args.insecure, cafile=args.cafile,
    ) for name in names]


def totals_line(results: Sequence[DeviceResult], seconds: float) -> str:
    count = {o: sum(r.outcome == o for r in results) for o in ("upgraded", "no_upgrade")}
    failed = len(results) - count["upgraded"] - count["no_upgrade"]
    return (f"{len(results)} devices: {count['upgraded']} upgraded, {failed} failed, "
            f"{count['no_upgrade']} no upgrade in {seconds:.2f} s")


async def main_async(args: argparse.Namespace) -> int:
    cfgs = configs_from_args(args)
    printer = None if args.quiet else (lambda r: print(r.summary(), flush=True))
    start = time.monotonic()
    results = await run_fleet(cfgs, args.concurrency, printer)
    print(totals_line(results, time.monotonic() - start), flush=True)
    return 0 if all(r.expected for r in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.drop_at is not None and not 0 < args.drop_at < 100:
        parser.error("--drop-at must be between 0 and 100 (exclusive)")
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        return 130
