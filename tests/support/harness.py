"""Test harness: the real OTA server on free loopback ports, and a real MQTT device client.

`OtaServer` runs amqtt's Broker with our plugins in the test's event loop, on 127.0.0.1,
with a catalog and data dir under tmp_path. `Device` is an aiomqtt (paho) client that
speaks docs/protocol.md like firmware would. `write_catalog` writes the test catalog
(product a1Test, firmware 1.0.0 and 1.1.0) with the batches a test needs.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import ssl
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiomqtt
from amqtt.broker import Broker

from broker_plugin.ota import OtaPlugin
from devicekit.loopback import free_port  # noqa: F401  (re-exported for the tests)
from devicekit.signing import derive_device_secret

PK = "a1Test"
PRODUCT_SECRET = "test-product-secret"


def device_secret(device_name: str, product_secret: str = PRODUCT_SECRET) -> str:
    """The secret of a test device: derived from the product secret, as devices do."""
    return derive_device_secret(product_secret, device_name)


def make_firmware(path: Path, size: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def url_job(url: str) -> int:
    """The job id a download URL names: its `job` parameter."""
    return int(parse_qs(urlsplit(url).query)["job"][0])


def job_of(push: dict[str, Any]) -> int:
    """The job id a push names: its URL's `job` parameter."""
    return url_job(push["data"]["url"])


BASE_CATALOG = """
packages_dir: packages
products:
  - key: a1Test
    name: Test product
    secret: test-product-secret
    modules:
      - name: MCU
packages:
  - {id: fw-1.0.0, product: a1Test, version: 1.0.0, file: fw-1.0.0.bin, sign_method: SHA256}
  - {id: fw-1.1.0, product: a1Test, version: 1.1.0, file: fw-1.1.0.bin, sign_method: MD5}
"""
# A pushed, dynamic upgrade to fw-1.1.0 over http (the `server` fixture's), and one over MQTT blocks.
UPGRADE_BATCH = """
- name: up-1.1.0
  package: fw-1.1.0
  type: upgrade
  protocol: http
  mode: dynamic
  push: true
"""
MQTT_BATCH = "- {name: over-mqtt, package: fw-1.1.0, type: upgrade, protocol: mqtt, mode: dynamic, push: true}\n"


def write_catalog(root: Path, batches_yaml: str = "", extra: str = "", base: str = BASE_CATALOG) -> Path:
    """Catalog with firmware 1.0.0 and 1.1.0 (files created once) plus the given batches."""
    packages = root / "packages"
    if not (packages / "fw-1.0.0.bin").exists():
        make_firmware(packages / "fw-1.0.0.bin", 150_000, 1)
        make_firmware(packages / "fw-1.1.0.bin", 160_000, 2)
    path = root / "ota.yaml"
    text = textwrap.dedent(base) + textwrap.dedent(extra)
    if batches_yaml:
        text += "batches:\n" + textwrap.indent(textwrap.dedent(batches_yaml), "  ")
    path.write_text(text, encoding="utf-8")
    return path


