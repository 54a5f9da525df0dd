"""The pure reconcile step: desired pools vs observed sandboxes -> what to stop and start.

No I/O here, so every rule is tested directly (tests/unit/test_plan.py).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sandboxd.spec import PoolSpec


@dataclass(frozen=True)
class Observed:
    id: str
    pool: str
    state: str
    created_ts: float


@dataclass
class PoolPlan:
    pool: str
    total: int
    create: int = 0
    terminate: list[tuple[str, str]] = field(default_factory=list)  # (sandbox id, reason)

    @property
    def changes(self) -> bool:
        return bool(self.create or self.terminate)

    @property
    def total_after(self) -> int:
        return self.total - len(self.terminate) + self.create


def plan(
    pools: Sequence[PoolSpec],
    sandboxes: Sequence[Observed],
    *,
    create_slots: int,
    now: float,
    waiting: Mapping[str, int] | None = None,
) -> list[PoolPlan]:
    """Stop surplus first (oldest ready first), then create what is missing.

    A pool never goes over `max_total`, counting every state (creates in flight and claimed
    sandboxes too), and no more than `create_slots` creates are started across all pools.
    `waiting`: clients blocked on an empty `on_empty: create` pool; each wants one more.
    """
    waiting = waiting or {}
    by_pool: dict[str, list[Observed]] = {}
    for sandbox in sandboxes:
        by_pool.setdefault(sandbox.pool, []).append(sandbox)
    specs = {p.name: p for p in pools}
    names = [p.name for p in pools] + sorted(by_pool.keys() - specs.keys())
    plans = [
        _pool_plan(specs.get(name), name, by_pool.get(name, []), now, waiting.get(name, 0))
        for name in names
    ]
    _share_create_slots(plans, create_slots)
    return plans


def _pool_plan(
    spec: PoolSpec | None, name: str, members: list[Observed], now: float, waiting: int
) -> PoolPlan:
    ready = sorted((s for s in members if s.state == "ready"), key=lambda s: s.created_ts)
    result = PoolPlan(pool=name, total=len(members))
    if spec is None:
        result.terminate = [(s.id, "drained") for s in ready]
        return result
    expired = [s for s in ready if now - s.created_ts > spec.timeout_s]
    fresh = [s for s in ready if now - s.created_ts <= spec.timeout_s]
    target = min(spec.min_ready + waiting, spec.max_total)
    over_cap = len(members) - len(expired) - spec.max_total
    surplus = min(len(fresh), max(len(fresh) - target, over_cap, 0))
    result.terminate = [(s.id, "timeout") for s in expired]
    result.terminate += [(s.id, "scaled_down") for s in fresh[:surplus]]
    # Sandboxes on their way to ready: new ones, and released ones that will be reset.
    coming = {"creating", "released", "resetting"} if spec.reuse == "reset" else {"creating"}
    pending = sum(1 for s in members if s.state in coming)
    missing = target - (len(fresh) - surplus) - pending
    room = spec.max_total - (len(members) - len(result.terminate))
    result.create = max(0, min(missing, room))
    return result


def _share_create_slots(plans: list[PoolPlan], slots: int) -> None:
    """Round-robin the global create budget so one big pool cannot starve the others."""
    wanted = {p.pool: p.create for p in plans}
    for p in plans:
        p.create = 0
    slots = max(0, slots)
    while slots > 0 and any(wanted.values()):
        for p in plans:
            if slots and wanted[p.pool]:
                p.create += 1
                wanted[p.pool] -= 1
                slots -= 1
