"""The level-triggered control loop: make what runs match the spec in force."""

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from sandboxd.config import Config
from sandboxd.control.creator import Creator
from sandboxd.control.nudges import Nudges
from sandboxd.control.outbox import Outbox
from sandboxd.control.plan import DEFAULT_FROM, FROM_STATES, Observed, PoolPlan, plan, top_up
from sandboxd.control.recycler import Recycler
from sandboxd.control.repair import Healer, Quarantine
from sandboxd.control.replacements import Recoveries
from sandboxd.control.restore import Restorer
from sandboxd.control.schedule import Change, PoolSchedules
from sandboxd.control.specsource import SpecSource
from sandboxd.control.terminator import Terminator
from sandboxd.providers import CLOUD_PROVIDERS, Provider
from sandboxd.providers.base import Capped, Listed, Watched
from sandboxd.spec import PoolSpec
from sandboxd.store.claims import ClaimStore
from sandboxd.store.events import Event, EventPublisher
from sandboxd.store.fence import LeaseLost
from sandboxd.store.loops import cancelling, survive, why
from sandboxd.store.records import SandboxRecord, SandboxState, SandboxStore, Scan, wrong_type
from sandboxd.store.view import RecordView

log = logging.getLogger(__name__)
GONE_DETAIL = {
    "died": "the sandbox's processes are gone",
    "lost": "the provider no longer has the sandbox",
}
# A watched sandbox's death is told when it happens (`Watched`): the tick's liveness check
# of those is a backstop, done for 1/WATCHED_SHARES of them each tick, in turn.
LIVE = frozenset({"ready", "claimed", "released"})  # states a sandbox runs in
WATCHED_SHARES = 8


async def _idle_at_least(busy_s: float, *, since: float) -> None:
    """Under a storm of nudges (thousands of claims a second) back-to-back passes would
    take a core from the clients and Redis: idle at least as long as the last pass kept
    the CPU busy (time spent waiting on Redis or a provider does not count), so passes use
    at most about half a core; the next pass still sees every change since."""
    left = busy_s - (time.monotonic() - since)
    if left > 0:
        await asyncio.sleep(left)


