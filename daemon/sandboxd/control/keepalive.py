"""Keeping cloud sandboxes from their provider's own timeout (E2B kills a sandbox when it
runs out).

- Ready ones get the pool's timeout again once half of it is left.
- Claimed ones follow their lease, for the whole lease: the timeout is set to what is left
  of it plus LEASE_GRACE_S, at most what the provider allows at once (`e2b.max_timeout_s`);
  while the lease outlasts that, it is set again each time half of it is left. So a dead
  client's sandbox also ends on the provider's side (shortly after its lease, even with the
  daemon down), and never before: the grace leaves the daemon's lease keeper the time to end
  it as `lease_expired` rather than find it lost.
- A claim or a renew is followed within FOLLOW_AFTER_S: the loop reads the event stream and
  wakes on `sandbox.claimed` and `sandbox.lease_renewed` (appended by the claim scripts
  themselves), so the provider knows of a renew within a fraction of a second, not at the
  next round. Not at once: a claimed sandbox still has at least half its timeout, and the
  provider call would share the host's CPUs with the claimant's first moments (its claim's
  answer, its first command), which are what a warm pool is for; claims in that window are
  followed together.

Pools with `keepalive: recycle` are replaced by the planner instead, and paused sandboxes
do not run out.
"""

import asyncio
import logging
import time
from typing import Any

from sandboxd.control.specsource import SpecSource
from sandboxd.providers.base import Extendable
from sandboxd.spec import PoolSpec
from sandboxd.store.events import EventPublisher
from sandboxd.store.eventtail import read_after, stream_end
from sandboxd.store.loops import forever
from sandboxd.store.records import SandboxRecord, SandboxStore

log = logging.getLogger(__name__)

MAX_INTERVAL_S = 5.0
IDLE_TICK_S = 0.5
MIN_WAIT_S = 0.05
BLOCK_MS = 1000  # the longest single XREAD wait (the client's socket timeout is longer)
FOLLOW_AFTER_S = 0.1  # a claim's or renew's provider call waits this long (see above)
WAKE_ON = frozenset({"sandbox.claimed", "sandbox.lease_renewed"})
COVERED_S = 0.5  # a timeout ending this close to the lease's end (and grace) covers it
LEASE_GRACE_S = 5.0  # a claimed sandbox's timeout outlasts its lease by this much


