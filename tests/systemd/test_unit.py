"""The real unit under a real systemd (../shared/tools/systemd-lab); root only."""

import itertools
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


def run_lab(script: str, redis_server: str) -> dict:
    """Run tests/systemd/SCRIPT inside a fresh systemd; its `RESULT {json}` lines, merged."""
    proc = subprocess.run(
        [str(LAB), "bash", str(ROOT / "tests/systemd" / script), str(ROOT), redis_server],
        env={**os.environ, "LAB_BIND": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=150,
    )
    results: dict = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            results.update(json.loads(line[len("RESULT ") :]))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return results


def journal_entries(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.timeout(120)
async def test_unit_starts_ready_fills_pools_and_stops_clean(redis, redis_server):
    await apply(redis, [{"name": "default", "min_ready": 2, "max_total": 4}])
    results = run_lab("check.sh", redis_server)
    assert results["verify_rc"] == 0, results["verify_output"]
    assert (results["start_rc"], results["state_after_start"]) == (0, "active")
    assert results["substate_after_start"] == "running"
    # Type=notify: start returned only after the first reconcile, which started the creates.
    assert sum(p["total"] for p in results["pools_after_start"]) >= 1
    assert results["ready_before_stop"] >= 2 and results["agents_before_stop"] >= 2
    # Under the hardened unit the sandboxes keep every protection: their own unprivileged
    # uids, seccomp, and cgroup limits (v1 here: the host's hierarchies shown to the lab).
    security = results["security"]
    assert security["isolation"] == "bwrap+userns+seccomp" and security["weaknesses"] == []
    assert security["limits"].startswith("cgroup")
    assert len(results["agent_uids"]) >= 2 and min(results["agent_uids"]) >= 1_000_000_000
    assert (results["stop_rc"], results["state_after_stop"]) == (0, "inactive")
    assert results["result_after_stop"] == "success" and results["stop_seconds"] < 15
    assert results["agents_after_stop"] == 0
    assert float(results["exposure"]) < 5.0  # systemd-analyze security: 9.6 unhardened
    logs = journal_entries(results["journal"])
    messages = [entry["message"] for entry in logs]
    assert "sandboxd ready" in messages and "sandboxd stopped" in messages
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in logs)


@pytest.mark.timeout(160)
async def test_reload_applies_live_and_the_watchdog_restarts_a_hung_daemon(redis, redis_server):
    await apply(redis, [{"name": "default", "min_ready": 2, "max_total": 4}])
    results = run_lab("operate.sh", redis_server)
    assert results["start_rc"] == 0 and len(results["ready_before"].split()) == 2

    # reload: same process, same sandboxes, new log level and interval, the rest reported
    assert (results["reload_rc"], results["reloaded_rc"]) == (0, 0)
    status = results["status_after_reload"]
    assert (status["log_level"], status["reconcile_interval_s"]) == ("DEBUG", 0.25)
    assert status["pid"] == results["pid_after_reload"] == results["pid_before"]
    assert results["ready_after_reload"] == results["ready_before"]
    reloaded = json.loads(results["reload_event"])["data"]
    assert {"log_level", "reconcile_interval_s"} <= set(reloaded["applied"])
    assert reloaded["needs_restart"] == ["health_concurrency"]
    stamps = [at for at, _ in results["debug_passes"]]
    gaps = sorted(b - a for a, b in itertools.pairwise(stamps))
    assert gaps[len(gaps) // 2] < 1_000_000  # µs: passes now ~0.25 s apart, not 2 s

    # watchdog: killed, restarted by systemd, the same sandboxes adopted (none recreated)
    assert results["restarted_rc"] == 0 and int(results["nrestarts"]) >= 1
    assert results["hang_file_left"] is False
    assert results["ready_after_restart"] == results["ready_before"]
    assert results["agents_after_restart"] == results["agents_before"]
    journal = results["journal"]
    assert "Watchdog timeout" in journal and "no more watchdog pings" in journal
    messages = [entry["message"] for entry in journal_entries(journal)]
    assert messages.count("sandboxd ready") >= 2
    assert (results["stop_rc"], results["agents_after_stop"]) == (0, 0)
