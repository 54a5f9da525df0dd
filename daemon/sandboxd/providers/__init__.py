"""Sandbox providers, chosen by the pool spec's `provider` name."""

from sandboxd.config import Config
from sandboxd.providers.base import CreateError, Provider, ProviderSandbox


def make_providers(config: Config) -> dict[str, Provider]:
    from sandboxd.providers.local import LocalProvider

    return {"local": LocalProvider(config.local)}


__all__ = ["CreateError", "Provider", "ProviderSandbox", "make_providers"]
