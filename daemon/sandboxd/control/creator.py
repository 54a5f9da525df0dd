"""Creating a sandbox: its record first, then the provider's create with retries, paced per
pool (breaker, slow start), and `ready` with its event in one Redis step."""

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from sandboxd.config import Config
from sandboxd.control.breaker import Transition
from sandboxd.control.pacing import PoolPacing
from sandboxd.control.replacements import Pending, Recoveries
from sandboxd.providers import CLOUD_PROVIDERS, Provider
from sandboxd.spec import PoolSpec
from sandboxd.store.events import EventPublisher
from sandboxd.store.loops import survive, why
from sandboxd.store.records import SECRETS, SandboxRecord, SandboxStore

log = logging.getLogger(__name__)
_backoff = wait_exponential_jitter(multiplier=0.2, max=10)


def _wait(state: RetryCallState) -> float:
    """Our own backoff, or longer when the provider asked for a pause (a 429)."""
    error = state.outcome.exception() if state.outcome else None
    return max(_backoff(state), getattr(error, "retry_after_s", None) or 0.0)


def new_sandbox_id() -> str:
    return f"sb-{uuid.uuid4().hex[:16]}"


class Creator:
    def __init__(
        self,
        *,
        config: Config,
        store: SandboxStore,
        events: EventPublisher,
        providers: dict[str, Provider],
        recoveries: Recoveries,
        instance: str,
        nudge: Callable[[str], None],
        on_ready: Callable[[SandboxRecord], None] | None = None,
    ):
        self._config = config
        self._on_ready = on_ready  # told of each sandbox this daemon made ready (the journal)
        self._store = store
        self._events = events
        self._providers = providers
        self._recoveries = recoveries
        self._instance = instance
        self._nudge = nudge
        self.pacing: dict[str, PoolPacing] = {}
        self.inflight: set[str] = set()  # ids of creates running in this process
        self._tasks: dict[str, tuple[asyncio.Task, SandboxRecord, float]] = {}
        # Creates the last pass's plan wanted but could not start (global slots, slow
        # start): started by `refill` as soon as a create ends, without waiting for the
        # next pass. Replaced by every pass, so never older than the last snapshot.
        self.owed: dict[str, int] = {}
        self._owed_specs: dict[str, PoolSpec] = {}
        self._owed_revision = 0
        # Held by a pass from its read of the records until its creates are started, and
        # by `refill` while it starts creates: a pass never plans from a snapshot that
        # misses a create started meanwhile (that would overshoot `max_total`).
        self.planning = asyncio.Lock()
        self.work: asyncio.TaskGroup | None = None  # the reconciler's, while it runs
        # Told of a record whose state in Redis this process no longer knows (a write
        # whose reply was lost): the reconciler's view reads it again.
        self.changed: Callable[[str], None] = lambda sandbox_id: None

    def pace(self, pools: list[PoolSpec]) -> dict[str, PoolPacing]:
        """The pacing of every pool in the spec, created or reconfigured."""
        for spec in pools:
            pacing = self.pacing.get(spec.name)
            if pacing is None:
                self.pacing[spec.name] = PoolPacing(spec)
            elif pacing.spec is not spec:  # the same spec object: nothing to reconfigure
                pacing.reconfigure(spec)
        if len(self.pacing) == len(pools):  # every pool has one, so none is gone
            return self.pacing
        for gone in self.pacing.keys() - {p.name for p in pools}:
            if not self.pacing[gone].inflight:
                del self.pacing[gone]
        return self.pacing

    async def start(self, spec: PoolSpec, revision: int, work: asyncio.TaskGroup) -> None:
        """Record the sandbox as `creating` (it counts against the pool from now on), then
        create it in a task of `work`."""
        recovery = self._recoveries.take(spec.name)
        record = SandboxRecord(
            id=new_sandbox_id(),
            pool=spec.name,
            provider=spec.provider,
            state="creating",
            template=spec.template,
            spec_revision=revision,
            build=spec.build_id,
            instance=self._instance,
            node="" if spec.provider in CLOUD_PROVIDERS else self._config.node,
            replaces=recovery.old if recovery else "",
        )
        self.inflight.add(record.id)
        try:
            await self._store.add(record)
        except BaseException:
            # Written or not (a reply lost in a failover): no create runs for it, so a
            # record there is `creating` with nobody creating; the next pass reads it
            # again and closes it (`interrupted`) instead of counting it forever.
            self.inflight.discard(record.id)
            self.changed(record.id)
            raise
        pacing = self.pacing[spec.name]
        pacing.started()
        task = work.create_task(
            self._run(record, spec, pacing, recovery), name=f"create {record.id}"
        )
        self._tasks[record.id] = (task, record, time.monotonic())

    def running(self) -> dict[str, list[str]]:
        """The ids of the creates running in this process, by pool."""
        out: dict[str, list[str]] = {}
        for sandbox_id, (_, record, _) in self._tasks.items():
            out.setdefault(record.pool, []).append(sandbox_id)
        return out

    def owe(
        self,
        owed: dict[str, int],
        specs: dict[str, PoolSpec],
        revision: int,
        *,
        only: set[str] | None = None,
    ) -> None:
        """What the pass's plan wanted beyond what it started, per pool (replacing what
        the previous pass owed; `only`: for those pools, the others' debts stay)."""
        if only is None:
            self.owed, self._owed_specs = {}, {}
        else:
            for pool in only:
                self.owed.pop(pool, None)
                self._owed_specs.pop(pool, None)
        for pool, n in owed.items():
            if n > 0 and pool in specs:
                self.owed[pool], self._owed_specs[pool] = n, specs[pool]
        self._owed_revision = revision

    async def refill(self) -> int:
        """Start owed creates while global slots and the pools' pacing allow, round-robin
        over the pools; skipped while a pass plans (it owes anew). Creates started."""
        work = self.work
        if work is None or not self.owed or self.planning.locked():
            return 0
        started = 0
        async with self.planning:
            progress = True
            while progress and self.owed:
                progress = False
                for pool in list(self.owed):
                    if len(self.inflight) >= self._config.max_concurrent_creates:
                        return started
                    pacing = self.pacing.get(pool)
                    if pacing is None or pacing.limit(time.monotonic()) <= 0:
                        continue
                    self.owed[pool] -= 1
                    if self.owed[pool] <= 0:
                        del self.owed[pool]
                    await self.start(self._owed_specs[pool], self._owed_revision, work)
                    started += 1
                    progress = True
        return started

    async def cancel_stuck(self, grace_s: float) -> None:
        """Cancel creates running longer than `grace_s` (a provider that ignores its own
        timeouts); their records go, and the pool creates anew."""
        now = time.monotonic()
        stuck = [(t, r) for t, r, since in self._tasks.values() if now - since > grace_s]
        for task, _ in stuck:
            task.cancel()
        if stuck:
            await asyncio.wait([task for task, _ in stuck], timeout=30)
        for _, record in stuck:
            await self._closed(record, "stuck_creating")

    async def _run(
        self, record: SandboxRecord, spec: PoolSpec, pacing: PoolPacing, recovery: Pending | None
    ) -> None:
        try:
            await self._create_paced(record, spec, pacing, recovery)
        except RedisError as exc:
            self.changed(record.id)  # what Redis holds of it is read again by the next pass
            if not survive(exc):
                raise
            log.warning(
                "create abandoned, %s: %s",
                why(exc),
                exc,
                extra={"sandbox": record.id, "pool": record.pool},
            )

    async def _create_paced(
        self, record: SandboxRecord, spec: PoolSpec, pacing: PoolPacing, recovery: Pending | None
    ) -> None:
        ok = False
        try:
            ok = await self._create_and_publish(record, spec, pacing)
        finally:
            self.inflight.discard(record.id)
            self._tasks.pop(record.id, None)
            transition = pacing.finished(ok)
        await self._breaker_event(record.pool, pacing, transition)
        if recovery:
            await self._end_recovery(recovery, record, ok, pacing.last_error)
        if ok:  # its slot is free: the next owed create starts now, not at the next pass
            await self.refill()

    async def _end_recovery(
        self, recovery: Pending, record: SandboxRecord, ok: bool, error: str
    ) -> None:
        if ok:
            await self._recoveries.succeeded(recovery, record)
        else:
            await self._recoveries.failed(recovery, record, error or "create failed")

    async def _create_and_publish(
        self, record: SandboxRecord, spec: PoolSpec, pacing: PoolPacing
    ) -> bool:
        await self._events.publish(
            "sandbox.creating",
            pool=record.pool,
            sandbox=record.id,
            template=spec.template,
            provider=spec.provider,
            spec_revision=record.spec_revision,
            replaces=record.replaces,
        )
        started = time.perf_counter()
        try:
            handle = await self._create_with_retries(record, spec, pacing)
        except asyncio.CancelledError:
            await asyncio.shield(self._store.remove(record))
            raise
        except Exception:
            await self._give_up(record)
            return False  # no nudge: the next tick tries again, a failing provider is spared
        create_ms = round((time.perf_counter() - started) * 1000, 1)
        event = self._events.build(
            "sandbox.ready",
            pool=record.pool,
            sandbox=record.id,
            create_ms=create_ms,
            isolation=handle.get("isolation", ""),
            pid=handle.get("pid"),
        )
        provider = self._providers[spec.provider]
        try:
            ready = await self._store.mark_ready(record, handle, event, maxlen=self._events.maxlen)
        except BaseException:
            await asyncio.shield(provider.terminate(record.id, handle))
            raise
        if not ready:
            # The record went away while we created (pool drained, daemon stopping).
            await provider.terminate(record.id, handle)
            return False
        log.info(
            "sandbox ready",
            extra={"sandbox": record.id, "pool": record.pool, "create_ms": create_ms},
        )
        if self._on_ready is not None:
            made: dict[str, Any] = {"state": "ready"}
            made["handle"] = {k: v for k, v in handle.items() if k != SECRETS}
            if isinstance(handle.get(SECRETS), dict):
                made["secrets"] = handle[SECRETS]
            self._on_ready(record.model_copy(update=made))
        self._nudge(record.pool)
        return True

    async def _create_with_retries(
        self, record: SandboxRecord, spec: PoolSpec, pacing: PoolPacing
    ) -> dict:
        provider = self._providers[spec.provider]
        attempts = self._config.create_attempts
        retrying = AsyncRetrying(
            stop=stop_after_attempt(attempts),
            wait=_wait,
            retry=retry_if_exception(lambda exc: _retryable(exc) and pacing.may_retry()),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                number = attempt.retry_state.attempt_number
                try:
                    async with asyncio.timeout(self._config.create_timeout_s):
                        return await provider.create(record.id, spec, revision=record.spec_revision)
                except Exception as exc:
                    await self._attempt_failed(record, pacing, exc, number, attempts)
                    raise
        raise AssertionError("unreachable: tenacity reraises the last error")

    async def _attempt_failed(
        self, record: SandboxRecord, pacing: PoolPacing, exc: Exception, number: int, attempts: int
    ) -> None:
        error = str(exc) or type(exc).__name__
        retryable = _retryable(exc)
        already_failed = pacing.failed
        opened = pacing.attempt_failed(error, time.monotonic(), permanent=not retryable)
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
            retryable=retryable,
            will_retry=retryable and pacing.may_retry() and number < attempts,
            retry_after_s=getattr(exc, "retry_after_s", None),
        )
        await self._breaker_event(record.pool, pacing, opened)
        if pacing.failed and not already_failed:
            await self._events.publish(
                "pool.failed", pool=record.pool, reason=error, attempts=pacing.permanent_failures
            )
            log.error("pool failed", extra={"pool": record.pool, "error": error})

    async def _breaker_event(
        self, pool: str, pacing: PoolPacing, transition: Transition | None
    ) -> None:
        if transition is None:
            return
        if transition.state == "open":
            await self._events.publish(
                "pool.breaker_opened",
                pool=pool,
                failures=pacing.breaker.failures,
                error=transition.error,
                retry_in_s=round(pacing.breaker.cooldown_s, 1),
            )
            log.warning("breaker opened", extra={"pool": pool, "error": transition.error})
        else:
            await self._events.publish("pool.breaker_closed", pool=pool)
            log.info("breaker closed", extra={"pool": pool})

    async def _give_up(self, record: SandboxRecord) -> None:
        await self._store.remove(record)
        await self._closed(record, "create_failed")

    async def _closed(self, record: SandboxRecord, reason: str) -> None:
        """A sandbox that never got past `creating` is gone."""
        await self._events.publish(
            "sandbox.terminated",
            pool=record.pool,
            sandbox=record.id,
            reason=reason,
            state="creating",
        )


def _retryable(exc: BaseException) -> bool:
    """Provider errors say whether retrying can help; a timeout (a hung create) can."""
    return getattr(exc, "retryable", True)
