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


__all__ = ["CreateError", "Provider", "ProviderSandbox", "make_providers"]
