"""Stopping a sandbox: take it out of circulation in Redis, stop it, close its record."""

import logging
from collections.abc import Callable
from typing import Any

from sandboxd.providers import Provider
from sandboxd.store.events import EventPublisher
from sandboxd.store.records import SandboxRecord, SandboxState, SandboxStore

log = logging.getLogger(__name__)


class Terminator:
    def __init__(self, store: SandboxStore, providers: dict[str, Provider], events: EventPublisher):
        self._store = store
        self._providers = providers
        self._events = events
        self.running: set[str] = set()  # ids being stopped by this process right now
        # Told of every record this changed or found changed (the reconciler's view reads
        # it again: a half-done stop leaves a `terminating` record no event names).
        self.changed: Callable[[str], None] = lambda sandbox_id: None

    @property
    def providers(self) -> dict[str, Provider]:
        return self._providers

    async def terminate(
        self, record: SandboxRecord, reason: str, *states: SandboxState, **data: Any
    ) -> bool:
        """Stop the sandbox if it is still in one of `states` (else someone else has it);
        `data` goes into the `sandbox.terminated` event."""
        try:
            previous = await self._store.begin_terminate(record, *states)
        finally:
            self.changed(record.id)
        if previous is None:
            return False
        await self.finish(record, reason, previous, **data)
        return True

    async def finish(self, record: SandboxRecord, reason: str, previous: str, **data: Any) -> None:
        """Stop a sandbox already marked `terminating` and close its record."""
        self.running.add(record.id)
        try:
            provider = self._providers.get(record.provider)
            if provider is not None:
                await provider.terminate(record.id, record.handle)
            await self._store.remove(record)
        except Exception as exc:
            # A cloud API can fail: the record stays `terminating`, so the reconciler tries
            # again (and the janitor kills the sandbox should the record be lost).
            log.warning(
                "terminate failed, will retry: %s",
                exc,
                extra={"sandbox": record.id, "pool": record.pool, "error": str(exc)},
            )
            return
        finally:
            self.running.discard(record.id)
            self.changed(record.id)
        await self._events.publish(
            "sandbox.terminated",
            pool=record.pool,
            sandbox=record.id,
            reason=reason,
            state=previous,
            **data,
        )
        log.info(
            "sandbox terminated",
            extra={"sandbox": record.id, "pool": record.pool, "reason": reason},
        )
