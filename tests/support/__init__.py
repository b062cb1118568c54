"""Helpers of the test suite (tests/ is on sys.path: pyproject.toml's pytest `pythonpath`).

- `harness`: the server in the test's event loop (`OtaServer`), an aiomqtt `Device`, the test
  catalog (`write_catalog`, `UPGRADE_BATCH`, ...), test device secrets
- `processes`: real `ota-server` / `otactl` processes (`LiveServer`, `server_process`, `otactl`)
- `raw_mqtt`: MQTT packets by hand (devicekit.mqtt_wire) and a test device's CONNECT
- `link`: a raw MQTT device connection that counts every PUBACK
- `world`: the engine's decisions as plain calls on a fake clock, with invariants checked
- `faults`: the journal's database made to refuse writes

The device side (signing, MQTT packets, simulated devices) is devicekit, shared with scripts/.
Shared fixtures are in tests/conftest.py.
"""