class Keepalive:
    def __init__(
        self,
        *,
        store: SandboxStore,
        specs: SpecSource,
        providers: dict[str, Any],
        events: EventPublisher,
    ):
        self._store = store
        self._specs = specs
        self._providers: dict[str, Extendable] = {
            n: p for n, p in providers.items() if isinstance(p, Extendable)
        }
        self._events = events
        self._expires: dict[str, float] = {}  # sandbox id -> when its timeout ends (unix s)
        self._applied: dict[str, float] = {}  # sandbox id -> the timeout last set (s)
        self._lease: dict[str, int] = {}  # sandbox id -> the lease its timeout follows (ms)
        self._cursor: str | None = None  # the last event read of the stream
        self.extended = 0
        self._doc: object = None  # the spec document the three below were computed from
        self._by_name: dict[str, PoolSpec] = {}
        self._timeouts: list[float] = []  # of the E2B pools
        self._relevant = False  # any pool of a provider with timeouts

    def _pools(self) -> dict[str, PoolSpec]:
        """The pools in force by name, computed once per spec document (not per round:
        with thousands of pools that would be most of an idle daemon's work)."""
        doc = self._specs.in_force
        if doc is not self._doc:
            self._doc = doc
            pools = list(doc.pools) if doc else []
            self._by_name = {p.name: p for p in pools}
            self._timeouts = [p.e2b_settings.timeout_s for p in pools if p.provider == "e2b"]
            self._relevant = any(p.provider in self._providers for p in pools)
        return self._by_name

    def interval_s(self) -> float:
        """A quarter of the shortest timeout, so there are two tries before half is gone;
        without such pools, soon enough to notice a new one before its first half is up.
        Sooner when a claimed sandbox's capped timeout is half gone before that."""
        self._pools()
        timeouts = self._timeouts
        interval = min([MAX_INTERVAL_S] + [t / 4 for t in timeouts]) if timeouts else IDLE_TICK_S
        next_due = self._next_due()
        if next_due is not None:
            interval = min(interval, next_due - time.time())
        return max(MIN_WAIT_S, interval)

    def _next_due(self) -> float | None:
        """When the first claimed sandbox whose timeout ends before its lease is due again."""
        due = [
            self._expires[sid] - self._applied[sid] / 2
            for sid, lease_ms in self._lease.items()
            if sid in self._expires
            and self._expires[sid] < lease_ms / 1000 + LEASE_GRACE_S - COVERED_S
        ]
        return min(due, default=None)

    async def run(self) -> None:
        await forever(self._serve, "keepalive round skipped")

    async def _serve(self) -> None:
        """One round over every sandbox, then wait for the next one, following claims and
        renews as they come meanwhile."""
        redis, stream = self._store.redis, self._store.keys.events
        if not self._needed():
            # No pool of a provider with timeouts (local pools only): nothing to follow,
            # and reading every event would cost a busy daemon a tenth of its CPU. A pool
            # that needs it is followed from the stream's end on (its first round covers
            # what came before).
            self._cursor = None
            await asyncio.sleep(self.interval_s())
            return
        if self._cursor is None:
            self._cursor = await stream_end(redis, stream)
        await self.once()
        await self._follow_events(self.interval_s())

    async def _follow_events(self, seconds: float) -> None:
        """Until `seconds` have passed: extend each sandbox a claim or renew names."""
        redis, stream = self._store.redis, self._store.keys.events
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            assert self._cursor is not None
            block_ms = max(1, min(BLOCK_MS, int(left * 1000)))
            entries = await read_after(redis, stream, self._cursor, block_ms=block_ms)
            wanted: set[str] = set()
            for entry_id, event in entries:
                self._cursor = entry_id
                if event is not None and event.type in WAKE_ON and event.sandbox:
                    wanted.add(event.sandbox)
            if wanted and self._providers:
                await asyncio.sleep(FOLLOW_AFTER_S)  # off the claimant's first moments
                await self.follow(wanted)
            if not entries and _order(newest := await stream_end(redis, stream)) < _order(
                self._cursor
            ):
                self._cursor = newest  # the stream was deleted and started anew

    async def follow(self, sandbox_ids: set[str]) -> None:
        """Bring these sandboxes' timeouts in line with their records now."""
        pools = self._pools()
        for sandbox_id in sorted(sandbox_ids):
            record = await self._store.get(sandbox_id)
            spec = pools.get(record.pool) if record is not None else None
            if record is None or spec is None or record.provider not in self._providers:
                continue
            seconds = self._due(record, spec, time.time())
            if seconds is not None:
                await self._extend(record, seconds)

    def _needed(self) -> bool:
        """Is any pool in force of a provider with timeouts?"""
        self._pools()
        return bool(self._providers) and self._relevant

    async def once(self) -> None:
        pools = self._pools()
        if not self._needed():
            return
        records = [r for r in await self._store.records() if r.provider in self._providers]
        for record in records:
            spec = pools.get(record.pool)
            seconds = self._due(record, spec, time.time()) if spec else None
            if seconds is not None:
                await self._extend(record, seconds)
        current = {r.id for r in records}
        for gone in self._expires.keys() - current:
            self._forget(gone)
        for gone in self._lease.keys() - {r.id for r in records if r.state == "claimed"}:
            self._lease.pop(gone, None)  # claimed no more: the next claim is followed anew

    def _forget(self, sandbox_id: str) -> None:
        self._expires.pop(sandbox_id, None)
        self._applied.pop(sandbox_id, None)
        self._lease.pop(sandbox_id, None)

    def _due(self, record: SandboxRecord, spec: PoolSpec, now: float) -> float | None:
        """The timeout to set now, if one is due."""
        settings = spec.e2b_settings
        if record.state == "claimed":
            return self._lease_due(record, now)
        if record.state != "ready" or record.handle.get("paused"):
            return None
        if settings.keepalive == "recycle":
            return None
        timeout = record.handle.get("timeout_s", settings.timeout_s)
        expires = self._expires.setdefault(record.id, record.created_ts + timeout)
        return timeout if expires - now < timeout / 2 else None

    def _lease_due(self, record: SandboxRecord, now: float) -> float | None:
        """A claimed sandbox: what is left of its lease when the lease is new (a claim, a
        renew) or when the timeout set for it ends before the lease and half of it is gone.
        The provider caps what it applies; the rest follows in later steps."""
        until = record.lease_expires_ms / 1000 + LEASE_GRACE_S
        left = max(1.0, until - now)
        if self._lease.get(record.id) != record.lease_expires_ms:
            return left
        expires = self._expires.get(record.id)
        if expires is None:
            return left
        if expires >= until - COVERED_S:
            return None  # the timeout lasts as long as the lease
        applied = self._applied.get(record.id, 0.0)
        return left if expires - now <= applied / 2 else None

    async def _extend(self, record: SandboxRecord, seconds: float) -> None:
        provider = self._providers[record.provider]
        started = time.time()
        try:
            applied = await provider.extend(record.id, record.handle, seconds)
        except Exception as exc:
            error = str(exc) or type(exc).__name__
            log.warning("keepalive failed", extra={"sandbox": record.id, "error": error})
            await self._events.publish(
                "sandbox.keepalive_failed",
                pool=record.pool,
                sandbox=record.id,
                error=error,
                state=record.state,
            )
            return  # a claimed one is tried again next round: its lease is not marked done
        self.extended += 1
        self._expires[record.id] = started + applied
        self._applied[record.id] = applied
        if record.state == "claimed":
            self._lease[record.id] = record.lease_expires_ms


def _order(entry_id: str) -> tuple[int, int]:
    """A stream id as a comparable pair ((0, 0) for one that does not parse)."""
    ms, _, seq = str(entry_id).partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return 0, 0
