"""Recoveries: a ready sandbox lost to death or ill health, and the sandbox that replaces it.

`recovery.started` names the lost sandbox; the pool's next create carries its id (the new
record's `replaces`) and ends the recovery with `recovery.succeeded` (old id -> new id) or
`recovery.failed` (with the reason).
"""

import time
from collections import deque
from dataclasses import dataclass

from sandboxd.store.events import EventPublisher
from sandboxd.store.records import SandboxRecord

MAX_PENDING = 1000  # per pool; a pool scaled down meanwhile may never replace them all


@dataclass(frozen=True)
class Pending:
    old: str
    reason: str
    started: float  # time.monotonic()


class Recoveries:
    def __init__(self, events: EventPublisher):
        self._events = events
        self._pending: dict[str, deque[Pending]] = {}

    async def begin(self, record: SandboxRecord, reason: str, detail: str = "") -> None:
        await self.begin_for(record.pool, record.id, record.state, reason, detail)

    async def begin_for(
        self, pool: str, sandbox_id: str, state: str, reason: str, detail: str = ""
    ) -> None:
        await self._events.publish(
            "recovery.started",
            pool=pool,
            sandbox=sandbox_id,
            reason=reason,
            detail=detail,
            state=state,
        )
        queue = self._pending.setdefault(pool, deque(maxlen=MAX_PENDING))
        queue.append(Pending(sandbox_id, reason, time.monotonic()))

    def take(self, pool: str) -> Pending | None:
        """The oldest recovery of the pool still waiting for a replacement."""
        queue = self._pending.get(pool)
        return queue.popleft() if queue else None

    async def succeeded(self, pending: Pending, record: SandboxRecord) -> None:
        await self._events.publish(
            "recovery.succeeded",
            pool=record.pool,
            sandbox=record.id,
            old=pending.old,
            new=record.id,
            reason=pending.reason,
            recovery_ms=round((time.monotonic() - pending.started) * 1000, 1),
        )

    async def failed(self, pending: Pending, record: SandboxRecord, error: str) -> None:
        await self._events.publish(
            "recovery.failed",
            pool=record.pool,
            sandbox=pending.old,
            old=pending.old,
            attempted=record.id,
            reason=pending.reason,
            error=error,
        )

    def forget(self, pools: set[str]) -> None:
        """Drop the recoveries of pools no longer in the spec."""
        for pool in self._pending.keys() - pools:
            del self._pending[pool]
