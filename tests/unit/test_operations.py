"""Reload rules, credentials, alert crossings, cost arithmetic, metric counting."""

import logging
from collections import Counter

from sandboxd.config import Config
from sandboxd.outputs.cost import accrue, summarize
from sandboxd.outputs.metrics import Metrics
from sandboxd.outputs.resources import Crossings
from sandboxd.reload import apply_changes
from sandboxd.spec import PoolSpec
from sandboxd.store.events import Event
from sandboxd.store.records import SandboxRecord


def test_reload_applies_live_settings_and_reports_the_rest():
    running = Config(reconcile_interval_s=5, key_prefix="a")
    fresh = Config(reconcile_interval_s=0.5, key_prefix="b", log_level="DEBUG")
    applied, needs_restart = apply_changes(running, fresh)
    assert sorted(applied) == ["log_level", "reconcile_interval_s"]
    assert needs_restart == ["key_prefix"]
    assert running.reconcile_interval_s == 0.5 and running.key_prefix == "a"
    assert logging.getLogger().level == logging.DEBUG
    logging.getLogger().setLevel(logging.WARNING)


def test_unit_credentials_are_read_when_set_and_empty_means_unset(tmp_path, monkeypatch):
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    (tmp_path / "e2b-api-key").write_text("")
    (tmp_path / "redis-password").write_text("s3cret\n")
    config = Config()
    assert config.e2b.resolve_api_key() is None
    assert config.resolve_redis_password() == "s3cret"
    (tmp_path / "e2b-api-key").write_text("e2b_key\n")
    assert config.e2b.resolve_api_key() == "e2b_key"
    assert Config(redis_password="explicit").resolve_redis_password() == "explicit"


def test_an_alert_fires_once_on_crossing_and_resolves_below_the_hysteresis():
    crossings = Crossings()
    seen = [crossings.check("k", v, 90, 5) for v in (50, 91, 95, 89, 86, 84, 92)]
    assert seen == [None, "firing", None, None, None, "resolved", "firing"]


def record(pool: str, state: str) -> SandboxRecord:
    return SandboxRecord(
        id=f"sb-{pool}-{state}",
        pool=pool,
        provider="local",
        state=state,
        template="base",
        spec_revision=1,
        instance="i",
    )


def test_cost_prices_idle_and_claimed_time_and_paused_is_free():
    config = Config()
    specs = {
        "a": PoolSpec(name="a", cpu=2, memory_mb=2048),
        "p": PoolSpec.model_validate(
            {"name": "p", "provider": "e2b", "cpu": 2, "memory_mb": 512, "e2b": {"idle": "pause"}}
        ),
    }
    records = [record("a", "ready"), record("a", "claimed"), record("p", "ready")]
    added = accrue(records, specs, config, seconds=10)
    per_s = 2 * 0.000014 + 2 * 0.0000045
    assert added["a"] == {
        "idle_s": 10,
        "idle_cost": 10 * per_s,
        "claimed_s": 10,
        "claimed_cost": 10 * per_s,
    }
    assert added["p"] == {"paused_s": 10, "paused_cost": 0.0}
    summary = summarize(added["a"])
    assert summary["idle_share"] == 0.5 and summary["cost"] == round(20 * per_s, 9)
    # From the view's counts per pool and state: the same, without walking the records.
    counts = {"a": Counter(ready=1, claimed=1, released=0), "p": Counter(ready=1)}
    assert accrue([], specs, config, seconds=10, counts=counts) == added
    assert summarize({})["idle_share"] is None


def test_metrics_count_events_by_type_and_pool():
    metrics = Metrics()
    for event in (
        Event(type="sandbox.ready", pool="a", data={"create_ms": 1500}),
        Event(type="sandbox.create_failed", pool="a", data={"retryable": False}),
        Event(type="sandbox.claimed", pool="a"),
        Event(type="sandbox.terminated", pool="a", data={"reason": "released"}),
    ):
        metrics.observe(event)
    value = metrics.registry.get_sample_value
    assert value("sandboxd_creates_total", {"pool": "a", "outcome": "ready"}) == 1
    assert value("sandboxd_creates_total", {"pool": "a", "outcome": "permanent"}) == 1
    assert value("sandboxd_create_duration_seconds_sum", {"pool": "a"}) == 1.5
    assert value("sandboxd_claims_total", {"pool": "a"}) == 1
    assert value("sandboxd_terminations_total", {"pool": "a", "reason": "released"}) == 1
    assert value("sandboxd_events_total", {"type": "sandbox.claimed"}) == 1
