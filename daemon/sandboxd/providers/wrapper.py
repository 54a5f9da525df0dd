"""Wrapping a provider without losing what it can do.

`Wrapper` delegates every `Provider` method to `inner`; a subclass overrides what it
changes (fault injection, a guard). `wrap(cls, inner, ...)` builds the subclass with exactly
the optional capabilities (`base.CAPABILITIES`) that `inner` has, so `isinstance(wrapped,
Extendable)` is true if and only if it is for `inner`. Every call that changes something
(create, terminate, kill, reset, cleanup, extend) first runs `before_action()`.
"""

from collections.abc import Callable, Collection
from typing import Any, TypeVar

from sandboxd.providers.base import (
    CAPABILITIES,
    Capped,
    Described,
    Extendable,
    Listed,
    Metered,
    Probe,
    Provider,
    ProviderSandbox,
    Watched,
)
from sandboxd.spec import HealthSpec, PoolSpec


class Wrapper:
    """Delegates to `inner`; subclasses override what they change."""

    def __init__(self, inner: Provider):
        self.inner = inner
        self.name = inner.name
        self.gone_reason = inner.gone_reason

    def before_action(self) -> None:
        """Runs before every call that changes a sandbox (a guard may raise here)."""

    @property
    def isolation(self) -> str:
        return self.inner.isolation

    async def create(self, sandbox_id: str, pool: PoolSpec, *, revision: int = 0) -> dict[str, Any]:
        self.before_action()
        return await self.inner.create(sandbox_id, pool, revision=revision)

    async def kill(self, sandbox_id: str, handle: dict[str, Any]) -> None:
        self.before_action()
        await self.inner.kill(sandbox_id, handle)

    async def terminate(self, sandbox_id: str, handle: dict[str, Any]) -> None:
        self.before_action()
        await self.inner.terminate(sandbox_id, handle)

    async def reset(
        self, sandbox_id: str, handle: dict[str, Any], pool: PoolSpec
    ) -> dict[str, Any] | None:
        self.before_action()
        return await self.inner.reset(sandbox_id, handle, pool)

    async def probe(
        self, sandbox_id: str, handle: dict[str, Any], health: HealthSpec | None, since: int
    ) -> Probe:
        return await self.inner.probe(sandbox_id, handle, health, since)

    async def is_alive(self, sandbox_id: str, handle: dict[str, Any]) -> bool:
        return await self.inner.is_alive(sandbox_id, handle)

    async def list_sandboxes(self) -> list[ProviderSandbox]:
        return await self.inner.list_sandboxes()

    async def cleanup_leftovers(self, keep: set[str]) -> list[str]:
        self.before_action()
        return await self.inner.cleanup_leftovers(keep)


class _ForwardCapped:
    inner: Any

    def headroom(self) -> int:
        return int(self.inner.headroom())


class _ForwardExtendable:
    inner: Any

    def before_action(self) -> None: ...

    async def extend(self, sandbox_id: str, handle: dict[str, Any], seconds: float) -> int:
        self.before_action()
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


class _ForwardWatched:
    inner: Any

    def watch(self, sandbox_id: str, on_exit: Callable[[str], None]) -> bool:
        return bool(self.inner.watch(sandbox_id, on_exit))

    def unwatch(self, sandbox_id: str) -> None:
        self.inner.unwatch(sandbox_id)


class _ForwardListed:
    inner: Any

    async def gone_among(self, sandbox_ids: Collection[str]) -> set[str]:
        return set(await self.inner.gone_among(sandbox_ids))


_FORWARDERS: dict[type, type] = {
    Capped: _ForwardCapped,
    Extendable: _ForwardExtendable,
    Metered: _ForwardMetered,
    Described: _ForwardDescribed,
    Watched: _ForwardWatched,
    Listed: _ForwardListed,
}
assert set(_FORWARDERS) == set(CAPABILITIES), "every optional capability is forwarded"

W = TypeVar("W", bound=Wrapper)


_classes: dict[tuple[type, tuple[type, ...]], type] = {}


def wrap(cls: type[W], inner: Provider, *args: Any, **kwargs: Any) -> W:
    """`cls(inner, *args, **kwargs)` with every optional capability `inner` has."""
    has = tuple(c for c in CAPABILITIES if isinstance(inner, c))
    made = _classes.get((cls, has))
    if made is None:
        mixins = tuple(_FORWARDERS[c] for c in has)
        made = _classes[(cls, has)] = type(cls.__name__, (cls, *mixins), {}) if has else cls
    wrapped: W = made(inner, *args, **kwargs)
    return wrapped


class Guarded(Wrapper):
    """Runs `check` before every call that changes a sandbox: a daemon that lost its lease
    (`check` raises) acts on no sandbox any more, whatever loop was about to."""

    def __init__(self, inner: Provider, check: Any):
        super().__init__(inner)
        self._check = check

    def before_action(self) -> None:
        self._check()
