"""Fault injection: wrap any provider so creates fail, slow down or hang, and sandboxes die
suddenly — for chaos tests and benchmarks. Configured per provider (`[faults.<name>]`).

`inject(provider, faults)` returns a wrapper (`providers/wrapper.py`) with exactly the
optional capabilities of the provider it wraps: wrapping E2B keeps its concurrency cap and
its keepalive. `hang_once` is the reconcile loop's chaos hook (`watchdog_hang_file`), which
only the composition root wires in when a test asks for it.
"""

import asyncio
import logging
import os
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sandboxd.config import Faults
from sandboxd.providers.base import (
    CreateError,
    Probe,
    Provider,
)
from sandboxd.providers.wrapper import Wrapper, wrap
from sandboxd.spec import HealthSpec, PoolSpec

log = logging.getLogger(__name__)


class FaultyProvider(Wrapper):
    """Delegates to `inner`, injecting `faults`; `injected` counts what it did. Build it with
    `inject`, which adds the capabilities `inner` has."""

    def __init__(self, inner: Provider, faults: Faults):
        super().__init__(inner)
        self.faults = faults
        self.injected: Counter[str] = Counter()
        self._random = random.Random(faults.seed)
        self._live: dict[str, dict[str, Any]] = {}  # created here and not terminated

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
        handle = await super().create(sandbox_id, pool, revision=revision)
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

    async def terminate(self, sandbox_id: str, handle: dict[str, Any]) -> None:
        self._live.pop(sandbox_id, None)
        await super().terminate(sandbox_id, handle)

    async def probe(
        self, sandbox_id: str, handle: dict[str, Any], health: HealthSpec | None, since: int
    ) -> Probe:
        if self.faults.probe_latency_s:
            await asyncio.sleep(self.faults.probe_latency_s)
        return await super().probe(sandbox_id, handle, health, since)


def inject(inner: Provider, faults: Faults) -> FaultyProvider:
    """`inner` with `faults` injected, keeping every optional capability it has."""
    return wrap(FaultyProvider, inner, faults)


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
