"""The e2b provider, built when first needed: the `e2b` SDK (~19 MB resident and a few
hundred milliseconds to import) is loaded only when something asks E2B for something — a
create, a probe, an extend of an e2b sandbox, a listing while an E2B key is configured. A
daemon with local pools only and no key never loads it.

What the daemon asks of every provider without meaning E2B (its name, isolation, the
capability checks, the plan's headroom, a listing with no key) is answered here."""

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from sandboxd.config import E2BProviderConfig
from sandboxd.providers.base import ProviderSandbox
from sandboxd.providers.wrapper import Wrapper

if TYPE_CHECKING:
    from sandboxd.providers.e2b.provider import E2BProvider

# Capability members E2BProvider does not have: never looked up on it (a lookup would load
# the SDK just to say no).
_ABSENT = frozenset({"usage", "security_summary", "watch", "unwatch"})


class LazyE2BProvider(Wrapper):
    """A `Wrapper` (every Provider call forwarded) whose `inner` is made on first use."""

    name = "e2b"
    gone_reason = "lost"  # as E2BProvider's
    isolation = "vm"  # Wrapper's asks inner: answered here

    def __init__(self, config: E2BProviderConfig, *, key_prefix: str, instance: str):
        self._config = config
        self._key_prefix = key_prefix
        self._instance = instance
        self._inner: E2BProvider | None = None

    @property
    def inner(self) -> "E2BProvider":  # type: ignore[override]  # made on first use
        if self._inner is None:
            from sandboxd.providers.e2b.provider import E2BProvider

            self._inner = E2BProvider(
                self._config, key_prefix=self._key_prefix, instance=self._instance
            )
        return self._inner

    @property
    def loaded(self) -> bool:
        return self._inner is not None

    def __getattr__(self, name: str) -> Any:
        """Anything else E2BProvider has (its limiter, …): from it, loading it."""
        if name.startswith("_") or name in _ABSENT:
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _configured(self) -> bool:
        """As E2BProvider.configured: a key is set (a named key file counts)."""
        try:
            return bool(self._config.resolve_api_key())
        except OSError:
            return True

    def headroom(self) -> int:
        """`e2b.max_concurrent` until a sandbox is made (E2BProvider's own count then)."""
        return self.inner.headroom() if self.loaded else self._config.max_concurrent

    async def extend(self, sandbox_id: str, handle: dict[str, Any], seconds: float) -> int:
        return await self.inner.extend(sandbox_id, handle, seconds)

    async def gone_among(self, sandbox_ids: Collection[str]) -> set[str]:
        if not sandbox_ids:
            return set()  # nothing of E2B's to ask about: nothing loaded for it
        return await self.inner.gone_among(sandbox_ids)

    async def list_sandboxes(self) -> list[ProviderSandbox]:
        if not self.loaded and not self._configured():
            return []  # without a key nothing can be ours (E2BProvider says the same)
        return await self.inner.list_sandboxes()

    async def cleanup_leftovers(self, keep: set[str]) -> list[str]:
        return []  # nothing kept on this host (as E2BProvider)
