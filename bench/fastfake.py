"""A provider whose sandboxes are entries in a dict: creates and probes cost nothing, so
the daemon's own overhead (the reconcile loop, the health monitor) is what gets measured.
Wrapped in FaultyProvider to add probe latency. For benchmarks only."""

from collections.abc import Callable, Collection
from typing import Any

from sandboxd.providers.base import Probe, ProviderSandbox
from sandboxd.spec import HealthSpec, PoolSpec


class FastFakeProvider:
    name = "local"  # stands in for the local provider in a spec
    isolation = "none"
    gone_reason = "died"

    def __init__(self) -> None:
        self.sandboxes: dict[str, str] = {}  # id -> pool
        self.watched: dict[str, Callable[[str], None]] = {}

    def watch(self, sandbox_id: str, on_exit: Callable[[str], None]) -> bool:
        """Deaths told as they happen, as the local provider's pidfds do (`Watched`)."""
        if sandbox_id not in self.sandboxes:
            return False
        self.watched[sandbox_id] = on_exit
        return True

    def unwatch(self, sandbox_id: str) -> None:
        self.watched.pop(sandbox_id, None)

    def die(self, sandbox_id: str) -> None:
        """The sandbox's processes are gone: its watcher is told."""
        self.sandboxes.pop(sandbox_id, None)
        on_exit = self.watched.pop(sandbox_id, None)
        if on_exit is not None:
            on_exit(sandbox_id)

    async def create(self, sandbox_id: str, pool: PoolSpec, *, revision: int = 0) -> dict[str, Any]:
        self.sandboxes[sandbox_id] = pool.name
        return {"fake": True}

    async def terminate(self, sandbox_id: str, handle: dict[str, Any]) -> None:
        self.sandboxes.pop(sandbox_id, None)

    kill = terminate

    async def reset(self, sandbox_id: str, handle: dict[str, Any], pool: PoolSpec) -> None:
        pass

    async def probe(
        self, sandbox_id: str, handle: dict[str, Any], health: HealthSpec | None, since: int
    ) -> Probe:
        alive = sandbox_id in self.sandboxes
        return Probe(ok=alive, alive=alive, latency_ms=0.0)

    async def is_alive(self, sandbox_id: str, handle: dict[str, Any]) -> bool:
        return sandbox_id in self.sandboxes

    async def gone_among(self, sandbox_ids: Collection[str]) -> set[str]:
        """As E2B's: which are gone, known from one listing."""
        return {i for i in sandbox_ids if i not in self.sandboxes}

    async def list_sandboxes(self) -> list[ProviderSandbox]:
        return [ProviderSandbox(i, pool, {"fake": True}) for i, pool in self.sandboxes.items()]

    async def cleanup_leftovers(self, keep: set[str]) -> list[str]:
        return []
