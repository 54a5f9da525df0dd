"""The leak janitor: what the providers hold vs what Redis records, on its own interval.

- A sandbox a provider holds for sandboxd that no record names (its record was lost with a
  Redis that forgot everything, or a crash in between) is terminated, checked gone, and
  reported (`sandbox.leaked`).
- A record whose sandbox the provider no longer has is closed (`lost`); a ready one is
  replaced like a dead one.

Records are written before a provider creates and removed after it terminates, so reading
the provider first and Redis second never mistakes a sandbox being created for a leak. A
sweep reads every record's state and provider only (`SandboxStore.presence`), and in full
the few it acts on: its cost is a few microseconds a record, not a full read's decoding.
"""

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from sandboxd.control.terminator import Terminator
from sandboxd.providers import Provider, ProviderSandbox, list_all
from sandboxd.store.events import EventPublisher
from sandboxd.store.loops import every
from sandboxd.store.records import SandboxRecord, SandboxStore

log = logging.getLogger(__name__)
CHECKED = ("ready", "claimed", "released")


@dataclass
class Sweep:
    leaked: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)


class Janitor:
    def __init__(
        self,
        *,
        store: SandboxStore,
        providers: dict[str, Provider],
        events: EventPublisher,
        terminator: Terminator,
        replace: Callable[[SandboxRecord, str, str], Awaitable[bool]],
        interval_s: Callable[[], float],
        before_sweep: Callable[[], Awaitable[Any]] | None = None,
        put_back: Callable[[str], Awaitable[bool]] | None = None,
    ):
        self._store = store
        self._providers = providers
        self._events = events
        self._terminator = terminator
        self._replace = replace
        self._interval_s = interval_s
        self._before_sweep = before_sweep  # put back what Redis lost before judging leaks
        self._put_back = put_back  # one record the journal has and Redis lost

    async def run(self) -> None:
        await every(self._interval_s, self.sweep, "janitor sweep skipped")

    async def sweep(self) -> Sweep:
        if self._before_sweep is not None:
            await self._before_sweep()
        listing = await list_all(self._providers)
        listed = listing.sandboxes
        present = await self._store.presence()
        result = Sweep()
        if self._before_sweep is not None and await self._before_sweep():
            return result  # Redis lost its data meanwhile: restored now, judge next time
        for sandbox_id, (provider, sandbox) in listed.items():
            if sandbox_id not in present and await _tried(self._leaked(provider, sandbox)):
                result.leaked.append(sandbox_id)
        for sandbox_id, seen in present.items():
            if (
                seen.state not in CHECKED
                or sandbox_id in listed
                or seen.provider in listing.failed
                or not self._store.owns(seen)  # another node's: not read in full either
            ):
                continue
            record = await self._store.get(sandbox_id)  # in full: one it may act on
            if (
                record is not None
                and record.state in CHECKED
                and record.provider not in listing.failed
                and await _tried(self._lost(record))
            ):
                result.lost.append(record.id)
        if result.leaked or result.lost:
            log.warning("janitor", extra={"leaked": result.leaked, "lost": result.lost})
        return result

    async def _leaked(self, provider: Provider, sandbox: ProviderSandbox) -> bool:
        if sandbox.id in self._terminator.running:
            return False  # being terminated: its record goes once it is gone
        if self._before_sweep is not None and await self._before_sweep():
            return False  # Redis lost its data just now: restored, not a leak
        if await self._store.has_record_key(sandbox.id):
            # Its record is there but the set of ids lost it (a DEL, a wrong-typed set
            # rebuilt): put the id back, so the next pass reads (or quarantines) the record.
            await self._store.readd_id(sandbox.id)
            log.warning("record missing from the id set: put back", extra={"sandbox": sandbox.id})
            return False
        if self._put_back is not None and await self._put_back(sandbox.id):
            log.warning("record lost by Redis: put back", extra={"sandbox": sandbox.id})
            return False
        if not await provider.is_alive(sandbox.id, sandbox.handle):
            return False  # gone since the listing (terminated meanwhile)
        await provider.terminate(sandbox.id, sandbox.handle)
        gone = not await provider.is_alive(sandbox.id, sandbox.handle)
        await self._events.publish(
            "sandbox.leaked",
            pool=sandbox.pool,
            sandbox=sandbox.id,
            provider=provider.name,
            verified_gone=gone,
        )
        return True

    async def _lost(self, record: SandboxRecord) -> bool:
        provider = self._providers.get(record.provider)
        if provider is None or await provider.is_alive(record.id, record.handle):
            return False  # a listing that lagged behind a create
        detail = "the provider no longer has it"
        if record.state == "ready":
            return await self._replace(record, "lost", detail)
        return await self._terminator.terminate(record, "lost", record.state, detail=detail)


async def _tried(step: Awaitable[bool]) -> bool:
    """One sandbox's check; a provider error skips it until the next sweep."""
    try:
        return await step
    except RedisError:
        raise
    except Exception as exc:
        log.warning("janitor check failed: %s", exc)
        return False
