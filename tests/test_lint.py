"""pyflakes over every Python file of the project: an undefined name on a rare path (an error
branch no test reaches) is found here rather than by the device or admin that takes it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["otacore", "otaserver", "broker_plugin", "fileserver", "cluster_worker", "scripts", "tests"]


def test_pyflakes_finds_nothing() -> None:
    result = subprocess.run([sys.executable, "-m", "pyflakes", *PACKAGES], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
