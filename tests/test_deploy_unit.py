"""deploy/ota-server.service: the keys docs/operations.md ("Running as a service") promises,
and, where systemd-analyze is installed, systemd's own check of the unit."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "deploy" / "ota-server.service"
EXEC = "/opt/ota-server/venv/bin/ota-server"


def unit_keys() -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        keys.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return keys


def test_unit_has_the_documented_keys() -> None:
    keys = unit_keys()
    expected = {
        "Service.User": "ota", "Service.Group": "ota", "Service.WorkingDirectory": "/var/lib/ota-server",
        "Service.ExecStart": f"{EXEC} --config /etc/ota-server/broker.yaml",
        "Service.ExecReload": "/bin/kill -HUP $MAINPID", "Service.Restart": "on-failure",
        "Service.LimitNOFILE": "65536", "Service.NoNewPrivileges": "yes", "Service.ProtectSystem": "strict",
        "Service.ReadWritePaths": "/var/lib/ota-server", "Service.ProtectHome": "yes", "Service.PrivateTmp": "yes",
        "Service.StateDirectory": "ota-server", "Install.WantedBy": "multi-user.target",
    }
    for key, value in expected.items():
        assert keys.get(key) == [value], (key, keys.get(key))
    stop = keys["Service.TimeoutStopSec"][0]
    assert stop.endswith("s") and int(stop[:-1]) >= 30  # the journal's last commits, retried ~5 s on a bad disk
    assert "AF_UNIX" in keys["Service.RestrictAddressFamilies"][0]  # the data_dir lock's abstract socket
    docs = (UNIT.parents[1] / "docs" / "operations.md").read_text(encoding="utf-8")
    for path in ("/etc/ota-server/broker.yaml", "/var/lib/ota-server", "/opt/ota-server/venv", "deploy/ota-server.service"):
        assert path in docs, path


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd); the unit's keys are "
                    "checked by test_unit_has_the_documented_keys")
    # The unit names the installed venv; point it at this one so verify can check the command.
    server = Path(sys.executable).parent / "ota-server"
    unit = tmp_path / "ota-server.service"
    unit.write_text(UNIT.read_text(encoding="utf-8").replace(EXEC, str(server)), encoding="utf-8")
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0 and "Failed to connect" in result.stderr + result.stdout:
        pytest.skip(f"systemd-analyze cannot run here: {result.stderr.strip()[:200]}")
    # A bad value or unknown key is only a warning ("..., ignoring"): any output is a failure.
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), \
        result.stderr + result.stdout
