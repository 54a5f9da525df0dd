from sandboxd.health.rules import SandboxHealth, assess, pool_state, program_failed
from sandboxd.providers.base import Probe
from sandboxd.spec import HealthSpec

SPEC = HealthSpec(command="true", failure_threshold=3, degraded_latency_ms=100)
OK = Probe(ok=True, alive=True, latency_ms=5)
FAIL = Probe(ok=False, alive=True, latency_ms=5, detail="probe exited 1")


def run(*probes: Probe) -> tuple[SandboxHealth, list[str]]:
    health, states = SandboxHealth(), []
    for probe in probes:
        assess(health, probe, SPEC, at="t")
        states.append(health.state)
    return health, states


def test_threshold_consecutive_failures_make_it_unhealthy_degraded_before():
    health, states = run(OK, FAIL, FAIL, FAIL)
    assert states == ["healthy", "degraded", "degraded", "unhealthy"]
    assert "probe exited 1" in health.reason and "3 failures in a row" in health.reason


def test_an_interrupted_streak_is_not_unhealthy_but_degraded_until_clean():
    _, states = run(FAIL, FAIL, OK, FAIL, FAIL, OK, OK, OK, OK, OK)
    assert "unhealthy" not in states
    assert states[-2:] == ["degraded", "healthy"]  # after 5 clean results


def test_slow_probe_is_degraded_and_agent_gone_is_unhealthy_at_once():
    _, states = run(Probe(ok=True, alive=True, latency_ms=150))
    assert states == ["degraded"]
    health, states = run(Probe(ok=False, alive=False, detail="agent gone"))
    assert states == ["unhealthy"] and health.reason == "agent gone"


def test_changes_are_reported_only_on_transitions():
    health = SandboxHealth()
    assert assess(health, OK, SPEC, at="t") is True  # unknown -> healthy
    assert assess(health, OK, SPEC, at="t") is False
    assert program_failed(health, "crashed") is True and health.state == "unhealthy"
    assert program_failed(health, "crashed") is False


def test_pool_state_thresholds():
    assert [pool_state(s) for s in (1.0, 0.9, 0.89, 0.7, 0.69, None)] == [
        "healthy",
        "healthy",
        "degraded",
        "degraded",
        "unhealthy",
        "unknown",
    ]
