"""The fenced client against a real redis-server: writes need the lease, reads do not."""

import time

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from sandboxd.store.fence import Fence, FencedRedis, LeaseLost, LeaseVacant

LEASE = "fence-test:node:a:lease"


@pytest.fixture
async def fenced(redis: Redis):
    await redis.set(LEASE, "7:me")
    lost: list[str] = []
    fence = Fence(on_lost=lost.append)
    fence.hold(LEASE, "7:me", ttl_s=30, since=time.monotonic())
    client = FencedRedis.over(redis, fence)
    client.lost = lost
    yield client
    await redis.delete(LEASE, "fence-test:k", "fence-test:h", "fence-test:s", "fence-test:x")


async def test_writes_behave_as_unfenced_ones_while_the_lease_is_held(fenced, redis):
    assert await fenced.set("fence-test:k", "v") is True
    assert await fenced.hset("fence-test:h", mapping={"a": "1", "b": "2"}) == 2
    assert await fenced.expire("fence-test:h", 60) is True
    assert await fenced.get("fence-test:k") == "v"
    async with fenced.pipeline(transaction=True) as pipe:
        pipe.set("fence-test:k", "w").sadd("fence-test:s", "1", "2").hgetall("fence-test:h")
        assert await pipe.execute() == [True, 2, {"a": "1", "b": "2"}]
    script = fenced.register_script("return {KEYS, ARGV}")
    assert await script(keys=["k1", "k2"], args=["a1"]) == [["k1", "k2"], ["a1"]]
    async with fenced.pipeline(transaction=True) as pipe:
        await script(keys=["k1"], args=["a1", "a2"], client=pipe)
        assert await pipe.execute() == [[["k1"], ["a1", "a2"]]]
    assert fenced.lost == []


async def test_a_taken_over_lease_refuses_every_write_and_says_so_once(fenced, redis):
    await redis.set(LEASE, "8:standby")  # the standby took the next epoch
    with pytest.raises(LeaseLost):
        await fenced.set("fence-test:x", "stale")
    with pytest.raises(LeaseLost):  # and from then on without asking Redis
        await fenced.xadd("fence-test:x", {"a": "b"})
    with pytest.raises(LeaseLost):  # a pipeline: already when the write is queued
        async with fenced.pipeline(transaction=True) as pipe:
            pipe.set("fence-test:x", "stale")
            await pipe.execute()
    script = fenced.register_script("redis.call('SET', KEYS[1], 'stale')")
    with pytest.raises(LeaseLost):
        await script(keys=["fence-test:x"])
    assert not await redis.exists("fence-test:x")
    assert len(fenced.lost) == 1 and "no longer held" in fenced.lost[0]
    assert await fenced.get(LEASE) == "8:standby"  # reads still work


async def test_a_write_finding_the_lease_held_by_nobody_is_refused_and_retried_later(fenced, redis):
    """Redis lost the lease (FLUSHDB, a restart without persistence) while this host renews
    in time: the write is refused in Redis itself, as an outage the loops retry (not a lost
    lease), and the lease keeper is told to take the lease again."""
    vacant: list[str] = []
    fenced.fence._on_vacant = vacant.append
    await redis.delete(LEASE)
    with pytest.raises(LeaseVacant) as refused:
        await fenced.hset("fence-test:h", "a", "1")
    assert isinstance(refused.value, RedisError)  # loops survive it
    async with fenced.pipeline(transaction=True) as pipe:
        pipe.set("fence-test:x", "v")
        with pytest.raises(LeaseVacant):
            await pipe.execute()
    assert not await redis.exists("fence-test:h", "fence-test:x")
    assert len(vacant) == 2 and fenced.lost == []


async def test_past_its_local_deadline_a_daemon_stops_without_asking(fenced, redis):
    """A daemon paused past its TTL (SIGSTOP) learns it on its own clock."""
    fenced.fence.hold(LEASE, "7:me", ttl_s=30, since=time.monotonic() - 31)
    with pytest.raises(LeaseLost):
        await fenced.set("fence-test:k", "late")
    assert not await redis.exists("fence-test:k")
    assert "expired here" in fenced.lost[0]


async def test_a_pipeline_queued_before_the_takeover_is_refused_as_a_whole(fenced, redis):
    async with fenced.pipeline(transaction=True) as pipe:
        pipe.set("fence-test:x", "stale").hset("fence-test:h", "a", "1")
        await redis.set(LEASE, "8:standby")
        with pytest.raises(LeaseLost):
            await pipe.execute()
    assert not await redis.exists("fence-test:x", "fence-test:h")
