"""The health monitor's books, kept as things change instead of recounted: the sandboxes
per pool by health state (the summary) against a count of every sandbox, and the probe
queue by quantum against what is due, after random sandboxes come and go and probes
pass, fail and find sandboxes gone."""

import asyncio
import math
import random
import time
from collections import Counter
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sandboxd.config import Config
from sandboxd.health.monitor import QUANTUM_S, HealthMonitor
from sandboxd.providers.base import Probe
from sandboxd.spec import PoolSpec
from tests.support import a_record

POOLS = {name: PoolSpec(name=name, health={"failure_threshold": 2}) for name in ("a", "b", "c")}
STATES = ("healthy", "degraded", "unhealthy", "unknown")
RECORDS = [a_record(f"sb-{i}", pool="abc"[i % 3]) for i in range(24)]


class Store:
    async def set_health(self, sandbox_id: str, **fields: Any) -> list[str]:
        return ["ready", "", ""]


class Events:
    maxlen = 100

    async def publish(self, *args: Any, **kwargs: Any) -> None:
        pass


class Provider:
    name = "local"

    def __init__(self) -> None:
        self.next = Probe(ok=True, alive=True)

    async def probe(self, sandbox_id: str, handle: Any, health: Any, since: int) -> Probe:
        return self.next


def monitor(provider: Provider | None = None, **config: Any) -> HealthMonitor:
    """A monitor of `provider` (none: probes find no provider) writing to the fakes above."""
    return HealthMonitor(
        config=Config(**config),
        store=Store(),  # type: ignore[arg-type]
        events=Events(),  # type: ignore[arg-type]
        providers={"local": provider} if provider else {},  # type: ignore[dict-item]
        nudge=lambda: None,
    )


def recount(m: HealthMonitor) -> dict[str, dict[str, int]]:
    """The summary's counts as the monitor counted them before: every sandbox."""
    pools: dict[str, Counter[str]] = {}
    for sandbox_id, (record, _) in m._targets.items():
        pools.setdefault(record.pool, Counter())[m._health[sandbox_id].state] += 1
    return {pool: {s: counts[s] for s in STATES} for pool, counts in pools.items()}


operations = st.lists(
    st.one_of(
        st.tuples(st.just("observe"), st.sets(st.integers(0, len(RECORDS) - 1))),
        st.tuples(st.just("repool"), st.integers(0, len(RECORDS) - 1), st.sampled_from("abc")),
        st.tuples(
            st.just("probe"),
            st.integers(0, len(RECORDS) - 1),
            st.sampled_from([(True, True, 1.0), (False, True, 1.0), (False, False, 0.0)]),
        ),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(operations)
@example(  # a kept sandbox whose record moved to another pool, probed, then gone
    [
        ("observe", {0}),
        ("repool", 0, "b"),
        ("observe", {0}),
        ("probe", 0, (False, True, 1.0)),
        ("observe", set()),
    ]
)
def test_the_counts_kept_equal_a_count_of_every_sandbox(ops):
    provider = Provider()
    m = monitor(provider)

    records = list(RECORDS)

    async def run() -> None:
        probes = 0
        for op in ops:
            if op[0] == "observe":
                m.observe([records[i] for i in sorted(op[1])], POOLS)
            elif op[0] == "repool":  # the record rewritten (by anyone): another pool
                records[op[1]] = a_record(RECORDS[op[1]].id, pool=op[2])
            else:
                _, i, (ok, alive, latency) = op
                provider.next = Probe(ok=ok, alive=alive, latency_ms=latency, detail="x")
                m._next_check[RECORDS[i].id] = 0.0  # a full probe
                await m._probe_one(RECORDS[i].id)  # nothing if it is not a target
                assert m.probes == probes + (RECORDS[i].id in m._targets)
                probes = m.probes
            counted = {p: {s: c[s] for s in STATES} for p, c in m._count().items()}
            assert counted == recount(m)

    asyncio.run(run())


@pytest.mark.parametrize("seed", range(20))
def test_each_due_probe_starts_once_in_its_quantum(seed):
    rng = random.Random(seed)
    m = monitor()
    due: dict[str, float] = {}
    for _ in range(300):
        sandbox_id = f"sb-{rng.randrange(120)}"  # some rescheduled, earlier or later
        due[sandbox_id] = rng.uniform(0, 10)
        m._schedule(sandbox_id, due[sandbox_id])
    started: list[tuple[float, str]] = []
    now = 0.0
    while m._queue:
        now = m._queue[0] * QUANTUM_S  # the loop wakes at the start of the next quantum
        started += [(now, s) for s in m._pop_due(now)]
    assert sorted(s for _, s in started) == sorted(due)  # each once, the last due only
    for at, sandbox_id in started:
        assert math.floor(due[sandbox_id] / QUANTUM_S) * QUANTUM_S == pytest.approx(at)


def test_a_running_probe_is_not_started_twice_and_is_scheduled_again():
    m = monitor()
    m._schedule("sb-1", 1.0)
    m._running.add("sb-1")
    assert m._pop_due(2.0) == []
    m._running.discard("sb-1")
    m._schedule("sb-1", 3.0)  # what the probe's end does
    assert m._pop_due(2.9) == [] and m._pop_due(3.0) == ["sb-1"]


def test_a_sandbox_that_left_is_not_probed():
    m = monitor()
    m.observe([RECORDS[0]], POOLS)
    m.observe([], POOLS)
    assert m._pop_due(math.ldexp(1, 40)) == []


def test_a_budget_of_almost_nothing_stretches_intervals_without_end():
    """A probe budget of 1e-320 a second (the setting accepts any positive number): the
    intervals are stretched a million times, not to infinity (which broke the pass)."""
    m = monitor(health_max_probes_per_s=1e-320)
    m.observe(RECORDS[:3], POOLS)
    assert m.stretch == 1e6 and all(math.isfinite(due) for due in m._due.values())


async def test_a_probe_started_early_in_its_quantum_is_the_full_check_due():
    """Probes start at the beginning of their 50 ms quantum, up to 50 ms before they are due:
    the full check due then is made (not put off a whole period: three failures in a row
    took 4.7 s instead of 2.8 at a 1 s interval)."""
    provider = Provider()
    provider.next = Probe(ok=False, alive=True, detail="x")
    m = monitor(provider)
    m.observe([RECORDS[0]], POOLS)
    sandbox_id = RECORDS[0].id
    m._next_check[sandbox_id] = time.monotonic() + QUANTUM_S * 0.9  # due within the quantum
    await m._probe_one(sandbox_id)
    assert m._health[sandbox_id].consecutive_failures == 1  # assessed: a full check
