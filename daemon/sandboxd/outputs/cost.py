"""Cost accounting: per pool, sandbox-seconds spent idle (warm, unclaimed), claimed and
paused, priced per vCPU-second and GiB-second (E2B's pricing shape), kept in Redis."""

import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from sandboxd.config import Config
from sandboxd.spec import PoolSpec
from sandboxd.store.events import EventPublisher
from sandboxd.store.keys import Keys
from sandboxd.store.loops import every
from sandboxd.store.records import PassSnapshot, SandboxRecord

Snapshot = Callable[[], PassSnapshot]
USES = ("idle", "claimed", "paused")


def use_of(state: str, spec: PoolSpec | None) -> str:
    """claimed while held; paused for a ready E2B sandbox of an `idle: pause` pool (no
    compute billed); idle otherwise — warm, or on its way in or out of the pool."""
    if state == "claimed":
        return "claimed"
    pausing = spec is not None and spec.provider == "e2b" and spec.e2b_settings.idle == "pause"
    return "paused" if pausing and state == "ready" else "idle"


def price_per_s(spec: PoolSpec | None, config: Config, use: str) -> float:
    if spec is None or use == "paused":
        return 0.0
    prices = config.cost
    return spec.cpu * prices.price_per_vcpu_s + spec.memory_mb / 1024 * prices.price_per_gib_s


def accrue(
    records: list[SandboxRecord],
    specs: dict[str, PoolSpec],
    config: Config,
    seconds: float,
    counts: dict[str, Counter[str]] | None = None,
) -> dict[str, dict[str, float]]:
    """Per pool, the sandbox-seconds and cost each use adds over `seconds`. From the
    records per pool and state (`counts`, else counted here): a sample's cost follows the
    pools, not N."""
    added: dict[str, dict[str, float]] = {}
    by_state: Counter[tuple[str, str]]
    if counts is None:
        by_state = Counter((r.pool, r.state) for r in records)
    else:
        by_state = Counter({(p, st): n for p, c in counts.items() for st, n in c.items() if n > 0})
    for (pool_name, state), count in by_state.items():
        spec = specs.get(pool_name)
        use = use_of(state, spec)
        pool = added.setdefault(pool_name, {})
        pool[f"{use}_s"] = pool.get(f"{use}_s", 0.0) + seconds * count
        cost = seconds * count * price_per_s(spec, config, use)
        pool[f"{use}_cost"] = pool.get(f"{use}_cost", 0.0) + cost
    return added


def summarize(totals: dict[str, float]) -> dict[str, Any]:
    """What `status` and `pool.cost` show: spend, and the idle share (what warmth costs)."""
    cost = sum(totals.get(f"{use}_cost", 0.0) for use in USES)
    idle = totals.get("idle_cost", 0.0)
    return {
        **{key: round(value, 9 if key.endswith("_cost") else 3) for key, value in totals.items()},
        "cost": round(cost, 9),
        "idle_share": round(idle / cost, 3) if cost else None,
    }


class CostMeter:
    def __init__(
        self,
        *,
        redis: Redis,
        keys: Keys,
        config: Config,
        events: EventPublisher,
        snapshot: Snapshot,
    ):
        self._redis = redis
        self._keys = keys
        self._config = config
        self._events = events
        self._snapshot = snapshot
        self._last: float | None = None
        self._report_due = time.monotonic() + config.cost.report_interval_s
        self.totals: dict[str, dict[str, float]] = {}

    async def run(self) -> None:
        await every(lambda: self._config.sample_interval_s, self.sample, "cost not accounted")

    async def sample(self) -> None:
        now = time.monotonic()
        seconds = 0.0 if self._last is None else now - self._last
        self._last = now
        last = self._snapshot()
        records, specs = last.records, last.specs
        added = accrue(records, specs, self._config, seconds, last.counts)
        # Read back the pools that accrued, and pools new to us; the others' totals cannot
        # have changed (only the daemon writes them), so idle pools cost nothing here.
        reread = [p for p in specs if p in added or p not in self.totals]
        async with self._redis.pipeline(transaction=False) as pipe:
            for pool, amounts in added.items():
                key = self._keys.pool_cost(pool)
                pipe.hsetnx(key, "since", time.time())
                for field, amount in amounts.items():
                    pipe.hincrbyfloat(key, field, amount)
            for pool in reread:
                pipe.hgetall(self._keys.pool_cost(pool))
            replies = await pipe.execute()
        stored = replies[len(replies) - len(reread) :] if reread else []
        fresh = {pool: _numbers(fields) for pool, fields in zip(reread, stored, strict=True)}
        if fresh or len(self.totals) != len(specs):
            self.totals = {pool: fresh.get(pool, self.totals.get(pool, {})) for pool in specs}
        if now >= self._report_due:
            self._report_due = now + self._config.cost.report_interval_s
            await self._report()

    async def _report(self) -> None:
        """One `pool.cost` per pool that has accrued anything (not one per idle pool)."""
        for pool, totals in self.totals.items():
            if not totals:
                continue
            await self._events.publish(
                "pool.cost", pool=pool, currency=self._config.cost.currency, **summarize(totals)
            )


def _numbers(fields: dict[str, str]) -> dict[str, float]:
    """A pool's stored totals; a field that is not a finite number (written by someone
    else) is left out rather than stopping the sampling."""
    out = {}
    for key, value in fields.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[key] = number
    return out
