"""Fault injection: wrap any provider so creates fail, slow down or hang, and sandboxes die
suddenly — for chaos tests and benchmarks. Configured per provider (`[faults.<name>]`)."""

import asyncio
import random
from collections import Counter
from typing import Any

from sandboxd.config import Faults
from sandboxd.providers.base import CreateError, Probe, Provider, ProviderSandbox
from sandboxd.spec import HealthSpec, PoolSpec


class FaultyProvider:
    """Delegates to `inner`, injecting `faults`; `injected` counts what it did."""

    def __init__(self, inner: Provider, faults: Faults):
        self.inner = inner
        self.faults = faults
        self.name = inner.name
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
