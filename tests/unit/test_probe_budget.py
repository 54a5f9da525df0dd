"""The health monitor keeps the probes a second within `health_max_probes_per_s`."""

import time

from sandboxd.config import Config
from sandboxd.health.monitor import HealthMonitor
from sandboxd.spec import PoolSpec
from sandboxd.store.records import SandboxRecord
from tests.support import a_record


def monitor(max_rate: float) -> HealthMonitor:
    config = Config(health_max_probes_per_s=max_rate)
    return HealthMonitor(config=config, store=None, events=None, providers={}, nudge=lambda: None)  # type: ignore[arg-type]


def records(n: int) -> list[SandboxRecord]:
    return [a_record(f"sb-{i}") for i in range(n)]


def test_intervals_stretch_to_the_budget_and_back():
    spec = PoolSpec(name="p", health={"interval_s": 2.0})
    m = monitor(max_rate=100)
    m.observe(records(50), {"p": spec})  # 25 probes a second: within the budget
    assert m.stretch == 1.0 and m._interval(spec) == 2.0
    before = time.monotonic()
    m.observe(records(1000), {"p": spec})  # 500 a second asked: 5 times the budget
    assert m.stretch == 5.0 and m._interval(spec) == 10.0
    new = [due for sandbox_id, due in m._due.items() if int(sandbox_id[3:]) >= 50]
    assert all(before <= due <= time.monotonic() + 10.0 for due in new)
    assert max(new) - min(new) > 5.0  # spread over the stretched interval
    m.observe(records(100), {"p": spec})  # fewer sandboxes: back to the pool's interval
    assert m.stretch == 1.0
