"""The real unit under a real systemd (../shared/tools/systemd-lab); root only."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers import apply

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT.parent / "shared" / "tools" / "systemd-lab"


def lab_unavailable() -> str | None:
    if not LAB.exists():
        return f"{LAB} is absent (a user's clone has no ../shared)"
    if os.geteuid() != 0:
        return "systemd-lab needs root"
    if not (ROOT / ".venv" / "bin" / "sandboxd").exists():
        return "the project's .venv is not installed (run `make test`)"
    return None


pytestmark = [
    pytest.mark.systemd,
    pytest.mark.skipif(lab_unavailable() is not None, reason=lab_unavailable() or ""),
]


@pytest.mark.timeout(120)
async def test_unit_starts_ready_fills_pools_and_stops_clean(redis, redis_server):
    await apply(redis, [{"name": "default", "min_ready": 2, "max_total": 4}])
    proc = subprocess.run(
        [str(LAB), "bash", str(ROOT / "tests/systemd/check.sh"), str(ROOT), redis_server],
        env={**os.environ, "LAB_BIND": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=110,
    )
    results: dict = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            results.update(json.loads(line[len("RESULT ") :]))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert results["verify_rc"] == 0, results["verify_output"]
    assert (results["start_rc"], results["state_after_start"]) == (0, "active")
    assert results["substate_after_start"] == "running"
    # Type=notify: start returned only after the first reconcile, which started the creates.
    assert sum(p["total"] for p in results["pools_after_start"]) >= 1
    assert results["ready_before_stop"] >= 2 and results["agents_before_stop"] >= 2
    assert (results["stop_rc"], results["state_after_stop"]) == (0, "inactive")
    assert results["result_after_stop"] == "success" and results["stop_seconds"] < 15
    assert results["agents_after_stop"] == 0
    logs = [json.loads(line) for line in results["journal"].splitlines() if line.startswith("{")]
    messages = [entry["message"] for entry in logs]
    assert "sandboxd ready" in messages and "sandboxd stopped" in messages
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in logs)
