"""What every provider offers the reconciler, and what some offer besides.

`Provider` is what every provider must do. The optional capabilities are Protocols of their
own (`Capped`, `Extendable`, `Metered`, `Described`, `Watched`, `Listed`); a caller asks
with `isinstance`, and a wrapper (`providers/faults.py`) has exactly the capabilities of
what it wraps. Nothing asks
with `getattr`/`hasattr`: a capability is found by its declared type or not at all.
"""

from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from sandboxd.spec import HealthSpec, PoolSpec

OutputCallback = Callable[[bytes], None]  # receives a command's output as it comes


@dataclass(frozen=True)
class ExecResult:
    """A command run in a sandbox, through any provider's connection."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


class CreateError(RuntimeError):
    """A create failed. `retryable` tells whether trying again can help; `retry_after_s`,
    how long the provider asks to be left alone first."""

    def __init__(self, message: str, *, retryable: bool = True, retry_after_s: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class IsolationError(RuntimeError):
    """A protection of local sandboxes is missing on this host and was not waived."""


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
    # How a sandbox that the provider no longer has ended: `died` (a local process) or
    # `lost` (a cloud sandbox that vanished).
    gone_reason: str

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


@runtime_checkable
class Capped(Protocol):
    """A provider with a concurrency cap (E2B's plan): the reconciler creates no more than
    `headroom()` sandboxes beyond those it has."""

    def headroom(self) -> int:
        """Sandboxes that may still be created now."""
        ...


@runtime_checkable
class Extendable(Protocol):
    """A provider whose sandboxes expire unless kept alive (E2B's timeout): the keepalive
    loop extends wanted sandboxes and lets unwanted ones run out."""

    def extend(self, sandbox_id: str, handle: dict[str, Any], seconds: float) -> Awaitable[int]:
        """Make the sandbox live `seconds` from now (capped by the provider); returns the
        seconds applied."""
        ...


@runtime_checkable
class Metered(Protocol):
    """A provider that can measure a sandbox's resource use (local processes)."""

    def usage(self, handle: dict[str, Any]) -> tuple[float, int] | None:
        """CPU seconds and resident bytes; None when the sandbox is gone (blocking)."""
        ...


@runtime_checkable
class Described(Protocol):
    """A provider that reports what it enforces (isolation, limits, what is missing)."""

    def security_summary(self) -> dict[str, Any]: ...


@runtime_checkable
class Watched(Protocol):
    """A provider that tells of a sandbox's death when it happens (local: a pidfd of its
    first process in the event loop), so the reconciler need not wait for its tick."""

    def watch(self, sandbox_id: str, on_exit: Callable[[str], None]) -> bool:
        """Call `on_exit(sandbox_id)` once, from the event loop, when the sandbox's first
        process exits; False if it cannot be watched (gone already, no pidfd, too many)."""
        ...

    def unwatch(self, sandbox_id: str) -> None:
        """Stop watching (the sandbox is being stopped, or is no longer this daemon's)."""
        ...


@runtime_checkable
class Listed(Protocol):
    """A provider that knows which of its sandboxes live from one listing (E2B: its metadata
    listing), so the reconciler's liveness check asks it once for all of them instead of
    once per sandbox (10,000 awaits every tick)."""

    async def gone_among(self, sandbox_ids: Collection[str]) -> set[str]:
        """Those of `sandbox_ids` that `is_alive` would say are gone."""
        ...


CAPABILITIES: tuple[type, ...] = (Capped, Extendable, Metered, Described, Watched, Listed)
