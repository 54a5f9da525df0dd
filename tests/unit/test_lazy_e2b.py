"""The e2b provider loads the SDK only when E2B is asked for something: a daemon with local
pools and no E2B key never loads it (~19 MB resident), and what the daemon asks of every
provider is answered without it, as E2BProvider would answer."""

import asyncio

import pytest

from sandboxd.config import Config
from sandboxd.providers import make_providers
from sandboxd.providers.base import CAPABILITIES, Capped, Extendable
from sandboxd.providers.e2b.lazy import LazyE2BProvider

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def no_key(monkeypatch):
    monkeypatch.delenv("E2B_API_KEY", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


def test_a_daemon_without_e2b_never_loads_its_sdk(no_key, tmp_path):
    config = Config(local={"workspace_root": str(tmp_path)})
    provider = make_providers(config)["e2b"]
    assert isinstance(provider, LazyE2BProvider)
    assert isinstance(provider, Capped) and isinstance(provider, Extendable)
    assert (provider.name, provider.isolation, provider.gone_reason) == ("e2b", "vm", "lost")
    assert provider.headroom() == config.e2b.max_concurrent
    assert asyncio.run(provider.list_sandboxes()) == []
    assert asyncio.run(provider.cleanup_leftovers(set())) == []
    assert not provider.loaded


def test_it_has_the_capabilities_and_answers_of_the_provider_it_stands_for(no_key):
    from sandboxd.providers.e2b.provider import E2BProvider

    config = Config()
    lazy = LazyE2BProvider(config.e2b, key_prefix="sandboxd", instance="i")
    real = E2BProvider(config.e2b, key_prefix="sandboxd", instance="i")
    assert [isinstance(lazy, c) for c in CAPABILITIES] == [
        isinstance(real, c) for c in CAPABILITIES
    ]
    assert not lazy.loaded  # the checks themselves load nothing
    assert (lazy.name, lazy.isolation, lazy.gone_reason) == (
        real.name,
        real.isolation,
        real.gone_reason,
    )
    assert lazy.headroom() == real.headroom()
    assert lazy.limiter is not None and lazy.loaded  # anything else: from the real one
    assert lazy.headroom() == lazy.inner.headroom()


def test_with_a_key_a_listing_asks_e2b(monkeypatch):
    monkeypatch.setenv("E2B_API_KEY", "e2b_not_a_real_key")
    lazy = LazyE2BProvider(Config().e2b, key_prefix="sandboxd", instance="i")
    assert lazy._configured() and not lazy.loaded
