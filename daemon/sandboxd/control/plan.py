"""The pure reconcile step: desired pools vs observed sandboxes -> what to stop and start.

No I/O here, so every rule is tested directly (tests/unit/test_plan.py).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sandboxd.spec import PoolSpec
from sandboxd.store.records import SandboxState

# A sandbox is only stopped from these states for each reason: claimed sandboxes are
# never scaled away under their holder, only ended by their lifetime cap or, with
# `replace_claimed`, when unhealthy.
FROM_STATES: dict[str, tuple[SandboxState, ...]] = {
    "timeout": ("ready", "claimed", "released"),
    "unhealthy": ("ready", "claimed"),
}
DEFAULT_FROM: tuple[SandboxState, ...] = ("ready",)


@dataclass(frozen=True, slots=True)
class Observed:
    id: str
    pool: str
    state: str
    created_ts: float
    health: str = "healthy"
    build: str = ""  # the pool's build_id it was made from ("": unknown, never rolled over)


@dataclass
class PoolPlan:
    pool: str
    total: int
    create: int = 0
    wanted: int = 0  # creates the pool needs, before the breaker, surge and global limits
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
    limits: Mapping[str, int | None] | None = None,
    provider_slots: Mapping[str, int] | None = None,
) -> list[PoolPlan]:
    """Stop what must go (lifetime, health, surplus), then create what is missing.

    A pool never goes over `max_total`, counting every state (creates in flight and claimed
    sandboxes too), and no more than `create_slots` creates are started across all pools.
    `waiting`: clients blocked on an empty `on_empty: create` pool; each wants one more.
    `limits`: creates a pool may start now (its breaker and slow start); absent means any.
    `provider_slots`: sandboxes a provider may still add (a cloud plan's concurrency cap),
    shared by its pools; absent means no cap.
    """
    waiting = waiting or {}
    limits = limits or {}
    by_pool: dict[str, list[Observed]] = {}
    for sandbox in sandboxes:
        by_pool.setdefault(sandbox.pool, []).append(sandbox)
    specs = {p.name: p for p in pools}
    names = [p.name for p in pools] + sorted(by_pool.keys() - specs.keys())
    plans = [
        _pool_plan(specs.get(name), name, by_pool.get(name, []), now, waiting.get(name, 0))
        for name in names
    ]
    for p in plans:
        limit = limits.get(p.pool)
        p.create = p.wanted if limit is None else min(p.wanted, limit)
    for provider, slots in (provider_slots or {}).items():
        _share_create_slots([p for p in plans if _provider(specs, p.pool) == provider], slots)
    _share_create_slots(plans, create_slots)
    return plans


def top_up(
    pools: Sequence[PoolSpec],
    counts: Mapping[str, Mapping[str, int]],
    *,
    create_slots: int,
    unseen: Mapping[str, int] | None = None,
    waiting: Mapping[str, int] | None = None,
    limits: Mapping[str, int | None] | None = None,
) -> list[PoolPlan]:
    """The creates `pools` need, from their records counted by state alone: what a claim
    or a release asks of a pool (a pass over pools whose records changed, not every
    record of them). It only ever creates, as `plan` would for a pool with nothing to
    stop (nothing past its lifetime, unhealthy, stale or surplus): those are `plan`'s,
    in the whole passes. `unseen`: creates started since the counts were taken (each is a
    member and on its way to ready). The same `max_total`, `limits` and round-robin
    sharing of `create_slots` as `plan`."""
    unseen, waiting, limits = unseen or {}, waiting or {}, limits or {}
    plans = []
    for spec in pools:
        by_state = counts.get(spec.name, {})
        coming = ("creating", "released", "resetting") if spec.reuse == "reset" else ("creating",)
        new = unseen.get(spec.name, 0)
        members = sum(by_state.values()) + new
        pending = sum(by_state.get(state, 0) for state in coming) + new
        target = min(spec.min_ready + waiting.get(spec.name, 0), spec.max_total)
        missing = target - by_state.get("ready", 0) - pending
        wanted = max(0, min(missing, spec.max_total - members))
        limit = limits.get(spec.name)
        create = wanted if limit is None else min(wanted, limit)
        plans.append(PoolPlan(pool=spec.name, total=members, create=create, wanted=wanted))
    _share_create_slots(plans, create_slots)
    return plans


def _pool_plan(
    spec: PoolSpec | None, name: str, members: list[Observed], now: float, waiting: int
) -> PoolPlan:
    if spec is not None and not members:  # the common case with many pools: nothing yet
        return PoolPlan(
            pool=name, total=0, wanted=max(0, min(spec.min_ready + waiting, spec.max_total))
        )
    ready = sorted((s for s in members if s.state == "ready"), key=lambda s: s.created_ts)
    result = PoolPlan(pool=name, total=len(members))
    if spec is None:
        result.terminate = [(s.id, "drained") for s in ready]
        return result
    result.terminate = _doomed(spec, members, now)
    gone = {sandbox_id for sandbox_id, _ in result.terminate}
    stale, fresh = _by_idle_age(spec, [s for s in ready if s.id not in gone], now)
    target = min(spec.min_ready + waiting, spec.max_total)
    over_cap = len(members) - len(gone) - spec.max_total
    usable = stale + fresh  # stale first: they are the first to go
    surplus = min(len(usable), max(len(usable) - target, over_cap, 0))
    why = {s.id: "spec_changed" if _outdated(spec, s) else "idle_ttl" for s in stale}
    result.terminate += [(s.id, why.get(s.id, "scaled_down")) for s in usable[:surplus]]
    stale = stale[surplus:] if surplus < len(stale) else []
    # Sandboxes on their way to ready: new ones, and released ones that will be reset.
    coming = {"creating", "released", "resetting"} if spec.reuse == "reset" else {"creating"}
    pending = sum(1 for s in members if s.state in coming)
    # Stale ready sandboxes are replaced a batch at a time, make-before-break: their
    # replacements are created first, and once ready the stale ones are the surplus.
    batch = stale[: spec.max_surge] if pending == 0 else []
    missing = target - (len(usable) - surplus - len(batch)) - pending
    room = spec.max_total - (len(members) - len(result.terminate))
    if batch and room <= 0:  # at the cap: no room to make first, so break first
        result.terminate += [(s.id, why[s.id]) for s in batch]
        room += len(batch)
    result.wanted = max(0, min(missing, room))
    return result


def _doomed(spec: PoolSpec, members: list[Observed], now: float) -> list[tuple[str, str]]:
    """Sandboxes past the pool's lifetime cap, and unhealthy ones that are to be replaced."""
    out = []
    for s in members:
        if s.state in FROM_STATES["timeout"] and now - s.created_ts > spec.timeout_s:
            out.append((s.id, "timeout"))
        elif s.health == "unhealthy" and (
            s.state == "ready" or (s.state == "claimed" and spec.replace_claimed)
        ):
            out.append((s.id, "unhealthy"))
    return out


def _by_idle_age(
    spec: PoolSpec, ready: list[Observed], now: float
) -> tuple[list[Observed], list[Observed]]:
    """(past the pool's recycle age or made from an older build of the pool, the rest),
    each oldest first."""
    ttl = spec.recycle_after_s()
    if ttl is None and not any(_outdated(spec, s) for s in ready):
        return [], ready
    stale = [
        s for s in ready if _outdated(spec, s) or (ttl is not None and now - s.created_ts > ttl)
    ]
    gone = {s.id for s in stale}
    return stale, [s for s in ready if s.id not in gone]


def _outdated(spec: PoolSpec, sandbox: Observed) -> bool:
    """Made from another env, template, size... than the pool's now (`PoolSpec.build_id`)."""
    return bool(sandbox.build) and sandbox.build != spec.build_id


def _provider(specs: Mapping[str, PoolSpec], pool: str) -> str | None:
    spec = specs.get(pool)
    return spec.provider if spec else None


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