async def until(check: Callable[[], Any], timeout: float = 5.0) -> bool:
    """Poll `check` every 50 ms until it holds (True) or `timeout` s have passed (its last answer)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if check():
            return True
        await asyncio.sleep(0.05)
    return bool(check())


class OtaServer:
    def __init__(self, root: Path, *, mqtt_port: int | None = None, http_port: int | None = None,
                 options: dict[str, Any] | None = None, listener: dict[str, Any] | None = None) -> None:
        self.root = root
        self.listener = listener or {}
        self.mqtt_port = mqtt_port or free_port()
        self.http_port = http_port or free_port()
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.options = options or {}
        self.broker: Broker | None = None

    def config(self) -> dict[str, Any]:
        ota = {"catalog": str(self.root / "ota.yaml"), "data_dir": str(self.root / "var"),
               "http": {"bind": f"127.0.0.1:{self.http_port}", "public_url": self.http_url},
               "base_dir": str(self.root)}
        ota.update(self.options)
        return {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.mqtt_port}", **self.listener}},
                "plugins": {"broker_plugin.auth.DeviceAuthPlugin": {}, "broker_plugin.acl.DeviceTopicPlugin": {},
                            "broker_plugin.ota.OtaPlugin": ota}}

    async def start(self) -> "OtaServer":
        self.broker = Broker(self.config())
        await self.broker.start()
        error = self.plugin.runtime.startup_error
        if error is not None:
            await self.broker.shutdown()
            raise error
        return self

    async def stop(self) -> None:
        if self.broker is not None:
            await self.broker.shutdown()
            self.broker = None

    async def __aenter__(self) -> "OtaServer":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    @property
    def plugin(self) -> OtaPlugin:
        assert self.broker is not None
        plugin = self.broker.plugins_manager.get_plugin("OtaPlugin")
        assert isinstance(plugin, OtaPlugin)
        return plugin

    @property
    def engine(self):  # type: ignore[no-untyped-def]
        return self.plugin.runtime.engine

    @property
    def admin_token(self) -> str:
        return self.plugin.runtime.admin_token

    async def job_state(self, device_name: str, batch: str | None = None) -> str | None:
        jobs = [j for j in await self.engine.store.jobs(batch) if j.device.device_name == device_name]
        return jobs[-1].state if jobs else None

    async def wait_state(self, device_name: str, state: str, timeout: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while (current := await self.job_state(device_name)) != state:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{device_name}: job state {current!r}, expected {state!r}")
            await asyncio.sleep(0.02)


class Device:
    """One device: connects, subscribes to its downstream OTA topics, collects what arrives."""

    def __init__(self, server: OtaServer, name: str, *, secret: str | None = None, client_id: str | None = None,
                 product_key: str = PK, keepalive: int = 60, subscribe: bool = True,
                 tls: ssl.SSLContext | None = None) -> None:
        self.server, self.name, self.pk = server, name, product_key
        self.secret = secret if secret is not None else device_secret(name)
        self.client_id = client_id or name
        self.keepalive = keepalive
        self.tls = tls  # MQTT over TLS with this client context
        self.subscribe_ota = subscribe  # False: like linkkit, which relies on the broker
        self.inbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._client: aiomqtt.Client | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ids = 0
        self.disconnected = False

    async def __aenter__(self) -> "Device":
        self._client = aiomqtt.Client("127.0.0.1", self.server.mqtt_port, identifier=self.client_id,
                                      username=f"{self.name}&{self.pk}", password=self.secret,
                                      keepalive=self.keepalive, tls_context=self.tls,
                                      socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        await self._client.__aenter__()
        for topic in (f"/ota/device/upgrade/{self.pk}/{self.name}",
                      f"/sys/{self.pk}/{self.name}/thing/ota/firmware/get_reply",
                      f"/sys/{self.pk}/{self.name}/thing/file/download_reply"):
            if self.subscribe_ota:
                await self._client.subscribe(topic, qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.__aexit__(None, None, None)

    async def _read(self) -> None:
        assert self._client is not None
        try:
            async for message in self._client.messages:
                await self.inbox.put((str(message.topic), bytes(message.payload)))
        except aiomqtt.MqttError:
            self.disconnected = True  # the server closed the connection

    def _next_id(self) -> str:
        self._ids += 1
        return str(self._ids)

    async def publish(self, topic: str, payload: Any, qos: int = 1) -> None:
        assert self._client is not None
        data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
        await self._client.publish(topic, data, qos=qos)

    async def subscribe(self, topic: str) -> None:
        assert self._client is not None
        await self._client.subscribe(topic, qos=1)

    async def inform(self, version: str, module: str | None = None) -> None:
        params: dict[str, Any] = {"version": version}
        if module:
            params["module"] = module
        await self.publish(f"/ota/device/inform/{self.pk}/{self.name}", {"id": self._next_id(), "params": params})

    async def progress(self, step: Any, desc: str = "", module: str | None = None) -> None:
        params: dict[str, Any] = {"step": step, "desc": desc}
        if module:
            params["module"] = module
        await self.publish(f"/ota/device/progress/{self.pk}/{self.name}", {"id": self._next_id(), "params": params})

    async def firmware_get(self, module: str | None = None) -> dict[str, Any]:
        params = {"module": module} if module else {}
        await self.publish(f"/sys/{self.pk}/{self.name}/thing/ota/firmware/get",
                           {"id": self._next_id(), "version": "1.0", "params": params,
                            "method": "thing.ota.firmware.get"})
        return json.loads(await self.receive("get_reply"))

    async def receive(self, topic_suffix: str, timeout: float = 5.0) -> bytes:
        """The next message whose topic ends with `topic_suffix` (others are dropped)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: nothing on *{topic_suffix} within {timeout}s")
            topic, payload = await asyncio.wait_for(self.inbox.get(), remaining)
            if topic.endswith(topic_suffix):
                return payload

    async def next_push(self, timeout: float = 5.0) -> dict[str, Any]:
        return json.loads(await self.receive(f"/ota/device/upgrade/{self.pk}/{self.name}", timeout))

    async def expect_nothing(self, seconds: float = 0.5) -> None:
        try:
            topic, _ = await asyncio.wait_for(self.inbox.get(), seconds)
        except TimeoutError:
            return
        raise AssertionError(f"{self.name}: unexpected message on {topic}")
