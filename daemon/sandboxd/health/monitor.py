"""The health monitor: probes every ready and claimed sandbox, spread over its pool's
interval, concurrently with a bound, in its own task — a slow probe never stalls the
reconcile loop. It records health in each sandbox's record, publishes transitions, copies
the `run:` program's events and output to Redis, and wakes the reconciler when a sandbox
turns unhealthy (the reconciler decides what to do, from the records)."""

import asyncio
import heapq
import logging
import math
import random
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from sandboxd.config import Config
from sandboxd.health.rules import SandboxHealth, assess, pool_state, program_failed
from sandboxd.providers import Provider
from sandboxd.providers.base import Probe
from sandboxd.spec import PoolSpec
from sandboxd.store.events import EventPublisher, now_rfc3339
from sandboxd.store.loops import survive, wait_event, why
from sandboxd.store.records import SandboxRecord, SandboxStore

log = logging.getLogger(__name__)
PROBED = ("ready", "claimed")
WRITE_EVERY = 10  # a healthy sandbox's unchanged health is written every 10th probe
STATS_KEPT = 500  # probe results per pool behind the error rate and latency percentiles
QUANTUM_S = 0.05  # probes due this close together start at one wake-up of the loop
MAX_STRETCH = 1e6  # intervals are stretched at most this much (to the probe budget)


