import json

import pytest

from sandboxd.decode import BadValue
from sandboxd.health.rules import (
    KEPT_RESULTS,
    SandboxHealth,
    assess,
    pool_state,
    program_failed,
)
from sandboxd.providers.base import Probe
from sandboxd.spec import HealthSpec
from sandboxd.store.records import HealthCheck, SandboxRecord

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


def test_results_kept_are_the_last_five_written_as_the_record_has_them():
    health, _ = run(FAIL, *[OK] * 6)
    assert len(health.checks()) == KEPT_RESULTS
    assert health.checks()[-1] == {"at": "t", "ok": True, "latency_ms": 5, "detail": ""}


def test_a_records_checks_are_input_what_is_not_a_check_is_dropped():
    """A record's `health_checks` come from Redis (anyone may write there): what is not
    a check is left out when the record is read, never raised, and the rest is judged."""
    damaged = [
        {"at": "a", "ok": False, "latency_ms": 1.5, "detail": "x"},
        "not a dict",
        {"ok": True, "latency_ms": "NaN?"},
        {"ok": "yes"},  # not true: a failure
        None,
        [1, 2],
        {"ok": True, "latency_ms": 10**400},  # JSON allows it; a float does not
        {"ok": True, "latency_ms": float("nan")},
        {"ok": True, "latency_ms": float("inf")},
    ]
    kept = [r for r in map(HealthCheck.of, damaged) if r is not None]
    assert kept == [HealthCheck("a", False, 1.5, "x"), HealthCheck("", False, 0.0, "")]
    health = SandboxHealth()
    health.keep(*kept)
    assess(health, OK, SPEC, at="t")
    assert health.state == "degraded" and health.reason == "2 of the last 3 probes failed"


def test_a_record_keeps_its_checks_as_tuples_and_writes_them_as_objects():
    from tests.support import a_record

    written = (
        '[{"at":"a","ok":true,"latency_ms":2,"detail":""},"junk",{"ok":1},'
        '{"latency_ms":1' + "0" * 400 + "}]"
    )
    fields = {k: str(v) for k, v in a_record("sb-1").to_hash().items()}
    record = SandboxRecord.from_hash({**fields, "health_checks": written})
    assert record.health_checks == [HealthCheck("a", True, 2.0, ""), HealthCheck()]
    again = json.loads(record.to_hash()["health_checks"])
    assert again[0] == {"at": "a", "ok": True, "latency_ms": 2.0, "detail": ""}
    assert record.model_dump()["health_checks"][1] == {
        "at": "",
        "ok": False,
        "latency_ms": 0.0,
        "detail": "",
    }
    with pytest.raises(BadValue):  # not a list at all: the record is not valid
        SandboxRecord.from_hash({**fields, "health_checks": '{"at": "a"}'})
