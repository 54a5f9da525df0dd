"""The daemon's side of leases: a claim whose lease ran out loses its sandbox."""

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from redis.exceptions import RedisError

from sandboxd.control.terminator import Terminator
from sandboxd.store.claims import ClaimStore
from sandboxd.store.events import EventPublisher
from sandboxd.store.loops import cancelling, survive, why
from sandboxd.store.records import SandboxStore

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(
        self,
        *,
        claims: ClaimStore,
        store: SandboxStore,
        events: EventPublisher,
        terminator: Terminator,
        interval_s: Callable[[], float],
        node: str = "",
        providers: Mapping[str, object] | None = None,
        cloud: Iterable[str] = (),
    ):
        self._claims = claims
        self._store = store
        self._events = events
        self._terminator = terminator
        self._interval_s = interval_s
        # Whose leases this daemon expires: its node's and, while it leads them, the cloud
        # providers' (`providers` is the daemon's live dict of what it manages).
        self._node = node
        self._providers = providers
        self._cloud = frozenset(cloud)

    async def run(self) -> None:
        """Every interval: expired leases -> `sandbox.lease_expired`, then terminated."""
        async with asyncio.TaskGroup() as group:
            while True:
                try:
                    expired = await self._claims.expire_due(**self._scope())
                except RedisError as exc:
                    if not survive(exc):
                        raise
                    log.warning("lease check failed, %s: %s", why(exc), exc)
                    expired = []
                self._terminator.running.update(expired)  # before any other task looks
                for sandbox_id in expired:
                    group.create_task(self._expire(sandbox_id), name=f"expire {sandbox_id}")
                if cancelling():  # a cancel the Redis client swallowed mid-command
                    raise asyncio.CancelledError
                await asyncio.sleep(self._interval_s())

    def _scope(self) -> dict[str, Any]:
        if self._providers is None:
            return {}
        managed = set(self._providers)
        return {"node": self._node, "managed": managed, "cloud": managed & self._cloud}

    async def _expire(self, sandbox_id: str) -> None:
        try:
            record = await self._store.get(sandbox_id)
            if record is None:
                return
            await self._events.publish(
                "sandbox.lease_expired",
                pool=record.pool,
                sandbox=record.id,
                claimant=record.claimant,
                claim_id=record.claim_id,
                lease_expires_ms=record.lease_expires_ms,
                **({"via": record.claim_via} if record.claim_via else {}),
            )
            await self._terminator.finish(record, "lease_expired", "claimed")
        except Exception as exc:  # the reconciler closes what is left on a later pass
            log.warning("lease expiry incomplete: %s", exc, extra={"sandbox": sandbox_id})
        finally:
            self._terminator.running.discard(sandbox_id)
