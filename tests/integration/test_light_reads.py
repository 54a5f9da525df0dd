"""Reads made lighter, held to what they replace: what the janitor reads of every record
(state and provider, not the whole record) agrees with a full read — gone, emptied and
wrong-typed records are left out as a full read leaves them out, and nothing raises on what
anyone may write into Redis; a create reads its key and its pool in one round trip."""

import pytest

from sandboxd.control.janitor import Janitor
from sandboxd.store.records import SandboxStore
from tests.support import KEYS, a_record

pytestmark = pytest.mark.timeout(30)


async def test_presence_agrees_with_a_full_read(redis):
    store = SandboxStore(redis, KEYS)
    for i in range(600):  # more than one chunk of the script
        await store.add(a_record(f"sb-{i}", state=("ready", "claimed", "released")[i % 3]))
    await store.add(a_record("sb-cloud", provider="e2b"))
    await redis.delete(KEYS.sandbox("sb-1"))  # the hash deleted, the id left in the set
    await redis.delete(KEYS.sandbox("sb-2"))
    await redis.set(KEYS.sandbox("sb-2"), "not a hash")
    await redis.sadd(KEYS.sandboxes, "never-recorded")

    present = await store.presence()
    full = {r.id: r for r in await store.records()}
    assert set(present) == set(full)
    assert all(present[i] == (r.state, r.provider, r.node) for i, r in full.items())
    assert present["sb-cloud"] == ("ready", "e2b", "")
    assert not {"sb-1", "sb-2", "never-recorded"} & set(present)


async def test_a_damaged_record_is_present_as_written_and_a_wrong_id_set_is_empty(redis):
    store = SandboxStore(redis, KEYS)
    await store.add(a_record("sb-x"))
    await redis.hset(KEYS.sandbox("sb-x"), "state", "\xff weird")
    await redis.hdel(KEYS.sandbox("sb-x"), "provider")
    assert await store.presence() == {"sb-x": ("\xff weird", "", "")}
    await redis.delete(KEYS.sandboxes)
    await redis.set(KEYS.sandboxes, "a string")
    assert await store.presence() == {}


async def test_a_create_reads_its_key_and_pool_in_one_round_trip_and_survives_a_script_flush(
    redis,
):
    """The create's pipeline sends EVALSHA itself (a redis-py Script in a pipeline sends a
    SCRIPT EXISTS first: a second round trip); a Redis that forgot the script still
    answers (the Script's own call loads it)."""
    from sandboxd.store.apikeys import ApiKeyStore

    store = ApiKeyStore(redis, KEYS)
    secret = await store.create("alice")
    await redis.hset(KEYS.pools, "p", "settings")
    await redis.script_flush()
    key, field = await store.authenticate_and_hget(secret, (KEYS.pools, "p"))
    assert key is not None and key.name == "alice" and field == "settings"
    await redis.config_resetstat()
    key, field = await store.authenticate_and_hget(secret, (KEYS.pools, "p"))
    assert key is not None and field == "settings"
    stats = await redis.info("commandstats")
    assert "cmdstat_script|exists" not in stats and "cmdstat_evalsha" in stats
    assert await store.authenticate_and_hget("sbk_wrong", (KEYS.pools, "p")) == (None, None)


async def test_the_janitor_reads_in_full_only_records_of_its_own(redis):
    """Another node's records (a daemon per host, one Redis) are not this janitor's to judge:
    it does not read them in full either (it did, one round trip each, every sweep)."""

    class Listing:
        name = "local"

        async def list_sandboxes(self):
            return []  # none of the recorded sandboxes is listed here: each a candidate

        async def is_alive(self, sandbox_id, handle):
            return True  # a listing that lagged: not lost

    store = SandboxStore(redis, KEYS, owns=lambda r: r.node in ("", "n1"))
    for i in range(5):
        await store.add(a_record(f"mine-{i}", node="n1"))
        await store.add(a_record(f"theirs-{i}", node="n2"))
    read = []
    real_get = store.get

    async def counting_get(sandbox_id):
        read.append(sandbox_id)
        return await real_get(sandbox_id)

    store.get = counting_get  # type: ignore[method-assign]
    janitor = Janitor(
        store=store,
        providers={"local": Listing()},  # type: ignore[dict-item]
        events=None,  # type: ignore[arg-type]
        terminator=None,  # type: ignore[arg-type]
        replace=None,  # type: ignore[arg-type]
        interval_s=lambda: 60.0,
    )
    swept = await janitor.sweep()
    assert sorted(read) == [f"mine-{i}" for i in range(5)]
    assert swept.lost == [] and swept.leaked == []
