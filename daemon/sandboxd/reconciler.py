"""The level-triggered control loop: make what runs match the spec in force."""

import asyncio
import logging
import time
import uuid
from typing import Any

from redis.exceptions import RedisError
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from sandboxd.claims import ClaimStore
from sandboxd.config import Config
from sandboxd.events import EventPublisher
from sandboxd.plan import Observed, PoolPlan, plan
from sandboxd.providers import Provider
from sandboxd.recycler import Recycler
from sandboxd.redisconn import cancelling, survive
from sandboxd.spec import PoolSpec
from sandboxd.specsource import SpecSource
from sandboxd.state import SandboxRecord, SandboxState, SandboxStore
from sandboxd.terminator import Terminator

log = logging.getLogger(__name__)


def new_sandbox_id() -> str:
    return f"sb-{uuid.uuid4().hex[:16]}"


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
    ):
        self._config = config
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
        self._instance = instance
        self._wake = asyncio.Event()
        self._inflight: set[str] = set()  # ids of creates running in this process
        self._stuck: set[str] = set()  # seen terminating/resetting, unhandled, last pass
        # Liveness (a /proc lookup per sandbox) and republishing pool settings run once per
        # tick, not on every nudged pass: under claim load that is thousands a second.
        self._tick_due = 0.0
        self._published_revision = -1
        self.first_pass = asyncio.Event()
        self._work: asyncio.TaskGroup | None = None
        self.last_pass_at = 0.0

    def nudge(self) -> None:
        """Reconcile now instead of at the next tick (spec applied, create finished…)."""
        self._wake.set()

    async def run(self) -> None:
        """Reconcile on every nudge and tick until cancelled; creates and recycling of
        released sandboxes run as tasks in this scope."""
        async with asyncio.TaskGroup() as work:
            self._work = work
            try:
                while True:
                    cpu_before = time.thread_time()
                    await self._pass_surviving_redis_errors()
                    self.first_pass.set()
                    busy_s, ended = time.thread_time() - cpu_before, time.monotonic()
                    await self._sleep_until_nudged()
                    await _idle_at_least(busy_s, since=ended)
                    if cancelling():
                        raise asyncio.CancelledError
            finally:
                self._work = None

    async def _sleep_until_nudged(self) -> None:
        try:
            async with asyncio.timeout(self._config.reconcile_interval_s):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _pass_surviving_redis_errors(self) -> None:
        try:
            await self.reconcile_once()
        except RedisError as exc:
            if not survive(exc):
                raise
            log.warning("reconcile pass failed, Redis unavailable: %s", exc)

    async def reconcile_once(self) -> None:
        self._wake.clear()
        spec = await self._specs.refresh()
        pools = list(spec.pools) if spec else []
        tick = time.monotonic() >= self._tick_due
        if tick:
            self._tick_due = time.monotonic() + self._config.reconcile_interval_s
        if tick or self._specs.revision != self._published_revision:
            await self._claims.publish_pool_settings(pools)
            self._published_revision = self._specs.revision
        specs = {p.name: p for p in pools}
        records = await self._reap_dead(await self._store.records(), check_liveness=tick)
        if tick:
            await self._store.sync_members(records)
        self._recycle_released(records, specs)
        waiting = await self._claims.count_waiters(
            [p.name for p in pools if p.on_empty == "create"]
        )
        slots = self._config.max_concurrent_creates - len(self._inflight)
        observed = [Observed(r.id, r.pool, r.state, r.created_ts) for r in records]
        plans = plan(pools, observed, create_slots=slots, now=time.time(), waiting=waiting)
        by_id = {r.id: r for r in records}
        for pool_plan in plans:
            if pool_plan.changes:
                await self._act(pool_plan, specs.get(pool_plan.pool), by_id)
        self.last_pass_at = time.time()

    async def _reap_dead(
        self, records: list[SandboxRecord], *, check_liveness: bool
    ) -> list[SandboxRecord]:
        """Sandboxes whose process is gone: close the record (reason `died`), drop from view.

        A `creating` record with no create running here was abandoned (Redis went away
        mid-create): close it too, or it would count against the pool forever. So is a
        `terminating` or `resetting` one that nobody here has been handling for two passes.
        A record whose state moved on since the snapshot is not stopped, and still counts.
        """
        alive = []
        stuck: set[str] = set()
        for record in records:
            verdict = await self._verdict(record, stuck, check_liveness)
            if verdict is None or not await self.terminate(record, *verdict):
                alive.append(record)
        self._stuck = stuck
        return alive

    async def _verdict(
        self, record: SandboxRecord, stuck: set[str], check_liveness: bool
    ) -> tuple[Any, ...] | None:
        """(reason, *states it may be stopped from) if the record should be closed."""
        if record.state == "creating" and record.id not in self._inflight:
            return ("interrupted", "creating")
        if record.state in ("terminating", "resetting") and not self._handling(record.id):
            if record.id in self._stuck:
                return ("interrupted", "terminating", "resetting")
            stuck.add(record.id)
        provider = self._providers.get(record.provider)
        if check_liveness and provider and record.state in ("ready", "claimed", "released"):
            if not await provider.is_alive(record.id, record.handle):
                return ("died", "ready", "claimed", "released")
        return None

    def _handling(self, sandbox_id: str) -> bool:
        return sandbox_id in self._terminator.running or sandbox_id in self._recycler.running

    def _recycle_released(self, records: list[SandboxRecord], specs: dict[str, PoolSpec]) -> None:
        assert self._work is not None, "recycling only starts inside run()"
        for record in records:
            if record.state == "released" and record.id not in self._recycler.running:
                self._recycler.running.add(record.id)  # before the task runs: one per id
                self._work.create_task(
                    self._recycler.recycle(record, specs.get(record.pool)),
                    name=f"recycle {record.id}",
                )

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
                group.create_task(self.terminate(by_id[sandbox_id], reason, "ready"))
        if spec is not None:
            for _ in range(pool_plan.create):
                await self._start_create(spec)

    async def terminate(self, record: SandboxRecord, reason: str, *states: SandboxState) -> bool:
        """Take the sandbox out of circulation (if still in `states`), stop it, close it."""
        return await self._terminator.terminate(record, reason, *states)

    async def _start_create(self, spec: PoolSpec) -> None:
        record = SandboxRecord(
            id=new_sandbox_id(),
            pool=spec.name,
            provider=spec.provider,
            state="creating",
            template=spec.template,
            spec_revision=self._specs.revision,
            instance=self._instance,
        )
        self._inflight.add(record.id)
        try:
            await self._store.add(record)  # counted in the pool's total from now on
        except BaseException:
            self._inflight.discard(record.id)
            raise
        await self._events.publish(
            "sandbox.creating",
            pool=spec.name,
            sandbox=record.id,
            template=spec.template,
            provider=spec.provider,
            spec_revision=record.spec_revision,
        )
        assert self._work is not None, "creates only start inside run()"
        self._work.create_task(self._create(record, spec), name=f"create {record.id}")

    async def _create(self, record: SandboxRecord, spec: PoolSpec) -> None:
        try:
            await self._create_and_publish(record, spec)
        except RedisError as exc:
            if not survive(exc):
                raise
            log.warning(
                "create abandoned, Redis unavailable: %s",
                exc,
                extra={"sandbox": record.id, "pool": record.pool},
            )
        finally:
            self._inflight.discard(record.id)

    async def _create_and_publish(self, record: SandboxRecord, spec: PoolSpec) -> None:
        started = time.perf_counter()
        try:
            handle = await self._create_with_retries(record, spec)
        except asyncio.CancelledError:
            await asyncio.shield(self._store.remove(record))
            raise
        except Exception:
            await self._give_up(record)
            return  # no nudge: the next tick tries again, so a failing provider is not hammered
        create_ms = round((time.perf_counter() - started) * 1000, 1)
        event = self._events.build(
            "sandbox.ready",
            pool=record.pool,
            sandbox=record.id,
            create_ms=create_ms,
            isolation=handle.get("isolation", ""),
            pid=handle.get("pid"),
        )
        try:
            ready = await self._store.mark_ready(record, handle, event, maxlen=self._events.maxlen)
        except BaseException:
            await asyncio.shield(self._providers[spec.provider].terminate(record.id, handle))
            raise
        if not ready:
            # The record went away while we created (pool drained, daemon stopping).
            await self._providers[spec.provider].terminate(record.id, handle)
            return
        log.info(
            "sandbox ready",
            extra={"sandbox": record.id, "pool": record.pool, "create_ms": create_ms},
        )
        self.nudge()

    async def _create_with_retries(self, record: SandboxRecord, spec: PoolSpec) -> dict:
        provider = self._providers[spec.provider]
        attempts = self._config.create_attempts
        retrying = AsyncRetrying(
            stop=stop_after_attempt(attempts),
            wait=wait_exponential_jitter(initial=0.2, max=10),
            retry=retry_if_exception(lambda exc: getattr(exc, "retryable", True)),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                number = attempt.retry_state.attempt_number
                try:
                    async with asyncio.timeout(self._config.create_timeout_s):
                        return await provider.create(record.id, spec)
                except Exception as exc:
                    will_retry = getattr(exc, "retryable", True) and number < attempts
                    await self._report_failure(record, exc, number, attempts, will_retry)
                    raise
        raise AssertionError("unreachable: tenacity reraises the last error")

    async def _report_failure(
        self, record: SandboxRecord, exc: Exception, number: int, attempts: int, will_retry: bool
    ) -> None:
        error = str(exc) or type(exc).__name__
        log.warning(
            "create failed",
            extra={"sandbox": record.id, "pool": record.pool, "attempt": number, "error": error},
        )
        await self._events.publish(
            "sandbox.create_failed",
            pool=record.pool,
            sandbox=record.id,
            attempt=number,
            attempts=attempts,
            error=error,
            will_retry=will_retry,
        )

    async def _give_up(self, record: SandboxRecord) -> None:
        await self._store.remove(record)
        await self._events.publish(
            "sandbox.terminated",
            pool=record.pool,
            sandbox=record.id,
            reason="create_failed",
            state="creating",
        )
