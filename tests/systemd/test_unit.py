"""The real unit under a real systemd (../shared/tools/systemd-lab); root only."""

import itertools
import json
import os
import subprocess
from pathlib import Path

import pytest
from tests.support import apply, free_port

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


@pytest.mark.timeout(160)
async def test_a_killed_active_unit_is_replaced_by_its_standby_and_comes_back_as_standby(
    redis, redis_server
):
    """Issue 17, case 6: sandboxd@a and sandboxd@b (one config: same node, same workspace)."""
    await apply(redis, [{"name": "default", "min_ready": 2, "max_total": 4}])
    results = run_lab("standby.sh", redis_server)
    assert results["verify_rc"] == 0, results["verify_output"]
    # the template is the unit: the same hardening, the same score
    assert results["exposure"]["sandboxd@a"] == results["exposure"]["sandboxd"] != ""

    # both units up; one daemon acts for the node, the other stands by and says so
    assert results["start_rc"] == 0
    assert (results["one_each_rc"], results["two_ready_rc"]) == (0, 0)
    units = results["units_before"]
    assert {(u["ActiveState"], u["SubState"]) for u in units.values()} == {("active", "running")}
    assert units["standby"]["StatusText"].startswith("standby for node lab-node")
    assert "reconciling revision" in units["active"]["StatusText"]
    lines = results["lines_before"]
    assert sorted(d["role"] for d in results["daemons_before"]) == ["active", "standby"]
    assert lines["active"]["role"] == "active" and lines["standby"]["role"] == "standby"
    assert {d["node"] for d in results["daemons_before"]} == {"lab-node"}
    assert lines["standby"]["active_instance"] == lines["active"]["instance"]
    assert lines["active"]["pid"] == int(units["active"]["MainPID"])
    assert lines["standby"]["pid"] == int(units["standby"]["MainPID"])
    ids = results["sandboxes_before"].split()
    assert len(ids) == 2 and results["ready_before"] == results["sandboxes_before"]

    # kill -9 of the active daemon: the standby takes over within the TTL and a little
    assert results["kill_rc"] == 0 and results["takeover_rc"] == 0, results
    assert results["takeover_s"] < 2 + 3, f"took over after {results['takeover_s']}s, TTL 2s"
    assert results["serving_rc"] == 0
    after = results["lines_after"]
    assert after["other"]["role"] == "active"
    assert after["other"]["epoch"] == results["old_epoch"] + 1
    assert after["other"]["instance"] == lines["standby"]["instance"]  # the same process
    other = results["units_after"]["other"]
    assert other["MainPID"] == units["standby"]["MainPID"] and other["NRestarts"] == "0"
    assert "reconciling revision" in other["StatusText"]
    # the same sandboxes, adopted: same ids, same agent processes, none created twice
    assert results["passed_rc"] == 0  # read after a whole reconcile pass of the new daemon
    assert results["sandboxes_after"] == results["sandboxes_before"]
    assert results["ready_after"] == results["ready_before"]
    assert results["agents_after"] == results["agents_before"] != ""
    events = results["events"]
    assert (events["sandbox.creating"], events["sandbox.ready"]) == (2, 2)  # the first fill only
    assert events["sandbox.adopted"] == 2 and "sandbox.terminated" not in events

    # systemd restarted the killed unit, and it came back as the standby of the new epoch
    assert results["restarted_rc"] == 0, results["units_after"]
    killed = results["units_after"]["killed"]
    assert killed["NRestarts"] == str(int(units["active"]["NRestarts"]) + 1)
    assert (killed["ActiveState"], killed["SubState"]) == ("active", "running")
    assert killed["MainPID"] != units["active"]["MainPID"]
    assert killed["StatusText"].startswith("standby for node lab-node")
    assert after["killed"]["role"] == "standby"
    assert after["killed"]["active_instance"] == after["other"]["instance"]
    assert sorted(d["role"] for d in results["daemons_after"]) == ["active", "standby"]
    journal = results["journal"]
    assert any("status=9/KILL" in m for m in journal["killed"])
    assert any(m.startswith("active for node lab-node") for m in journal["killed"])
    assert any(m.startswith("standby: node lab-node") for m in journal["killed"])
    assert any(m.startswith("standby: node lab-node") for m in journal["other"])
    took_over = f"active for node lab-node at epoch {results['old_epoch'] + 1}"
    assert any(m.startswith(took_over) for m in journal["other"])

    assert (results["stop_standby_rc"], results["stop_active_rc"]) == (0, 0)
    assert results["agents_after_stop"] == 0


@pytest.mark.timeout(120)
def test_stopping_redis_and_sandboxd_leaves_no_sandbox_in_one_transaction_or_redis_first():
    """Issue 21: a local Redis unit (redis-lab.service), sandboxd ordered after it by the
    drop-in of systemd/after-redis.sh; pools of 3."""
    results = run_lab("redis_down.sh", f"redis://127.0.0.1:{free_port()}/0")
    assert "redis-lab.service" in results["after"].split()
    assert "redis-lab.service" in results["wants"].split()

    # one transaction (a shutdown): sandboxd stopped (every record closed) before Redis
    assert (results["start1_rc"], results["agents_before1"]) == (0, 3)
    assert (results["stop1_rc"], results["agents_after1"]) == (0, 0)
    order = [line.split(" - ")[0] for line in results["order1"].splitlines()]
    assert order == [
        "Stopping sandboxd.service",
        "Stopped sandboxd.service",
        "Stopping redis-lab.service",
        "Stopped redis-lab.service",
    ]

    # `systemctl stop redis-lab sandboxd`: in whichever order systemd runs the two jobs
    assert (results["start3_rc"], results["agents_before3"]) == (0, 3)
    assert (results["stop3_rc"], results["agents_after3"]) == (0, 0)

    # Redis stopped first, for longer than the lease: still no sandbox left, in time
    assert (results["start2_rc"], results["agents_before2"]) == (0, 3)
    assert (results["redis_stop2_rc"], results["stop2_rc"]) == (0, 0)
    assert (results["agents_after2"], results["registry_after2"]) == (0, 0)
    assert results["result2"] == "success" and results["stop2_seconds"] < 15  # TimeoutStopSec=
    assert results["lapsed2_rc"] == 0  # the daemon outlived its lease, cut off from Redis
    # what Redis should say waits in the outbox for the next start: flagged, in order
    outbox = results["outbox_after2"]
    assert [e["type"] for e in outbox] == ["sandbox.terminated"] * 3 + ["daemon.stopping"]
    assert all(e["late"] for e in outbox)
    assert {e["reason"] for e in outbox[:3]} == {"shutdown"}
    messages = [entry["message"] for entry in journal_entries(results["journal"])]
    unreachable = [m for m in messages if m.startswith("Redis unreachable at stop")]
    assert 2 <= len(unreachable) <= 4  # the last stop (and the second, if Redis went first)
    assert messages.count("sandboxd stopped") == 3 and messages[-1] == "sandboxd stopped"
