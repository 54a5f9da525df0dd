"""A provider whose library is not installed: every create fails permanently, saying how to
install it, so its pools show `failed` with that reason instead of the daemon not starting."""

from typing import Any

from sandboxd.providers.base import CreateError, Probe, ProviderSandbox
from sandboxd.spec import HealthSpec, PoolSpec


class UnavailableProvider:
    def __init__(self, name: str, reason: str):
        self.name = name
        self.gone_reason = "lost"
        self.reason = reason

    @property
    def isolation(self) -> str:
        return "unavailable"

    async def create(self, sandbox_id: str, pool: PoolSpec, *, revision: int = 0) -> dict[str, Any]:
        raise CreateError(self.reason, retryable=False)

    async def terminate(self, sandbox_id: str, handle: dict[str, Any]) -> None:
        return None  # it cannot have made anything

    async def kill(self, sandbox_id: str, handle: dict[str, Any]) -> None:
        return None

    async def reset(self, sandbox_id: str, handle: dict[str, Any], pool: PoolSpec) -> None:
        raise CreateError(self.reason, retryable=False)

    async def probe(
        self, sandbox_id: str, handle: dict[str, Any], health: HealthSpec | None, since: int
    ) -> Probe:
        return Probe(ok=False, alive=False, detail=self.reason)

    async def is_alive(self, sandbox_id: str, handle: dict[str, Any]) -> bool:
        return False

    async def list_sandboxes(self) -> list[ProviderSandbox]:
        return []

    async def cleanup_leftovers(self, keep: set[str]) -> list[str]:
        return []
