"""The fault-injection wrapper over the real local provider (real processes)."""

import asyncio
import time

import psutil
import pytest

from sandboxd.config import Config, Faults, LocalProviderConfig
from sandboxd.providers import CreateError, make_providers
from sandboxd.providers.base import CAPABILITIES, Capped, Extendable, Metered
from sandboxd.providers.faults import FaultyProvider
from sandboxd.providers.local.provider import LocalProvider
from sandboxd.spec import PoolSpec
from sandboxd.store.records import SandboxStore
from tests.support import (
    E2B_TEST_KEY,
    KEYS,
    apply,
    events_of,
    eventually,
    wait_event,
    wait_ready,
)

POOL = PoolSpec(name="p")


def faulty(tmp_path, **faults) -> FaultyProvider:
    local = LocalProvider(LocalProviderConfig(workspace_root=tmp_path / "boxes"))
    return FaultyProvider(local, Faults(**faults))


async def test_every_create_fails_when_the_rate_is_one(tmp_path):
    provider = faulty(tmp_path, create_failure_rate=1.0, create_failure_retryable=False)
    with pytest.raises(CreateError) as failure:
        await provider.create("sb-1", POOL)
    assert not failure.value.retryable and "injected" in str(failure.value)
    assert provider.injected["create_failure"] == 1
    assert await provider.list_sandboxes() == []


async def test_a_seeded_rate_fails_that_share_of_creates_repeatably(tmp_path):
    outcomes = []
    for run in range(2):
        provider = faulty(tmp_path / str(run), create_failure_rate=0.3, seed=7)
        failed = 0
        for i in range(10):
            try:
                handle = await provider.create(f"sb-{run}-{i}", POOL)
                await provider.terminate(f"sb-{run}-{i}", handle)
            except CreateError:
                failed += 1
        outcomes.append(failed)
    assert outcomes[0] == outcomes[1] and 0 < outcomes[0] < 10


async def test_a_hung_create_waits_until_cancelled(tmp_path):
    provider = faulty(tmp_path, create_hang_rate=1.0)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await provider.create("sb-1", POOL)
    assert provider.injected["create_hang"] == 1


async def test_a_sudden_death_kills_the_processes_and_leaves_the_files(tmp_path):
    provider = faulty(tmp_path)
    handle = await provider.create("sb-1", POOL)
    assert await provider.kill_random() == "sb-1"
    assert not await provider.is_alive("sb-1", handle)
    assert await provider.list_sandboxes() == []  # only live sandboxes are listed
    assert (tmp_path / "boxes" / "sb-1" / "meta.json").is_file()
    assert await provider.kill_random() is None  # nothing left alive
    await provider.terminate("sb-1", handle)
    assert not (tmp_path / "boxes" / "sb-1").exists()


def test_config_wraps_only_the_named_provider_and_rejects_unknown_names(tmp_path):
    local = {"workspace_root": str(tmp_path)}
    providers = make_providers(Config(local=local, faults={"local": {"create_failure_rate": 1}}))
    assert isinstance(providers["local"], FaultyProvider)
    assert not isinstance(make_providers(Config(local=local))["local"], FaultyProvider)
    with pytest.raises(ValueError, match="unknown providers: locl"):
        Config(local=local, faults={"locl": {}})


