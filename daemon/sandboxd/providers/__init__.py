"""Sandbox providers, chosen by the pool spec's `provider` name."""

from sandboxd.config import Config
from sandboxd.providers.base import CreateError, Provider, ProviderSandbox


def make_providers(config: Config, instance: str = "") -> dict[str, Provider]:
    from sandboxd.providers.faults import FaultyProvider
    from sandboxd.providers.local import LocalProvider

    providers: dict[str, Provider] = {
        "local": LocalProvider(config.local),
        "e2b": _e2b(config, instance),
    }
    for name, faults in config.faults.items():
        if name in providers:
            providers[name] = FaultyProvider(providers[name], faults)
    return providers


def _e2b(config: Config, instance: str) -> Provider:
    try:
        from sandboxd.providers.e2b import E2BProvider
    except ImportError as exc:
        from sandboxd.providers.unavailable import UnavailableProvider

        return UnavailableProvider(
            "e2b", f"the e2b SDK is not installed ({exc}): pip install 'sandboxd[e2b]'"
        )
    return E2BProvider(config.e2b, key_prefix=config.key_prefix, instance=instance)


def gone_reason(provider: Provider) -> str:
    """How a sandbox its provider no longer has ended: `died` (a local process) or `lost`."""
    return getattr(provider, "gone_reason", "died")


async def list_all(providers: dict[str, Provider]) -> dict[str, tuple[Provider, ProviderSandbox]]:
    """Every sandbox the providers hold for sandboxd, by id, with the provider holding it."""
    found: dict[str, tuple[Provider, ProviderSandbox]] = {}
    for provider in providers.values():
        found.update({sb.id: (provider, sb) for sb in await provider.list_sandboxes()})
    return found


__all__ = [
    "CreateError",
    "Provider",
    "ProviderSandbox",
    "gone_reason",
    "list_all",
    "make_providers",
]