class HealthMonitor:
    def __init__(
        self,
        *,
        config: Config,
        store: SandboxStore,
        events: EventPublisher,
        providers: dict[str, Provider],
        nudge: Callable[[], None],
        pool_extras: Callable[[], dict[str, dict[str, Any]]] = dict,
    ):
        self._config = config
        self._store = store
        self._events = events
        self._providers = providers
        self._nudge = nudge
        self._pool_extras = pool_extras
        self._targets: dict[str, tuple[SandboxRecord, PoolSpec]] = {}
        self._health: dict[str, SandboxHealth] = {}
        self._cursor: dict[str, int] = {}  # program news seen, per sandbox
        self._next_check: dict[str, float] = {}  # when the next full probe is due
        self._written: dict[str, float] = {}  # when its health was last written (monotonic)
        self._summary: dict[str, dict[str, Any]] = {}
        self._summary_due = 0.0
        # Per pool, its sandboxes by health state, kept as states change (the summary
        # counts pools, not sandboxes).
        self._tally: dict[str, Counter[str]] = {}
        self._counted: dict[str, str] = {}  # the pool each sandbox is counted under
        self._due: dict[str, float] = {}
        # Probes by the quantum they are due in (`_slot`), and a heap of those quanta: a
        # probe is scheduled and started without a heap operation of its own.
        self._slots: dict[int, list[str]] = {}
        self._queue: list[int] = []
        self._running: set[str] = set()
        self._wake = asyncio.Event()
        self._asleep_until = 0.0  # while the loop sleeps: until when (monotonic)
        self._latency: dict[str, deque[float]] = {}
        self._outcomes: dict[str, deque[bool]] = {}
        self.probes = 0
        self.stretch = 1.0  # intervals times this: the probes a second within the budget

    def observe(self, records: list[SandboxRecord], specs: dict[str, PoolSpec]) -> None:
        """Called after every reconcile pass: what there is to probe now."""
        now = time.monotonic()
        targets = {}
        for record in records:
            spec = specs.get(record.pool)
            if spec is not None and record.state in PROBED:
                targets[record.id] = (record, spec)
        wanted = sum(1 / self._period(spec, stretched=False) for _, spec in targets.values())
        # (bounded: a budget of almost nothing must not stretch intervals to infinity)
        stretch = min(MAX_STRETCH, max(1.0, wanted / self._config.health_max_probes_per_s))
        if abs(stretch - self.stretch) > 0.05 * self.stretch:
            log.info(
                "health probe intervals stretched",
                extra={"factor": round(stretch, 2), "probes_per_s": round(wanted, 1)},
            )
            self.stretch = stretch
        for sandbox_id, (record, spec) in targets.items():
            if sandbox_id not in self._targets:
                self._adopt(record, spec, now)
            elif record.pool != self._counted[sandbox_id]:  # a record rewritten: its count moves
                state = self._health[sandbox_id].state
                self._tally[self._counted[sandbox_id]][state] -= 1
                self._tally.setdefault(record.pool, Counter())[state] += 1
                self._counted[sandbox_id] = record.pool
        for gone in self._targets.keys() - targets.keys():
            health, pool = self._health.get(gone), self._counted.pop(gone, None)
            if health is not None and pool is not None:
                self._tally[pool][health.state] -= 1
            for table in (self._health, self._cursor, self._next_check, self._due, self._written):
                table.pop(gone, None)
        self._targets = targets
        self._wake.set()

    def _adopt(self, record: SandboxRecord, spec: PoolSpec, now: float) -> None:
        """A sandbox new to the monitor (or to this daemon): its first probe falls at a
        random point of its interval, so a pool filled at once is not probed at once."""
        health = SandboxHealth(state=record.health, reason=record.health_reason)
        health.keep(*record.health_checks)  # checks already (store.records.HealthCheck)
        self._health[record.id] = health
        self._tally.setdefault(record.pool, Counter())[health.state] += 1
        self._counted[record.id] = record.pool
        self._cursor[record.id] = record.agent_seq
        self._next_check[record.id] = now + random.uniform(0, self._interval(spec))
        self._schedule(record.id, now + random.uniform(0, self._period(spec)))

    def _interval(self, spec: PoolSpec) -> float:
        """Between full probes of a sandbox of `spec`: its interval, stretched to the budget."""
        return spec.health.interval_s * self.stretch

    def _period(self, spec: PoolSpec, *, stretched: bool = True) -> float:
        """Between wake-ups for a sandbox of `spec` (more often than full probes for a
        `run:` program's news), stretched to `health_max_probes_per_s` unless told not."""
        base = spec.health.interval_s
        if spec.run is not None:
            base = min(base, self._config.agent_poll_interval_s)
        return base * self.stretch if stretched else base

    def _schedule(self, sandbox_id: str, due: float) -> None:
        self._due[sandbox_id] = due
        slot = _slot(due)
        waiting = self._slots.get(slot)
        if waiting is None:
            self._slots[slot] = [sandbox_id]
            heapq.heappush(self._queue, slot)
        else:
            waiting.append(sandbox_id)

    async def run(self) -> None:
        slots = asyncio.Semaphore(self._config.health_concurrency)
        report_due = time.monotonic() + self._config.health_report_interval_s
        async with asyncio.TaskGroup() as probes:
            while True:
                await self._sleep_until(report_due)
                now = time.monotonic()
                if now >= report_due:
                    await self._report()
                    report_due = now + self._config.health_report_interval_s
                # Probes due within the same quantum start together: one wake-up for
                # them, not one each (10,000 sandboxes at 30 s are 333 probes a second).
                for sandbox_id in self._pop_due(now):
                    await slots.acquire()
                    self._running.add(sandbox_id)
                    probes.create_task(self._probe(sandbox_id, slots), name=f"probe {sandbox_id}")

    async def _sleep_until(self, report_due: float) -> None:
        due = min([report_due] + ([self._queue[0] * QUANTUM_S] if self._queue else []))
        self._wake.clear()
        self._asleep_until = due
        try:
            await wait_event(self._wake, max(0.0, due - time.monotonic()))
        finally:
            self._asleep_until = 0.0

    def _pop_due(self, now: float) -> list[str]:
        """The probes due by `now` (those of every quantum begun by then), each once; an
        entry whose probe was rescheduled since, or whose sandbox left, is skipped."""
        out: list[str] = []
        while self._queue and self._queue[0] * QUANTUM_S <= now:
            slot = heapq.heappop(self._queue)
            for sandbox_id in self._slots.pop(slot):
                due = self._due.get(sandbox_id)
                if due is not None and _slot(due) == slot and sandbox_id not in self._running:
                    del self._due[sandbox_id]  # taken: rescheduled when its probe ends
                    out.append(sandbox_id)
        return out

    async def _probe(self, sandbox_id: str, slots: asyncio.Semaphore) -> None:
        try:
            await self._probe_one(sandbox_id)
        except RedisError as exc:
            if not survive(exc):
                raise
            log.warning("probe result not recorded, %s: %s", why(exc), exc)
        except Exception:  # a bug in one probe must not stop the monitoring of all
            log.exception("probe failed", extra={"sandbox": sandbox_id})
        finally:
            slots.release()
            self._running.discard(sandbox_id)
            target = self._targets.get(sandbox_id)
            if target is not None:
                due = time.monotonic() + self._period(target[1])
                self._schedule(sandbox_id, due)
                if due < self._asleep_until:  # the loop sleeps past it: wake it sooner
                    self._wake.set()

    async def _probe_one(self, sandbox_id: str) -> None:
        target = self._targets.get(sandbox_id)
        provider = self._providers.get(target[0].provider) if target else None
        if target is None or provider is None:
            return
        record, spec = target
        # Started at the beginning of its quantum: up to QUANTUM_S before it was due. A
        # full check due by the end of it is made now (else it would wait a whole period).
        full = time.monotonic() + QUANTUM_S >= self._next_check.get(sandbox_id, 0)
        probe = await provider.probe(
            sandbox_id, record.handle, spec.health if full else None, self._cursor[sandbox_id]
        )
        self.probes += 1
        failed_program = await self._program_news(record, probe)
        if full or not probe.alive or failed_program:
            self._next_check[sandbox_id] = time.monotonic() + self._interval(spec)
            await self._assess(record, spec, probe, failed_program)

    async def _program_news(self, record: SandboxRecord, probe: Probe) -> str:
        """Copy the program's new events and lines to Redis; its failure reason, if failed."""
        program = probe.program
        if not program or record.id not in self._cursor:
            return ""
        events = [
            self._events.build(
                e["type"],
                pool=record.pool,
                sandbox=record.id,
                **{k: v for k, v in e.items() if k not in ("type", "seq")},
            )
            for e in program["events"]
        ]
        if program["seq"] != self._cursor[record.id]:
            await self._store.agent_news(
                record.id,
                program["seq"],
                events,
                program["lines"],
                events_maxlen=self._events.maxlen,
                logs_maxlen=self._config.agent_log_lines,
            )
            self._cursor[record.id] = program["seq"]
        return program["reason"] if program["state"] == "failed" else ""

    async def _assess(
        self, record: SandboxRecord, spec: PoolSpec, probe: Probe, failed_program: str
    ) -> None:
        health = self._health.get(record.id)
        if health is None:
            return
        before = health.state
        changed = assess(health, probe, spec.health, now_rfc3339())
        if failed_program:
            changed = program_failed(health, failed_program) or before != health.state
        pool = self._counted.get(record.id)
        if health.state != before and pool is not None:
            tally = self._tally[pool]
            tally[before] -= 1
            tally[health.state] += 1
        self._latency.setdefault(record.pool, deque(maxlen=STATS_KEPT)).append(probe.latency_ms)
        self._outcomes.setdefault(record.pool, deque(maxlen=STATS_KEPT)).append(probe.ok)
        # A passing probe that changes nothing is written with a later one (every
        # WRITE_EVERY probes: the record's recent checks stay fresh), not each time: the
        # probes of 10,000 sandboxes would otherwise be hundreds of writes a second.
        now = time.monotonic()
        quiet = probe.ok and not changed and not failed_program
        if quiet and now < self._written.get(record.id, 0.0) + self._interval(spec) * (
            WRITE_EVERY - 0.5
        ):
            return
        self._written[record.id] = now
        fields: dict[str, Any] = {
            "health": health.state,
            "health_reason": health.reason,
            "health_checks": health.checks(),
        }
        if changed:
            fields["health_changed_at"] = now_rfc3339()
        current = await self._store.set_health(record.id, **fields)
        if current is None or not changed:
            return
        await self._publish_change(record, before, health, probe, current)

    async def _publish_change(
        self,
        record: SandboxRecord,
        before: str,
        health: SandboxHealth,
        probe: Probe,
        current: list[str],
    ) -> None:
        state, claimant, claim_id = current
        claim = {"claimant": claimant, "claim_id": claim_id} if state == "claimed" else {}
        await self._events.publish(
            "sandbox.health_changed",
            pool=record.pool,
            sandbox=record.id,
            **{"from": before},
            to=health.state,
            reason=health.reason,
            state=state,
            consecutive_failures=health.consecutive_failures,
            latency_ms=probe.latency_ms,
            **claim,
        )
        log.info(
            "sandbox health changed",
            extra={"sandbox": record.id, "pool": record.pool, "health": health.state},
        )
        if health.state == "unhealthy":
            self._nudge()

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per pool: sandboxes by health, score, state, error rate, probe latency. The
        sandboxes are counted as their states change; the percentiles sort each pool's
        last STATS_KEPT probes: an answer is reused for 500 times as long as it took."""
        now = time.monotonic()
        if now >= self._summary_due:
            self._summary = self._count()
            self._summary_due = now + (time.monotonic() - now) * 500
        return {pool: dict(facts) for pool, facts in self._summary.items()}

    def _count(self) -> dict[str, dict[str, Any]]:
        pools: dict[str, dict[str, Any]] = {}
        for pool, tally in self._tally.items():
            if any(n > 0 for n in tally.values()):
                states = ("healthy", "degraded", "unhealthy", "unknown")
                pools[pool] = {state: tally[state] for state in states}
        for pool, counts in pools.items():
            probed = sum(counts.values()) - counts["unknown"]
            score = counts["healthy"] / probed if probed else None
            outcomes = self._outcomes.get(pool, ())
            latency = sorted(self._latency.get(pool, ()))
            counts.update(
                score=None if score is None else round(score, 3),
                state=pool_state(score),
                error_rate=round(outcomes.count(False) / len(outcomes), 3) if outcomes else 0.0,
                probe_p50_ms=_percentile(latency, 0.50),
                probe_p95_ms=_percentile(latency, 0.95),
            )
        return pools

    async def _report(self) -> None:
        extras = self._pool_extras()
        pools = self.summary()
        for pool, extra in extras.items():
            breaker = extra.get("breaker")
            if pool in pools or breaker not in (None, "closed"):  # not every idle pool
                pools.setdefault(pool, {"state": "unknown"})["breaker"] = breaker
        await self._events.publish("health.report", pools=pools)


def _slot(due: float) -> int:
    """The quantum a probe due at `due` (monotonic s) falls in."""
    return math.floor(due / QUANTUM_S)


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)
