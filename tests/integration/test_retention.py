"""The daemon's trimmer of the event stream (store/retention.py) on a real redis-server,
one pass at a time: the soft length, what registered groups and the MQTT bridge hold, the
hard bounds by length and age, and registries someone wrote garbage into."""

import json

import pytest

from sandboxd.config import Config
from sandboxd.store.consumers import ConsumerRegistry
from sandboxd.store.events import Event, EventPublisher
from sandboxd.store.retention import Retention
from tests.support import KEYS

pytestmark = pytest.mark.timeout(30)


async def fill(redis, n: int) -> list[str]:
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.xadd(KEYS.events, Event(type="pool.scaled", pool="p", data={"n": i}).to_fields())
        return await pipe.execute()


def retention(redis, cursor=None, **events) -> Retention:
    config = Config(event_stream_maxlen=100, events={"max_len": 300, **events})

    async def mqtt_cursor():
        return cursor

    return Retention(
        redis=redis,
        keys=KEYS,
        config=config,
        events=EventPublisher(redis, KEYS, maxlen=100),
        mqtt_cursor=mqtt_cursor if cursor is not None else None,
    )


async def dropped(redis) -> list[dict]:
    return [
        json.loads(f["data"])
        for _, f in await redis.xrange(KEYS.events)
        if f.get("type") == "events.dropped"
    ]


async def test_trims_to_the_soft_length_when_nobody_holds(redis):
    ids = await fill(redis, 250)
    await redis.xgroup_create(KEYS.events, "unregistered", id="0")  # holds nothing
    await retention(redis).step()
    assert [i for i, _ in await redis.xrange(KEYS.events)] == ids[-100:]
    assert not await dropped(redis)


async def test_a_registered_group_and_the_mqtt_cursor_hold(redis):
    ids = await fill(redis, 250)
    registry = ConsumerRegistry(redis, KEYS)
    await registry.add("billing", start=ids[119])  # has read 120
    trimmer = retention(redis, cursor=ids[49])  # the bridge has sent 50
    await trimmer.step()
    assert (await redis.xrange(KEYS.events, count=1))[0][0] == ids[50]
    # a pending entry holds too, even after its group read past it
    await redis.xreadgroup("billing", "c", {KEYS.events: ">"}, count=10)  # 121..130 pending
    await redis.xack(KEYS.events, "billing", *ids[121:130])  # 122..130 done, 121 not
    await redis.xreadgroup("billing", "c", {KEYS.events: ">"}, count=100)
    await redis.xack(KEYS.events, "billing", *ids[130:230])
    await retention(redis, cursor=ids[240]).step()
    assert (await redis.xrange(KEYS.events, count=1))[0][0] == ids[120]
    assert not await dropped(redis)
    await registry.remove("billing")
    await retention(redis).step()
    assert await redis.xlen(KEYS.events) == 100


async def test_past_max_len_a_group_loses_the_oldest_and_is_told(redis):
    ids = await fill(redis, 400)
    await ConsumerRegistry(redis, KEYS).add("billing", start="0")
    await redis.xreadgroup("billing", "c", {KEYS.events: ">"}, count=30)  # 30 pending
    trimmer = retention(redis)
    await trimmer.step()
    [announced] = await dropped(redis)
    assert announced["groups"] == {"billing": 100} and announced["reason"] == "events.max_len"
    assert (announced["first_id"], announced["last_id"]) == (ids[0], ids[99])
    assert (await redis.xrange(KEYS.events, count=1))[0][0] == ids[100]
    assert trimmer.lost == {"billing": 100}
    assert trimmer.stats()["billing"]["lost"] == 100


async def test_past_max_age_entries_go_whoever_needs_them(redis):
    old = [
        await redis.xadd(KEYS.events, {"id": f"o{i}", "type": "x"}, id=f"{1000 + i}-0")
        for i in range(5)
    ]
    await fill(redis, 10)
    await ConsumerRegistry(redis, KEYS).add("billing", start="0")
    await retention(redis, max_age_s=3600).step()
    [announced] = await dropped(redis)
    assert announced["reason"] == "events.max_age_s" and announced["groups"] == {"billing": 5}
    assert announced["first_id"] == old[0] and announced["last_id"] == old[-1]
    assert await redis.xlen(KEYS.events) == 11


async def test_garbage_in_the_registry_is_skipped(redis):
    await fill(redis, 150)
    await redis.hset(KEYS.event_consumers, mapping={"bad name": "{}", "ghost": "not json"})
    await retention(redis).step()  # "ghost" is registered but has no group: holds nothing
    assert await redis.xlen(KEYS.events) == 100
    stats = {g.name: g for g in await ConsumerRegistry(redis, KEYS).stats()}
    assert set(stats) == {"ghost"} and not stats["ghost"].exists
    await redis.delete(KEYS.event_consumers)
    await redis.set(KEYS.event_consumers, "a string")
    assert await ConsumerRegistry(redis, KEYS).registered() == []
    await fill(redis, 50)
    await retention(redis).step()  # a registry of the wrong type holds nothing, breaks nothing
    assert await redis.xlen(KEYS.events) == 100