async def test_a_sandbox_known_only_by_its_directory_is_still_stopped(tmp_path):
    """A daemon killed between starting a sandbox and writing its meta.json left only the
    directory: the next daemon's cleanup must find the processes all the same."""
    provider = LocalProvider(LocalProviderConfig(workspace_root=tmp_path / "boxes"))
    if provider._cgroups is None:
        pytest.skip("no cgroups here: a sandbox without its registry entry cannot be found")
    running = []
    for name in ("sb-1", "sb-2"):
        handle = await provider.create(name, POOL)
        running.append(psutil.Process(handle["pid"]))  # its agent, while it is known
        (tmp_path / "boxes" / name / "meta.json").unlink()
    assert all(p.is_running() for p in running)
    assert await provider.list_sandboxes() == []
    await provider.terminate("sb-1", {})  # a `creating` record: no handle yet
    assert await provider.cleanup_leftovers(keep=set()) == ["sb-2"]
    assert not any((tmp_path / "boxes").iterdir())
    assert not await provider.is_alive("sb-2", handle)
    # the processes too, not only the files (a dead one may wait as a zombie to be reaped)
    assert not [p for p in running if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_the_wrapper_has_exactly_the_capabilities_of_what_it_wraps(tmp_path):
    local = {"workspace_root": str(tmp_path)}
    e2b = {"api_key": E2B_TEST_KEY, "max_concurrent": 3}
    plain = make_providers(Config(local=local, e2b=e2b))
    wrapped = make_providers(Config(local=local, e2b=e2b, faults={"e2b": {}, "local": {}}))
    for name in ("local", "e2b"):
        assert isinstance(wrapped[name], FaultyProvider)
        has = {c.__name__ for c in CAPABILITIES if isinstance(plain[name], c)}
        assert {c.__name__ for c in CAPABILITIES if isinstance(wrapped[name], c)} == has
        assert wrapped[name].gone_reason == plain[name].gone_reason
    assert isinstance(wrapped["e2b"], Capped) and isinstance(wrapped["e2b"], Extendable)
    assert wrapped["e2b"].headroom() == plain["e2b"].headroom() == 3
    assert isinstance(wrapped["local"], Metered) and not isinstance(wrapped["local"], Capped)


async def test_faults_on_e2b_keep_its_concurrency_cap_and_its_keepalive(
    fake_e2b, redis, embedded_daemon
):
    """`[faults.e2b]` once removed both: the wrapper had no `headroom` and no `extend`."""
    settings = {
        "api_url": fake_e2b.url,
        "sandbox_url": fake_e2b.url,
        "api_key": E2B_TEST_KEY,
        "list_interval_s": 0.5,
        "max_concurrent": 2,
    }
    daemon = await embedded_daemon(e2b=settings, faults={"e2b": {"seed": 1}})
    assert isinstance(daemon.providers["e2b"], FaultyProvider)
    pool = {"name": "cloud", "provider": "e2b", "min_ready": 4, "max_total": 4}
    await apply(redis, [{**pool, "e2b": {"timeout_s": 2}}])
    first = set(await wait_ready(redis, "cloud", 2))

    async def capped():
        status = daemon.wings.reconciler.pool_status().get("cloud", {})
        return status.get("below_target") == "e2b.max_concurrent reached"

    await eventually(capped, what="the pool to stop at the plan's concurrency")
    assert len(fake_e2b.ours()) == 2
    assert not await events_of(redis, "sandbox.create_failed")
    started = min(s.started_at for s in fake_e2b.ours())

    async def two_timeouts_later():
        return time.time() - started > 2 * 2

    await eventually(two_timeouts_later, timeout=20, what="two E2B timeouts to pass")
    assert set(await wait_ready(redis, "cloud", 2)) == first  # kept alive, not replaced
    assert fake_e2b.ledger.expired == []
    assert {sandbox_id for sandbox_id, _ in fake_e2b.ledger.set_timeouts} == {
        s.id for s in fake_e2b.ours()
    }


@pytest.mark.parametrize("lost", ["record_reply", "creating_event"])
async def test_a_create_cut_short_by_redis_is_closed_and_the_pool_refills(
    redis, embedded_daemon, monkeypatch, lost
):
    """A failover can lose the reply to the `creating` record's write (the record is there,
    the daemon thinks not), or fail the `sandbox.creating` event after it: no create runs
    for that record, which must be closed (`interrupted`), never counted as in flight."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    # One create at a time: the second is started by the first one's end (`refill`), not
    # by a pass (whose failure would make the next pass read everything anyway).
    daemon = await embedded_daemon(max_concurrent_creates=1)
    creator = daemon.wings.reconciler.creator
    cut: list[str] = []
    if lost == "record_reply":
        store, add = creator._store, creator._store.add
        added: list[str] = []

        async def add_then_fail(record):
            await add(record)
            added.append(record.id)
            if len(added) == 2:
                cut.append(record.id)
                raise RedisConnectionError("injected: the reply was lost")

        monkeypatch.setattr(store, "add", add_then_fail)
    else:
        events, publish = creator._events, creator._events.publish

        async def publish_or_fail(type_, **data):
            if type_ == "sandbox.creating" and not cut:
                cut.append(data["sandbox"])
                raise RedisConnectionError("injected: the event was not written")
            return await publish(type_, **data)

        monkeypatch.setattr(events, "publish", publish_or_fail)

    await apply(redis, [{"name": "p", "min_ready": 2, "max_total": 3}])
    await wait_ready(redis, "p", 2)
    closed = await wait_event(redis, "sandbox.terminated", sandbox=cut[0])
    assert closed["data"]["reason"] == "interrupted" and closed["data"]["state"] == "creating"

    async def nothing_creating():
        records = await SandboxStore(redis, KEYS).records()
        return all(r.state == "ready" for r in records) and len(records) == 2

    await eventually(nothing_creating, what="only the 2 ready records")
    assert creator.inflight == set()