class Reconciler:
    def __init__(
        self,
        *,
        config: Config,
        store: SandboxStore,
        claims: ClaimStore,
        specs: SpecSource,
        events: EventPublisher,
        providers: dict[str, Provider],
        terminator: Terminator,
        instance: str,
        on_pass: Callable[[list[SandboxRecord], dict[str, PoolSpec]], None] | None = None,
        on_pass_time: Callable[[float], None] = lambda seconds: None,
        schedules: PoolSchedules | None = None,
        restorer: "Restorer | None" = None,
        before_pass: Callable[[], Awaitable[None]] | None = None,
        outbox: Outbox | None = None,
    ):
        self._config = config
        self._outbox = outbox  # what changed while Redis could not be reached
        self._restorer = restorer  # puts back what Redis lost; remembers what it holds
        self._before_pass = before_pass  # a chaos test's hook (providers/faults.py), or None
        self._store = store
        self._claims = claims
        self._specs = specs
        self._events = events
        self._providers = providers
        self._terminator = terminator
        self._recycler = Recycler(
            store=store,
            providers=providers,
            events=events,
            terminator=terminator,
            reset_timeout_s=config.reset_timeout_s,
        )
        self.recoveries = Recoveries(events)
        self.creator = Creator(
            config=config,
            store=store,
            events=events,
            providers=providers,
            recoveries=self.recoveries,
            instance=instance,
            nudge=self.nudge,
            on_ready=self._made_ready,
        )
        # The records between passes: a pass reads what changed, not every record.
        self.view = RecordView(store, resync_max_s=lambda: config.resync_interval_s)
        self._view_scope: tuple[frozenset[str], int | None] = (frozenset(), None)
        terminator.changed = self.creator.changed = self.view.touch
        # Deaths told as they happen (`Watched` providers): checked at the next pass, which
        # the death nudges, instead of at the next tick.
        self._died: set[str] = set()
        self._watching: dict[str, Watched] = {}
        self._observations: dict[str, tuple[SandboxRecord, Observed]] = {}
        self._last_seen: tuple[int, int, list[PoolSpec]] | None = None  # see _pass_body
        self._last_observed: list[Observed] = []
        self._liveness_round = 0
        self._unwatchable: set[str] = set()
        self._heal_due = 0.0  # healing the ready lists and member sets: on ticks, 0.2% at most
        self._healer = Healer(store.redis, store.keys, events)
        self._quarantine = Quarantine(store.redis, store.keys, events)
        self._record_pools: set[str] = set()  # pools of the last pass's records
        self._nudges = Nudges(lambda: config.claim_coalesce_ms / 1000)
        self._on_pass = on_pass
        self._on_pass_time = on_pass_time
        self.schedules = schedules or PoolSchedules()
        self.pools: list[PoolSpec] = []  # in force: the spec's, sized by their schedules
        self._pass_began: float | None = None
        self.pass_seconds: deque[float] = deque(maxlen=1000)  # recent pass durations
        self._stuck: set[str] = set()  # seen terminating/resetting, unhandled, last pass
        # Liveness (a /proc lookup per sandbox) and republishing pool settings run once per
        # tick, not on every nudged pass: under claim load that is thousands a second.
        self._tick_due = 0.0
        self._published_revision = -1
        self.first_pass = asyncio.Event()
        self._work: asyncio.TaskGroup | None = None
        self.last_pass_at = 0.0

    def _made_ready(self, record: SandboxRecord) -> None:
        """A sandbox the creator made ready: into the journal now (see Restorer.learn)."""
        if self._restorer is not None:
            self._restorer.learn(record)

    def nudge(self, pool: str | None = None, *, coalesce: bool = False) -> None:
        """Reconcile now instead of at the next tick (spec applied, create finished…);
        `pool`: only that pool changed; `coalesce`: a client's claim or release (Nudges)."""
        self._nudges.add(pool, coalesce=coalesce)

    async def run(self) -> None:
        """Reconcile on every nudge and tick until cancelled; creates and recycling of
        released sandboxes run as tasks in this scope."""
        async with asyncio.TaskGroup() as work:
            self._work = self.creator.work = work
            try:
                while True:
                    cpu_before, began = time.thread_time(), time.perf_counter()
                    self._pass_began = time.monotonic()
                    await self._pass_surviving_redis_errors()
                    self._pass_began = None
                    self.pass_seconds.append(time.perf_counter() - began)
                    self._on_pass_time(self.pass_seconds[-1])
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("reconcile pass", extra={"seconds": self.pass_seconds[-1]})
                    self.first_pass.set()
                    busy_s, ended = time.thread_time() - cpu_before, time.monotonic()
                    await self._sleep_until_nudged()
                    await _idle_at_least(busy_s, since=ended)
                    if cancelling():
                        raise asyncio.CancelledError
            finally:
                self._work = self.creator.work = None
                self._watch([])

    def stuck_for(self) -> float:
        """How long the pass under way has been running (0 between passes): the watchdog's
        measure of progress."""
        began = self._pass_began
        return 0.0 if began is None else time.monotonic() - began

    async def _sleep_until_nudged(self) -> None:
        await self._nudges.wait(self._config.reconcile_interval_s)

    async def _pass_surviving_redis_errors(self) -> None:
        try:
            await self.reconcile_once()
        except RedisError as exc:
            if wrong_type(exc) and not cancelling():
                await self._wrong_type(exc)
                return
            if not survive(exc):
                raise
            log.warning("reconcile pass failed, %s: %s", why(exc), exc)
            await self.reap_offline()

    async def reap_offline(self) -> list[str]:
        """Redis cannot be reached: the liveness check of the node's own sandboxes goes on
        without it. A sandbox of the last pass whose processes are gone (the provider's
        registry says so, never a record) is stopped and freed from the registry now; its
        record is closed and `sandbox.terminated` (reason `died`, `late`) published when
        Redis answers (the outbox), and then the pool replaces it like any dead sandbox.
        No replacement is made before: creates write their record first, and a sandbox can
        only be claimed through Redis anyway."""
        if self._outbox is None or self._restorer is None:
            return []
        reaped = []
        for sandbox_id, fields in self._restorer.known().items():
            provider = self._providers.get(fields.get("provider", ""))
            if (
                provider is None
                or provider.name in CLOUD_PROVIDERS  # a cloud API may just be unreachable
                or fields.get("state") not in ("ready", "claimed", "released")
                or sandbox_id in self.creator.inflight
                or self._handling(sandbox_id)
                or await provider.is_alive(sandbox_id, _handle(fields))
            ):
                continue
            try:
                await provider.terminate(sandbox_id, _handle(fields))
            except LeaseLost:
                raise
            except Exception as exc:  # tried again at the next tick
                log.warning("dead sandbox not stopped: %s", exc, extra={"sandbox": sandbox_id})
                continue
            self._restorer.forget(sandbox_id)
            pool, state = fields.get("pool", ""), fields.get("state", "")
            await self._outbox.add(
                "sandbox.terminated",
                pool=pool,
                sandbox=sandbox_id,
                close=True,
                reason=provider.gone_reason,
                state=state,
                detail=GONE_DETAIL[provider.gone_reason],
            )
            log.warning(
                "sandbox died while Redis is unreachable: stopped; its record is closed "
                "when Redis answers",
                extra={"sandbox": sandbox_id, "pool": pool, "state": state},
            )
            reaped.append(sandbox_id)
        return reaped

    async def write_late(self) -> None:
        """Write what changed while Redis could not be reached, before anything reads the
        records; the ready sandboxes that died meanwhile are replaced as recoveries."""
        if self._outbox is None or not self._outbox.pending:
            return
        for event in await self._outbox.flush():
            if _died_ready(event):
                await self.recoveries.begin_for(
                    event.pool,
                    event.sandbox,
                    "ready",
                    event.data["reason"],
                    "while Redis could not be reached: " + str(event.data.get("detail", "")),
                )

    async def _wrong_type(self, exc: RedisError) -> None:
        """A key of ours holds another type (not an outage): replace it, pass again."""
        log.error("reconcile pass met a key of the wrong type: %s", exc)
        try:
            replaced = await self._healer.check_types(self._pool_names())
        except RedisError as again:
            log.warning("checking key types failed: %s", again)
            return
        if replaced:
            self.nudge()

    def _pool_names(self) -> list[str]:
        return sorted({p.name for p in self.pools} | self._record_pools)

    async def reconcile_once(self) -> None:
        whole, dirty = self._nudges.take()
        if self._before_pass is not None:
            await self._before_pass()
        await self.write_late()
        generation = None
        if self._restorer is not None:
            await self._restorer.check()
            generation = self._restorer.restored
        if (
            not whole
            and dirty
            and time.monotonic() < self._tick_due
            and (frozenset(self._providers), generation) == self._view_scope
            and self._specs.revision == self._published_revision
        ):
            # Only claims, releases or finished creates asked: the pools as in force (a
            # spec change asks for a whole pass itself, a schedule's turn waits for the
            # tick), no read of the spec document (megabytes with many pools).
            in_force = {p.name: p for p in self.pools}
            async with self.creator.planning:
                await self._plan_and_act(
                    self.pools,
                    in_force,
                    tick=False,
                    generation=generation,
                    only={pool for pool in dirty if pool in in_force},
                )
            await self.creator.refill()
            self.last_pass_at = time.time()
            return
        spec = await self._specs.refresh()
        every_pool, changes = self.schedules.apply(list(spec.pools) if spec else [])
        # The pools this daemon manages: those of its providers (a cloud provider only while
        # this daemon leads the cloud pools; see daemon.py).
        pools = [p for p in every_pool if p.provider in self._providers]
        if [p.name for p in pools] != [p.name for p in self.pools]:
            whole = True
        self.pools = pools
        self._nudges.pools_in_force = frozenset(p.name for p in pools)
        for change in changes:
            if change.pool in {p.name for p in pools}:
                await self._announce(change)
        tick = time.monotonic() >= self._tick_due
        if tick:
            self._tick_due = time.monotonic() + self._config.reconcile_interval_s
        if tick or self._specs.revision != self._published_revision:
            whole = True
            await self._claims.publish_pool_settings(every_pool)
            self._published_revision = self._specs.revision
        specs = {p.name: p for p in pools}
        only = None if whole or changes or generation != self._view_scope[1] else dirty
        async with self.creator.planning:  # no create starts between the read and the plan
            await self._plan_and_act(pools, specs, tick=tick, generation=generation, only=only)
        await self.creator.refill()  # slots freed while the pass planned
        self.last_pass_at = time.time()

    async def _plan_and_act(
        self,
        pools: list[PoolSpec],
        specs: dict[str, PoolSpec],
        *,
        tick: bool,
        generation: int | None,
        only: set[str] | None = None,
    ) -> None:
        self.creator.owe({}, {}, 0, only=only)  # the last pass's debts are this one's now
        try:
            await self._pass_body(pools, specs, tick=tick, generation=generation, only=only)
        except BaseException:
            self.view.invalidate()  # a pass cut short (Redis away, cancelled): read it all
            raise

    async def _read_records(self, generation: int | None) -> Scan:
        """The records, from the view: what changed since the last pass is read again,
        everything when the owners' rule or Redis's data (a restore) changed."""
        scope = (frozenset(self._providers), generation)
        if scope != self._view_scope:
            self._view_scope = scope
            self.view.invalidate()
        if (
            self._restorer is not None
            and self._restorer.expects_records()
            and not await self._store.has_id_set()
        ):
            await self._healer.rebuild_ids()  # the id set alone was deleted: SCAN for records
            self.view.invalidate()
        scan = await self.view.refresh()
        if any(not c.sandbox_id for c in scan.corrupt):  # the id set itself: rebuilt, read again
            await self._healer.check_types(self._pool_names())
            scan = await self.view.full()
        return scan

    async def _pass_body(
        self,
        pools: list[PoolSpec],
        specs: dict[str, PoolSpec],
        *,
        tick: bool,
        generation: int | None,
        only: set[str] | None = None,
    ) -> None:
        """A whole pass, or (`only`) one that looks at those pools only: the records are
        read and remembered all the same (from the view: what changed), but reaping,
        recycling, the plan and its actions, watching and the monitor's view are of those
        pools' sandboxes alone; the tick's pass is always whole."""
        read_at = time.monotonic()
        scan = await self._read_records(generation)
        # The view's counts are of these very records: their pools without a walk of them.
        record_pools = {
            pool for pool, n in self.view.counts.items() if any(v > 0 for v in n.values())
        }
        if tick:  # pools with sandboxes every tick, idle pools a window at a time
            await self._healer.check_types(self._pool_names(), busy=record_pools)
        if only is None:
            self._record_pools = record_pools
        if self._restorer is not None:
            await self._restorer.remember(
                scan.records,
                self._specs.in_force,
                save=tick,
                since=generation,
                read_at=read_at,
                changed=self.view.changes,
            )
        if scan.corrupt:
            self.view.touch(*(c.sandbox_id for c in scan.corrupt if c.sandbox_id))
            await self._quarantine.handle(scan.corrupt, self._providers)
        planned = pools if only is None else [p for p in pools if p.name in only]
        if only is not None and not tick and not self._died and self._countable(planned):
            await self._top_up(pools, planned, specs, only)
            return
        mine = scan.records if only is None else [r for r in scan.records if r.pool in only]
        records = await self._reap_dead(mine, check_liveness=tick, whole=only is None)
        if tick:
            if time.monotonic() >= self._heal_due:  # at most 0.2% of the time (many records)
                began = time.monotonic()
                await self._healer.heal(records, specs)
                self._heal_due = began + (time.monotonic() - began) * 500
            await self.creator.cancel_stuck(self._config.create_grace_s)
        self._recycle_released(records, specs)
        waiting = await self._claims.count_waiters(
            [p.name for p in planned if p.on_empty == "create"]
        )
        now = time.monotonic()
        pacing = self.creator.pace(pools)
        self.recoveries.forget(set(specs))
        limits = {name: pace.limit(now) for name, pace in pacing.items()}
        slots = self._config.max_concurrent_creates - len(self.creator.inflight)
        # A whole pass over the very records and pools of the last whole pass (a quiet
        # tick): what is made of them alone (the plan's view, the watching, the monitor's
        # targets) is as it was; only what depends on the time is looked at again.
        seen = (self.view.version, len(records), list(specs.values()))
        quiet = only is None and _same(seen, self._last_seen)
        if only is None:
            self._last_seen = seen
        if quiet:
            observed = self._last_observed
        else:
            observed = [self._observed(r) for r in records]
            if only is None:
                self._last_observed = observed
        if only is None and len(self._observations) > len(records):  # forget the gone
            self._observations = {o.id: self._observations[o.id] for o in observed}
        provider_slots = self._provider_slots(records if only is None else scan.records)
        plans = plan(
            planned,
            observed,
            create_slots=slots,
            now=time.time(),
            waiting=waiting,
            limits=limits,
            provider_slots=provider_slots,
        )
        by_id = {r.id: r for r in records} if any(p.terminate for p in plans) else {}
        for pool_plan in plans:
            if pool_plan.pool in pacing:
                provider = specs[pool_plan.pool].provider
                full = provider_slots.get(provider) == 0
                pacing[pool_plan.pool].explain_shortfall(
                    pool_plan.wanted,
                    pool_plan.create,
                    limits[pool_plan.pool],
                    now,
                    provider_full=f"{provider}.max_concurrent reached" if full else "",
                )
            if pool_plan.changes:
                await self._act(pool_plan, specs.get(pool_plan.pool), by_id)
        self.creator.owe(
            {
                p.pool: p.wanted - p.create
                for p in plans
                if p.pool in specs
                and not isinstance(self._providers.get(specs[p.pool].provider), Capped)
            },
            specs,
            self._specs.revision,
            only=only,
        )
        if quiet:
            return
        self._watch(records, prune=only is None)
        if self._on_pass is not None and only is None:
            self._on_pass(records, specs)

    def _countable(self, planned: list[PoolSpec]) -> bool:
        """Pools whose creates follow from their records counted by state (`top_up`): not
        those of a provider whose plan shares a concurrency cap (e2b), which the plan
        counts record by record."""
        return not any(isinstance(self._providers.get(p.provider), Capped) for p in planned)

    async def _top_up(
        self,
        pools: list[PoolSpec],
        planned: list[PoolSpec],
        specs: dict[str, PoolSpec],
        only: set[str],
    ) -> None:
        """A pass for pools that only a claim, a release or a finished create named: its
        work follows what changed, not how many sandboxes the pools hold. The records the
        view read again are looked at (a release to recycle, a sandbox to watch), and the
        pools' creates come from their records counted by state (`top_up`); what takes a
        look at every record (lifetimes, health, surplus, stale builds, liveness) is the
        whole passes' (every tick, and whenever anything else asks)."""
        view = self.view
        # Taken before any await: creates started by now that the view has not read yet
        # count as members on their way (none starts while the pass holds `planning`).
        unseen = {
            pool: sum(1 for sandbox_id in ids if sandbox_id not in view.records)
            for pool, ids in self.creator.running().items()
        }
        counts = {p.name: dict(view.counts.get(p.name, {})) for p in planned}
        # The records the read changed (all of them after a full read), of these pools.
        read = (
            view.records.values() if view.changed is None else map(view.records.get, view.changed)
        )
        changed = [r for r in read if r is not None and r.pool in only]
        self._recycle_released(changed, specs)
        waiting = await self._claims.count_waiters(
            [p.name for p in planned if p.on_empty == "create"]
        )
        now = time.monotonic()
        pacing = self.creator.pace(pools)
        limits = {p.name: pacing[p.name].limit(now) for p in planned}
        slots = self._config.max_concurrent_creates - len(self.creator.inflight)
        plans = top_up(
            planned, counts, create_slots=slots, unseen=unseen, waiting=waiting, limits=limits
        )
        for pool_plan in plans:
            pacing[pool_plan.pool].explain_shortfall(
                pool_plan.wanted, pool_plan.create, limits[pool_plan.pool], now
            )
            if pool_plan.changes:
                await self._act(pool_plan, specs[pool_plan.pool], {})
        self.creator.owe(
            {p.pool: p.wanted - p.create for p in plans},
            specs,
            self._specs.revision,
            only=only,
        )
        self._watch(changed, prune=False)

    async def _announce(self, change: Change) -> None:
        await self._events.publish(
            "pool.schedule_changed",
            pool=change.pool,
            window=change.window.label() if change.window else "",
            min_ready=change.target[0],
            max_total=change.target[1],
            ramp_s=change.ramp_s,
        )
        log.info(
            "pool schedule changed",
            extra={"pool": change.pool, "window": change.window.label() if change.window else ""},
        )

    def _observed(self, record: SandboxRecord) -> Observed:
        """What the plan sees of a record: made once per record object (the view keeps an
        unchanged record's object from pass to pass, so a tick of 10,000 unchanged records
        parses no timestamps)."""
        known = self._observations.get(record.id)
        if known is not None and known[0] is record:
            return known[1]
        seen = Observed(
            record.id, record.pool, record.state, record.created_ts, record.health, record.build
        )
        self._observations[record.id] = (record, seen)
        return seen

    def _provider_slots(self, records: list[SandboxRecord]) -> dict[str, int]:
        """Sandboxes each capped provider (a cloud plan's concurrency) may still add."""
        slots = {}
        for name, provider in self._providers.items():
            if isinstance(provider, Capped):
                creating = sum(1 for r in records if r.provider == name and r.state == "creating")
                slots[name] = max(0, provider.headroom() - creating)
        return slots

    def pool_status(self) -> dict[str, dict[str, Any]]:
        """Per pool: breaker, creates in flight, create outcomes, why it is short."""
        now = time.monotonic()
        return {name: pacing.status(now) for name, pacing in self.creator.pacing.items()}

    async def _reap_dead(
        self, records: list[SandboxRecord], *, check_liveness: bool, whole: bool = True
    ) -> list[SandboxRecord]:
        """Sandboxes whose process is gone: close the record (reason `died`), drop from view.

        A `creating` record with no create running here was abandoned (Redis went away
        mid-create): close it too, or it would count against the pool forever. So is a
        `terminating` or `resetting` one that nobody here has been handling for two passes.
        A record whose state moved on since the snapshot is not stopped, and still counts.
        """
        stuck: set[str] = set()
        died, self._died = self._died, set()
        watching, share = self._watching, 0
        if check_liveness:  # a watched sandbox's death is told: the tick checks 1/8 of them
            self._liveness_round = share = (self._liveness_round + 1) % WATCHED_SHARES
        listed = {n: p for n, p in self._providers.items() if isinstance(p, Listed)}
        # One walk sorts the records: most are live and need nothing (not to be checked this
        # time, or left to their provider's one listing); the rest are looked at one by one.
        one_by_one: list[tuple[SandboxRecord, bool]] = []
        by_listing: dict[str, list[SandboxRecord]] = {}
        told: set[str] = set()  # the deaths told of these records
        for record in records:
            if record.id in died:
                told.add(record.id)
                one_by_one.append((record, True))
            elif record.state not in LIVE:
                one_by_one.append((record, check_liveness))
            elif not check_liveness or (
                record.id in watching and hash(record.id) % WATCHED_SHARES != share
            ):
                continue
            elif record.provider in listed:
                by_listing.setdefault(record.provider, []).append(record)
            else:
                one_by_one.append((record, True))
        for name, group in by_listing.items():  # one call a provider, not one a sandbox
            gone = await listed[name].gone_among([r.id for r in group])
            one_by_one += [(r, True) for r in group if r.id in gone]
        closed: set[str] = set()
        for record, check in one_by_one:
            verdict = await self._verdict(record, stuck, check)
            if verdict is None:
                continue
            if verdict[0] in GONE_DETAIL and record.state == "ready":
                if await self.replace(record, verdict[0], GONE_DETAIL[verdict[0]]):
                    closed.add(record.id)
            elif await self.terminate(record, *verdict):
                closed.add(record.id)
        self._stuck = stuck if whole else self._stuck | stuck
        if not whole:  # a death told of a pool this pass did not look at: the next one's
            self._died |= died - told
        return [r for r in records if r.id not in closed] if closed else list(records)

    async def _verdict(
        self, record: SandboxRecord, stuck: set[str], check_liveness: bool
    ) -> tuple[Any, ...] | None:
        """(reason, *states it may be stopped from) if the record should be closed."""
        if record.state == "creating" and record.id not in self.creator.inflight:
            return ("interrupted", "creating")
        if record.state in ("terminating", "resetting") and not self._handling(record.id):
            if record.id in self._stuck:
                return ("interrupted", "terminating", "resetting")
            stuck.add(record.id)
        provider = self._providers.get(record.provider)
        if check_liveness and provider and record.state in ("ready", "claimed", "released"):
            if not await provider.is_alive(record.id, record.handle):
                return (provider.gone_reason, "ready", "claimed", "released")
        return None

    def _died_now(self, sandbox_id: str) -> None:
        self._died.add(sandbox_id)
        self.nudge()

    def _watch(self, records: list[SandboxRecord], *, prune: bool = True) -> None:
        """Have the death of every live sandbox of a `Watched` provider told as it happens;
        stop watching those no longer live here. One that cannot be watched (a limit) is
        not asked again while it lives: the tick's liveness check covers it."""
        watchable = {n: p for n, p in self._providers.items() if isinstance(p, Watched)}
        live: dict[str, Watched] = {}
        if watchable:
            for r in records:
                if r.state in ("ready", "claimed", "released") and r.provider in watchable:
                    live[r.id] = watchable[r.provider]
        if prune:
            for sandbox_id in self._watching.keys() - live.keys():
                self._watching.pop(sandbox_id).unwatch(sandbox_id)
            self._unwatchable &= live.keys()
        for sandbox_id, provider in live.items():
            if sandbox_id in self._watching or sandbox_id in self._unwatchable:
                continue
            if provider.watch(sandbox_id, self._died_now):
                self._watching[sandbox_id] = provider
            else:
                self._unwatchable.add(sandbox_id)

    def _handling(self, sandbox_id: str) -> bool:
        return sandbox_id in self._terminator.running or sandbox_id in self._recycler.running

    def _recycle_released(self, records: list[SandboxRecord], specs: dict[str, PoolSpec]) -> None:
        assert self._work is not None, "recycling only starts inside run()"
        if not any(n["released"] > 0 for n in self.view.counts.values()):
            return  # none released among the view's records (a quiet tick: no walk of them)
        for record in records:
            if record.state == "released" and record.id not in self._recycler.running:
                self._recycler.running.add(record.id)  # before the task runs: one per id
                self._work.create_task(
                    self._recycle(record, specs.get(record.pool)), name=f"recycle {record.id}"
                )

    async def _recycle(self, record: SandboxRecord, spec: PoolSpec | None) -> None:
        try:
            await self._recycler.recycle(record, spec)
        finally:
            self.view.touch(record.id)  # `resetting` or back to ready, or half-done

    async def _act(
        self, pool_plan: PoolPlan, spec: PoolSpec | None, by_id: dict[str, SandboxRecord]
    ) -> None:
        await self._events.publish(
            "pool.scaled",
            pool=pool_plan.pool,
            from_total=pool_plan.total,
            to_total=pool_plan.total_after,
            min_ready=spec.min_ready if spec else 0,
            max_total=spec.max_total if spec else 0,
            creating=pool_plan.create,
            terminating=len(pool_plan.terminate),
        )
        async with asyncio.TaskGroup() as group:
            for sandbox_id, reason in pool_plan.terminate:
                group.create_task(self._stop(by_id[sandbox_id], reason))
        if spec is not None:
            assert self._work is not None, "creates only start inside run()"
            for _ in range(pool_plan.create):
                await self.creator.start(spec, self._specs.revision, self._work)

    async def _stop(self, record: SandboxRecord, reason: str) -> None:
        if reason == "unhealthy" and record.state == "ready":
            provider = self._providers.get(record.provider)
            if provider and not await provider.is_alive(record.id, record.handle):
                reason = provider.gone_reason  # not sick: gone (a cloud sandbox vanished)
                await self.replace(record, reason, GONE_DETAIL[reason])
            else:
                await self.replace(record, reason, record.health_reason)
            return
        claim = {"claimant": record.claimant, "claim_id": record.claim_id}
        extra = claim if record.state == "claimed" else {}
        await self.terminate(record, reason, *FROM_STATES.get(reason, DEFAULT_FROM), **extra)

    async def replace(self, record: SandboxRecord, reason: str, detail: str) -> bool:
        """A ready sandbox lost (dead, unhealthy): stop it, and let the pool's next create
        be its replacement. False if it was claimed meanwhile (its holder has it now)."""
        if await self._store.begin_terminate(record, "ready") is None:
            return False
        await self.recoveries.begin(record, reason, detail)
        await self._terminator.finish(record, reason, "ready", detail=detail)
        self.nudge(record.pool)  # the replacement is due now, whoever noticed the loss
        return True

    async def terminate(
        self, record: SandboxRecord, reason: str, *states: SandboxState, **data: Any
    ) -> bool:
        """Take the sandbox out of circulation (if still in `states`), stop it, close it."""
        return await self._terminator.terminate(record, reason, *states, **data)


def _same(
    seen: tuple[int, int, list[PoolSpec]], last: tuple[int, int, list[PoolSpec]] | None
) -> bool:
    """The same view version, number of records and pool objects (compared by identity)."""
    return (
        last is not None
        and seen[:2] == last[:2]
        and len(seen[2]) == len(last[2])
        and all(a is b for a, b in zip(seen[2], last[2], strict=True))
    )


def _handle(fields: dict[str, str]) -> dict[str, Any]:
    try:
        handle = json.loads(fields.get("handle") or "{}")
    except ValueError:
        return {}
    return handle if isinstance(handle, dict) else {}


def _died_ready(event: Event) -> bool:
    return (
        event.type == "sandbox.terminated"
        and event.data.get("reason") in GONE_DETAIL
        and event.data.get("state") == "ready"
    )
