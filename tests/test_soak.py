"""scripts/soak.py, briefly: 4 clients for 3 seconds against its own `featmap serve`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parent.parent / "scripts" / "soak.py"


def test_soak_runs_clean() -> None:
    result = subprocess.run(
        [sys.executable, str(SOAK), "--clients", "4", "--seconds", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["requests"] > 0
    assert report["unexpected"] == {}
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"} <= set(report["codes"])
    assert report["server_exit_code"] == 0
    assert report["server_rss_kib_start"] > 0
