"""Device-side helpers shared by the tests and the scripts: what firmware does, written
without anything from the server (it imports neither otacore nor broker_plugin).

- `signing`: the Aliyun device secret and signed MQTT password
- `mqtt_wire`: MQTT 3.1.1 packets built and read by hand, and raw sockets to send them on
- `mqtt_client`: a compact asyncio MQTT client for thousands of devices in one process
- `alink`: the device's view of the Alink OTA protocol (offers, block replies, CRC-16)
- `simulator`: simulated devices that upgrade end to end (`scripts/device_sim.py`)
- `hostile`: hostile network peers (`scripts/hostile_clients.py`)
- `loopback`: an `ota-server` process on free 127.0.0.1 ports, for tests and benchmarks

Installed as the top-level package `devicekit` (pyproject.toml maps it to scripts/devicekit).
"""
