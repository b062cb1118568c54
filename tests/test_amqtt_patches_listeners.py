"""broker_plugin/amqtt_patches, the MQTT listeners: listeners.py (what they hold) and
tls_contexts.py (whose TLS context a listener gets). End to end: tests/test_tls.py."""
from __future__ import annotations

import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from amqtt.broker import BrokerError
from support.harness import OtaServer
from support.raw_mqtt import connack, device_connect, open_raw

from broker_plugin.amqtt_patches import mqtt_connections, mqtt_listening_sockets, set_tls_contexts
from support.harness import until as _until

ROOT = Path(__file__).resolve().parents[1]


async def test_the_listeners_sockets_and_connections_are_read_from_the_broker(server: OtaServer) -> None:
    assert server.broker is not None
    assert [sock.getsockname()[1] for sock in mqtt_listening_sockets(server.broker)] == [server.mqtt_port]
    assert mqtt_connections(server.broker) == 0
    reader, writer = await open_raw(server.mqtt_port)
    writer.write(device_connect("count-1"))
    assert await connack(reader) == 0
    assert mqtt_connections(server.broker) == 1
    writer.close()
    assert await _until(lambda: mqtt_connections(server.broker) == 0)


async def test_a_tls_listener_gets_its_context_from_the_hook(server: OtaServer, tmp_path: Path) -> None:
    assert server.broker is not None
    subprocess.run([str(ROOT / "scripts" / "dev-cert"), str(tmp_path / "tls")], check=True, capture_output=True)

    def make(listener: dict[str, Any]) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(listener["certfile"], listener["keyfile"])
        return context

    set_tls_contexts(server.broker, make)
    cert = {"certfile": str(tmp_path / "tls" / "dev-cert.pem"), "keyfile": str(tmp_path / "tls" / "dev-key.pem")}
    assert isinstance(server.broker._create_ssl_context(cert), ssl.SSLContext)
    with pytest.raises(BrokerError, match="needs certfile and keyfile"):
        server.broker._create_ssl_context({"certfile": cert["certfile"]})
    with pytest.raises(BrokerError, match="cannot use the listener's certfile"):
        server.broker._create_ssl_context({**cert, "keyfile": str(tmp_path / "missing.key")})
