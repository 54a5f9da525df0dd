"""What every provider offers the reconciler."""

from dataclasses import dataclass, field
from typing import Any, Protocol

from sandboxd.spec import HealthSpec, PoolSpec


class CreateError(RuntimeError):
    """A create failed. `retryable` tells whether trying again can help; `retry_after_s`,
    how long the provider asks to be left alone first."""

    def __init__(self, message: str, *, retryable: bool = True, retry_after_s: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class ResetError(RuntimeError):
    """A released sandbox could not be made clean again; it is terminated instead."""


@dataclass(frozen=True)
class ProviderSandbox:
    """A sandbox as the provider sees it, independent of any Redis record."""

    id: str
    pool: str
    handle: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Probe:
    """One health probe of a sandbox."""

    ok: bool
    alive: bool  # False: the sandbox (its agent) is gone
    latency_ms: float = 0.0
    detail: str = ""  # why it failed
    program: dict[str, Any] | None = None  # the `run:` program's status and news (supervisor)


class Provider(Protocol):
    name: str

    @property
    def isolation(self) -> str:
        """How strongly sandboxes are isolated (`bwrap`, `none`, `vm`…), shown in status."""
        ...

    async def create(self, sandbox_id: str, pool: PoolSpec, *, revision: int = 0) -> dict[str, Any]:
        """Start a sandbox and return its handle once it is ready for use. `revision`: the
        spec revision it is made for (a label, where the provider keeps labels).

        Must clean up after itself if it fails or is cancelled.
        """
        ...

    async def terminate(self, sandbox_id: str, handle: dict[str, Any]) -> None:
        """Stop the sandbox and free everything it holds; idempotent."""
        ...

    async def kill(self, sandbox_id: str, handle: dict[str, Any]) -> None:
        """Stop the sandbox's processes abruptly, keeping what terminate would free (a crash,
        for fault injection)."""
        ...

    async def reset(
        self, sandbox_id: str, handle: dict[str, Any], pool: PoolSpec
    ) -> dict[str, Any] | None:
        """Make a released sandbox fit for the next claimant: stop every process its last
        holder left, run the pool's reset command, restart its `run:` program. Raise if that
        fails. Returns the sandbox's new handle if the reset changed it (None: unchanged)."""
        ...

    async def probe(
        self, sandbox_id: str, handle: dict[str, Any], health: HealthSpec | None, since: int
    ) -> Probe:
        """Liveness, plus `health.command` if given (None: liveness and program news only),
        plus the `run:` program's events and output lines numbered after `since`."""
        ...

    async def is_alive(self, sandbox_id: str, handle: dict[str, Any]) -> bool:
        """Cheap check that the sandbox still exists (no probe of its health)."""
        ...

    async def list_sandboxes(self) -> list[ProviderSandbox]:
        """Every sandbox this provider holds for sandboxd, for adoption and leak checks."""
        ...

    async def cleanup_leftovers(self, keep: set[str]) -> list[str]:
        """Free whatever the provider holds locally for sandboxes not in `keep`."""
        ...
