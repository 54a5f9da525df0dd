"""Fault injection: wrap any provider so creates fail, slow down or hang, and sandboxes die
suddenly — for chaos tests and benchmarks. Configured per provider (`[faults.<name>]`).

`inject(provider, faults)` returns a wrapper with exactly the optional capabilities
(`providers/base.py`) of the provider it wraps: wrapping E2B keeps its concurrency cap and
its keepalive. `hang_once` is the reconcile loop's chaos hook (`watchdog_hang_file`), which
only the composition root wires in when a test asks for it.
"""

import asyncio
import functools
import logging
import os
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sandboxd.config import Faults
from sandboxd.providers.base import (
    CAPABILITIES,
    Capped,
    CreateError,
    Described,
    Extendable,
    Metered,
    Probe,
    Provider,
    ProviderSandbox,
)
from sandboxd.spec import HealthSpec, PoolSpec

log = logging.getLogger(__name__)


class FaultyProvider:
    """Delegates to `inner`, injecting `faults`; `injected` counts what it did. Build it with
    `inject`, which adds the capabilities `inner` has."""

    def __init__(self, inner: Provider, faults: Faults):
        self.inner = inner
        self.faults = faults
        self.name = inner.name
        self.gone_reason = inner.gone_reason
        self.injected: Counter[str] = Counter()
        self._random = random.Random(faults.seed)
        self._live: dict[str, dict[str, Any]] = {}  # created here and not terminated

    @property
    def isolation(self) -> str:
        return self.inner.isolation

    async def create(self, sandbox_id: str, pool: PoolSpec, *, revision: int = 0) -> dict[str, Any]:
        if self.faults.create_latency_s:
            await asyncio.sleep(self.faults.create_latency_s)
        roll = self._random.random()
        if roll < self.faults.create_hang_rate:
            self.injected["create_hang"] += 1
            await asyncio.Future()  # until the caller's create timeout cancels it
        if roll < self.faults.create_hang_rate + self.faults.create_failure_rate:
            self.injected["create_failure"] += 1
            raise CreateError(
                "injected create failure", retryable=self.faults.create_failure_retryable
            )
        handle = await self.inner.create(sandbox_id, pool, revision=revision)
        self._live[sandbox_id] = handle
        return handle

    async def kill_random(self) -> str | None:
        """A sudden death: kill one live sandbox's processes behind the daemon's back (its
        record stays). Returns the id, or None if there is none."""
        alive = [i for i, h in self._live.items() if await self.inner.is_alive(i, h)]
        if not alive:
            return None
        victim = self._random.choice(sorted(alive))
        await self.kill(victim, self._live[victim])
        self.injected["death"] += 1
        return victim

    async def kill(self, sandbox_id: str, handle: dict[str, Any]) -> None:
        await self.inner.kill(sandbox_id, handle)

    async def terminate(self, sandbox_id: str, handle: dict[str, Any]) -> None:
        self._live.pop(sandbox_id, None)
        await self.inner.terminate(sandbox_id, handle)

    async def reset(
        self, sandbox_id: str, handle: dict[str, Any], pool: PoolSpec
    ) -> dict[str, Any] | None:
        return await self.inner.reset(sandbox_id, handle, pool)

    async def probe(
        self, sandbox_id: str, handle: dict[str, Any], health: HealthSpec | None, since: int
    ) -> Probe:
        if self.faults.probe_latency_s:
            await asyncio.sleep(self.faults.probe_latency_s)
        return await self.inner.probe(sandbox_id, handle, health, since)

    async def is_alive(self, sandbox_id: str, handle: dict[str, Any]) -> bool:
        return await self.inner.is_alive(sandbox_id, handle)

    async def list_sandboxes(self) -> list[ProviderSandbox]:
        return await self.inner.list_sandboxes()

    async def cleanup_leftovers(self, keep: set[str]) -> list[str]:
        return await self.inner.cleanup_leftovers(keep)


class _ForwardCapped:
    inner: Any

    def headroom(self) -> int:
        return int(self.inner.headroom())


class _ForwardExtendable:
    inner: Any

    async def extend(self, sandbox_id: str, handle: dict[str, Any], seconds: float) -> int:
        return int(await self.inner.extend(sandbox_id, handle, seconds))


class _ForwardMetered:
    inner: Any

    def usage(self, handle: dict[str, Any]) -> tuple[float, int] | None:
        result: tuple[float, int] | None = self.inner.usage(handle)
        return result


class _ForwardDescribed:
    inner: Any

    def security_summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = self.inner.security_summary()
        return summary


_FORWARDERS: dict[type, type] = {
    Capped: _ForwardCapped,
    Extendable: _ForwardExtendable,
    Metered: _ForwardMetered,
    Described: _ForwardDescribed,
}
assert set(_FORWARDERS) == set(CAPABILITIES), "every optional capability is forwarded"


@functools.cache
def _wrapper_class(capabilities: tuple[type, ...]) -> type[FaultyProvider]:
    mixins = tuple(_FORWARDERS[c] for c in capabilities)
    return type("FaultyProvider", (FaultyProvider, *mixins), {})


def inject(inner: Provider, faults: Faults) -> FaultyProvider:
    """`inner` with `faults` injected, keeping every optional capability it has."""
    has = tuple(c for c in CAPABILITIES if isinstance(inner, c))
    return _wrapper_class(has)(inner, faults)


def hang_once(token: Path) -> Callable[[], Awaitable[None]]:
    """Chaos tests only (`watchdog_hang_file`): a hook that, when `token` exists, removes it
    and never returns — so the systemd watchdog must catch the hung reconcile loop."""

    async def hook() -> None:
        try:
            os.unlink(token)
        except FileNotFoundError:
            return
        log.warning("hang requested by %s: the reconcile loop stops here", token)
        await asyncio.Event().wait()

    return hook
