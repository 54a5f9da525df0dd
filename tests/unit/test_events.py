import asyncio
import json
from datetime import datetime

import fakeredis
import pytest

from sandboxd.store.events import EVENT_TYPES, Event, EventPublisher
from sandboxd.store.keys import Keys

REQUIRED = {
    "daemon.started",
    "daemon.stopping",
    "spec.applied",
    "spec.rejected",
    "sandbox.creating",
    "sandbox.ready",
    "sandbox.create_failed",
    "sandbox.terminated",
    "pool.scaled",
}


async def test_stream_entries_have_the_documented_fields():
    redis = fakeredis.FakeAsyncRedis(decode_responses=True)
    publisher = EventPublisher(redis, Keys("t"), maxlen=1000)
    first = await publisher.publish("sandbox.terminated", pool="p", sandbox="sb-1", reason="died")
    second = await publisher.publish("daemon.started", instance="i")
    entries = await redis.xrange("t:events")
    assert entries[0][1].keys() == {
        "id",
        "type",
        "time",
        "pool",
        "sandbox",
        "data",
    }
    fields = entries[0][1]
    assert json.loads(fields["data"]) == {"reason": "died"}
    assert datetime.fromisoformat(fields["time"]).utcoffset().total_seconds() == 0
    assert fields["time"].endswith("Z")
    assert Event.from_fields(fields) == first
    assert entries[1][1]["sandbox"] == "" and first.id != second.id


async def test_undocumented_types_are_refused():
    publisher = EventPublisher(fakeredis.FakeAsyncRedis(), Keys("t"), maxlen=1000)
    with pytest.raises(ValueError, match="undocumented"):
        await publisher.publish("sandbox.exploded")


async def test_the_publisher_leaves_trimming_to_retention():
    """Trimming is the daemon's retention's (store/retention.py): it knows which consumer
    groups still need entries; an XADD that trimmed would drop them unread."""
    redis = fakeredis.FakeAsyncRedis(decode_responses=True)
    publisher = EventPublisher(redis, Keys("t"), maxlen=100)
    for _ in range(300):
        await publisher.publish("pool.scaled", pool="p")
    assert await redis.xlen("t:events") == 300


def test_every_required_type_is_documented():
    assert REQUIRED <= EVENT_TYPES.keys()


def test_the_docs_event_table_lists_every_type():
    """docs/events.md's table is generated from EVENT_TYPES (docs/reference.py)."""
    from pathlib import Path

    from sandboxd.store.events import EVENT_TYPES

    table = (Path(__file__).parents[2] / "docs" / "events.md").read_text()
    for type_, (meaning, fields) in EVENT_TYPES.items():
        assert f"| `{type_}` | {meaning} | {fields} |" in table


async def test_the_tail_reads_the_stream_only_while_it_is_wanted(monkeypatch):
    """The metrics' tail without their endpoint: no read of the stream at all (a storm of
    claims is thousands of events a second); once served, it counts from then on."""
    from sandboxd.store import eventtail

    monkeypatch.setattr(eventtail, "BLOCK_MS", 1)  # an empty read returns, whatever the wait
    redis = fakeredis.FakeAsyncRedis(decode_responses=True)
    publisher = EventPublisher(redis, Keys("t"), maxlen=1000)
    reads = []
    real_xread = redis.xread

    async def counting_xread(*args, **kwargs):
        reads.append(args)
        return await real_xread(*args, **kwargs)

    monkeypatch.setattr(redis, "xread", counting_xread)
    wanted, seen = asyncio.Event(), []
    tail = eventtail.EventTail(redis, "t:events", seen.append, pace_s=0, wanted=wanted)
    await publisher.publish("pool.scaled", pool="before")
    step = asyncio.create_task(tail._step())
    await publisher.publish("pool.scaled", pool="unwatched")
    await asyncio.sleep(0)
    assert not step.done() and reads == []  # waiting, not reading
    wanted.set()
    await step  # from the stream's end: nothing appended before counts
    await publisher.publish("pool.scaled", pool="after")
    await tail._step()
    assert [e.pool for e in seen] == ["after"]
    wanted.clear()
    step = asyncio.create_task(tail._step())
    await publisher.publish("pool.scaled", pool="off again")
    await asyncio.sleep(0)
    assert not step.done()
    step.cancel()
    assert [e.pool for e in seen] == ["after"]
