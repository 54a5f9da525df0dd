"""Sandbox providers, chosen by the pool spec's `provider` name."""

from sandboxd.config import Config
from sandboxd.providers.base import CreateError, Provider, ProviderSandbox


def make_providers(config: Config) -> dict[str, Provider]:
    from sandboxd.providers.faults import FaultyProvider
    from sandboxd.providers.local import LocalProvider

    providers: dict[str, Provider] = {"local": LocalProvider(config.local)}
    for name, faults in config.faults.items():
        if name in providers:
            providers[name] = FaultyProvider(providers[name], faults)
    return providers


async def list_all(providers: dict[str, Provider]) -> dict[str, tuple[Provider, ProviderSandbox]]:
    """Every sandbox the providers hold for sandboxd, by id, with the provider holding it."""
    found: dict[str, tuple[Provider, ProviderSandbox]] = {}
    for provider in providers.values():
        found.update({sb.id: (provider, sb) for sb in await provider.list_sandboxes()})
    return found


__all__ = ["CreateError", "Provider", "ProviderSandbox", "list_all", "make_providers"]
