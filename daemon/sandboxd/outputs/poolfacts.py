"""What only the daemon knows of each pool (sizes in force, breaker, creates, health, cost,
schedule, why it is short), for `sandboxd status`: in `<prefix>:daemon:pools`, one hash field
per pool, written only when that pool's facts changed since the last write. The heartbeat
carries a summary of them, not every pool, so thousands of idle pools cost a beat almost
nothing (see "Many pools" in docs/benchmarks.md)."""

import json
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from redis.asyncio.client import Pipeline

from sandboxd.outputs.cost import summarize
from sandboxd.spec import PoolSpec
from sandboxd.store.keys import Keys


class Pacing(Protocol):
    """A pool's create pacing as the facts need it (control/pacing.py's `PoolPacing`)."""

    def quiet(self) -> bool: ...

    def status(self, now: float) -> dict[str, Any]: ...


QUIET = "quiet"  # a pool's pacing that nothing has happened to: its status depends on the spec


def pool_facts(
    pool: PoolSpec,
    pacing: dict[str, Any],
    health: dict[str, Any] | None,
    schedule: dict[str, Any] | None,
    cost: dict[str, float] | None,
    currency: str,
) -> dict[str, Any]:
    return {
        **pacing,
        "health": health or {},
        "min_ready": pool.min_ready,
        "max_total": pool.max_total,
        "schedule": schedule,
        "cost": summarize(cost or {}),
        "currency": currency,
    }


class PoolFacts:
    """Keeps `<prefix>:daemon:pools` equal to the pools in force's facts, writing only the
    fields that changed. Each pool's inputs are compared first (cheap: the same objects
    when nothing happened), and its JSON is built only when they differ."""

    def __init__(
        self,
        keys: Keys,
        *,
        pools: Callable[[], list[PoolSpec]],
        pacing: Callable[[], Mapping[str, Pacing]],
        health: Callable[[], dict[str, dict[str, Any]]],
        schedules: Callable[[list[PoolSpec]], dict[str, dict[str, Any]]],
        cost: Callable[[], Mapping[str, dict[str, float]]],
        currency: Callable[[], str],
    ):
        self._key = keys.daemon_pools
        self._pools = pools
        self._pacing = pacing
        self._health = health
        self._schedules = schedules
        self._cost = cost
        self._currency = currency
        self._inputs: dict[str, tuple[Any, ...]] = {}
        self.facts: dict[str, dict[str, Any]] = {}
        self.json: dict[str, str] = {}  # what the hash holds once the pending write is done
        self.summary: dict[str, Any] = summarize_pools({})
        self._synced = False  # False: (re)write the hash whole (first beat, write lost)
        self.fields_written = 0  # pool fields written since start (tests, benchmarks)

    def refresh(self) -> tuple[dict[str, str], list[str]]:
        """Recompute the facts of pools whose inputs changed: (pool -> JSON that differs
        from what was written, pools gone)."""
        now = time.monotonic()
        pools = self._pools()
        pacing, health, cost = self._pacing(), self._health(), self._cost()
        schedules, currency = self._schedules(pools), self._currency()
        changed: dict[str, str] = {}
        names = set()
        for pool in pools:
            name = pool.name
            names.add(name)
            pace = pacing.get(name)
            status = None if pace is None else QUIET if pace.quiet() else pace.status(now)
            inputs = (pool, status, health.get(name), schedules.get(name), cost.get(name), currency)
            if self._inputs.get(name) == inputs:
                continue
            self._inputs[name] = inputs
            shown: dict[str, Any] = {}
            if pace is not None:
                shown = status if isinstance(status, dict) else pace.status(now)
            facts = pool_facts(pool, shown, *inputs[2:])
            self.facts[name] = facts
            body = json.dumps(facts)
            if self.json.get(name) != body:
                changed[name] = self.json[name] = body
        gone = [name for name in self.json if name not in names]
        for name in gone:
            del self.json[name]
            self.facts.pop(name, None)
            self._inputs.pop(name, None)
        if changed or gone:
            self.summary = summarize_pools(self.facts)
        return changed, gone

    def write(self, pipe: Pipeline, changed: dict[str, str], gone: list[str]) -> None:
        """Queue the write on `pipe` (a transaction), then `HLEN` to check the hash; pass
        the reply of that last command to `written`."""
        if not self._synced:
            pipe.delete(self._key)
            changed = self.json
        if changed:
            pipe.hset(self._key, mapping=changed)
        if gone and self._synced:
            pipe.hdel(self._key, *gone)
        pipe.hlen(self._key)
        self.fields_written += len(changed)
        self._synced = True

    def written(self, length: int) -> None:
        """The hash's length after the write: not what we hold means it was lost or changed
        behind our back (FLUSHDB, a DEL): rewrite it whole next time."""
        if length != len(self.json):
            self._synced = False

    def lost(self) -> None:
        """The write failed: rewrite the hash whole next time."""
        self._synced = False


def summarize_pools(facts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The heartbeat's view of the pools: how many, and how many need attention."""
    return {
        "pools": len(facts),
        "failed": sum(1 for f in facts.values() if f.get("state") == "failed"),
        "breaker_open": sum(1 for f in facts.values() if f.get("breaker", "closed") != "closed"),
        "below_target": sum(1 for f in facts.values() if f.get("below_target")),
        "creating": sum(f.get("creating", 0) for f in facts.values()),
        "unhealthy": sum(
            1 for f in facts.values() if (f.get("health") or {}).get("state") == "unhealthy"
        ),
    }
