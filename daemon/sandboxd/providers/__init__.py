"""providers — where sandboxes come from; each provider owns all of its code.

A pool's spec names its provider (`provider: local` or `e2b`); `make_providers` builds one
of each from the config, wrapped in fault injection where `[faults.<name>]` asks for it.

- `base`: the `Provider` protocol every provider implements (create, terminate, kill,
  reset, probe, is_alive, list, cleanup) and the optional capabilities, each a Protocol of
  its own: `Capped` (a concurrency cap), `Extendable` (sandboxes that expire unless kept
  alive), `Metered` (resource use), `Described` (what isolation it enforces);
- `local/`: bubblewrap sandboxes on this host (the default); `e2b/`: the E2B cloud;
- `supervisor`: keeps a pool's `run:` program running *inside* a sandbox (standard library
  only): loaded by the local agent, or run on its own in an E2B sandbox (started through
  envd, its news read back from its journal file);
- `faults`: a wrapper that makes creates fail, slow down or hang, keeping every capability
  of what it wraps; `unavailable`: stands in for a provider whose SDK is missing.

Providers import only the model (config, spec); never the store, the control loops or the
client (import-linter checks it), so a provider can be read and tested on its own.
"""

import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Any

from sandboxd.config import Config
from sandboxd.providers.base import (
    CreateError,
    Described,
    IsolationError,
    Provider,
    ProviderSandbox,
)

log = logging.getLogger(__name__)

# Providers whose sandboxes are not tied to a host: one daemon among all nodes (the cloud
# leader) manages their pools; a local sandbox is managed by its node's daemon.
CLOUD_PROVIDERS = frozenset({"e2b"})


def make_providers(config: Config, instance: str = "") -> dict[str, Provider]:
    from sandboxd.providers.faults import inject
    from sandboxd.providers.local.provider import LocalProvider

    providers: dict[str, Provider] = {
        "local": LocalProvider(config.local),
        "e2b": _e2b(config, instance),
    }
    for name, faults in config.faults.items():
        if name in providers:
            providers[name] = inject(providers[name], faults)
    return providers


def _e2b(config: Config, instance: str) -> Provider:
    """The e2b provider, its SDK loaded when first needed (providers/e2b/lazy.py)."""
    missing = [m for m in ("e2b", "aiolimiter") if importlib.util.find_spec(m) is None]
    if missing:
        from sandboxd.providers.unavailable import UnavailableProvider

        return UnavailableProvider(
            "e2b",
            f"the e2b SDK is not installed (no {', '.join(missing)}): pip install 'sandboxd[e2b]'",
        )
    from sandboxd.providers.e2b.lazy import LazyE2BProvider

    return LazyE2BProvider(config.e2b, key_prefix=config.key_prefix, instance=instance)


def security_summary(providers: dict[str, Provider]) -> dict[str, Any]:
    """What each provider enforces (isolation, limits, uids, what is missing), for status."""
    summary: dict[str, Any] = {}
    for name, provider in providers.items():
        if isinstance(provider, Described):
            summary[name] = provider.security_summary()
        else:
            summary[name] = {"isolation": provider.isolation}
    return summary


@dataclass
class Listing:
    """Every sandbox the providers hold for sandboxd, by id, with the provider holding it;
    `failed`: providers that could not be listed (their records cannot be judged now)."""

    sandboxes: dict[str, tuple[Provider, ProviderSandbox]] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)


async def list_all(providers: dict[str, Provider]) -> Listing:
    listing = Listing()
    for name, provider in providers.items():
        try:
            found = await provider.list_sandboxes()
        except Exception as exc:  # a cloud API outage or a bad key must not stop the daemon
            log.warning("cannot list sandboxes", extra={"provider": name, "error": str(exc)})
            listing.failed.add(name)
            continue
        listing.sandboxes.update({sb.id: (provider, sb) for sb in found})
    return listing


__all__ = [
    "CLOUD_PROVIDERS",
    "CreateError",
    "IsolationError",
    "Listing",
    "Provider",
    "ProviderSandbox",
    "list_all",
    "make_providers",
    "security_summary",
]
