"""Keeping cloud sandboxes from their provider's own timeout (E2B kills a sandbox when it
runs out): ready ones get the pool's timeout again once half of it is left; claimed ones
get exactly what is left of the claim's lease, so a dead client's sandbox also ends on the
provider's side. Pools with `keepalive: recycle` are replaced by the planner instead, and
paused sandboxes do not run out.
"""

import logging
import time
from typing import Any

from sandboxd.control.specsource import SpecSource
from sandboxd.providers.base import Extendable
from sandboxd.spec import PoolSpec
from sandboxd.store.events import EventPublisher
from sandboxd.store.loops import every
from sandboxd.store.records import SandboxRecord, SandboxStore

log = logging.getLogger(__name__)

MAX_INTERVAL_S = 5.0
IDLE_TICK_S = 0.5


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
        self._lease: dict[str, int] = {}  # sandbox id -> the lease its timeout was set to
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
        without such pools, soon enough to notice a new one before its first half is up."""
        self._pools()
        timeouts = self._timeouts
        return min([MAX_INTERVAL_S] + [t / 4 for t in timeouts]) if timeouts else IDLE_TICK_S

    async def run(self) -> None:
        await every(self.interval_s, self.once, "keepalive round skipped")

    async def once(self) -> None:
        pools = self._pools()
        if not self._providers or not self._relevant:
            return
        records = [r for r in await self._store.records() if r.provider in self._providers]
        for record in records:
            spec = pools.get(record.pool)
            seconds = self._due(record, spec, time.time()) if spec else None
            if seconds is not None:
                await self._extend(record, seconds)
        current = {r.id for r in records}
        for gone in self._expires.keys() - current:
            self._expires.pop(gone, None)
            self._lease.pop(gone, None)

    def _due(self, record: SandboxRecord, spec: PoolSpec, now: float) -> float | None:
        """The timeout to set now, if one is due."""
        settings = spec.e2b_settings
        if record.state == "claimed":
            if self._lease.get(record.id) == record.lease_expires_ms:
                return None
            self._lease[record.id] = record.lease_expires_ms
            return max(1.0, record.lease_expires_ms / 1000 - now)
        if record.state != "ready" or record.handle.get("paused"):
            return None
        if settings.keepalive == "recycle":
            return None
        timeout = record.handle.get("timeout_s", settings.timeout_s)
        expires = self._expires.setdefault(record.id, record.created_ts + timeout)
        return timeout if expires - now < timeout / 2 else None

    async def _extend(self, record: SandboxRecord, seconds: float) -> None:
        provider = self._providers[record.provider]
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
            return
        self.extended += 1
        self._expires[record.id] = time.time() + applied
