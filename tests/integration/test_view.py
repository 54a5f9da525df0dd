"""The reconciler's view of the records (store/view.py) against a real redis-server: after
any sequence of creates, claims, releases, renewals, kills, reconnects and stream trims the
view equals a fresh full read (and so do its counts per pool and state, and the restore
journal kept from what each read changed); a change no event names is caught by the timed
resync."""

import asyncio
import json
import shutil
import tempfile
import weakref
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from sandboxd.client import Client, Sandbox
from sandboxd.control.localstate import LocalState, fields_json
from sandboxd.control.restore import Restorer
from sandboxd.control.terminator import Terminator
from sandboxd.spec import PoolSpec
from sandboxd.store.claims import ClaimStore
from sandboxd.store.events import EventPublisher
from sandboxd.store.records import SandboxRecord, SandboxStore
from sandboxd.store.view import RecordView
from tests.support import KEYS

POOL = PoolSpec(name="p", min_ready=0, max_total=1000)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class World:
    """Records written the way the daemon and its clients write them."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.events = EventPublisher(redis, KEYS, 100_000)
        self.store = SandboxStore(redis, KEYS)
        self.terminator = Terminator(self.store, {}, self.events)
        self.client = Client(redis)
        self.clock = Clock()
        self.view = RecordView(self.store, resync_max_s=lambda: 300.0, clock=self.clock)
        self.terminator.changed = self.view.touch
        self.created = 0
        self.held: list[Sandbox] = []
        journal_dir = tempfile.mkdtemp(prefix="sandboxd-view-")
        weakref.finalize(self, shutil.rmtree, journal_dir, True)
        self.journal = Restorer(
            redis=redis,
            keys=KEYS,
            journal=LocalState(Path(journal_dir)),
            events=self.events,
            providers={},
            instance="test",
        )

    async def create(self) -> None:
        self.created += 1
        record = SandboxRecord(
            id=f"sb-{self.created:04d}",
            pool=POOL.name,
            provider="local",
            state="creating",
            template="base",
            spec_revision=1,
            instance="test",
        )
        await self.store.add(record)
        await self.events.publish("sandbox.creating", pool=POOL.name, sandbox=record.id)
        event = self.events.build("sandbox.ready", pool=POOL.name, sandbox=record.id)
        await self.store.mark_ready(record, {"pid": 1}, event)

    async def claim(self) -> None:
        if await self.redis.llen(KEYS.pool_ready(POOL.name)):
            self.held.append(await self.client.claim(POOL.name, timeout_s=0))

    async def release(self, i: int) -> None:
        if self.held:
            await self.held.pop(i % len(self.held)).release()

    async def renew(self, i: int) -> None:
        if self.held:
            sandbox = self.held[i % len(self.held)]
            await self.client.renew(sandbox.id, sandbox.claim_token, 120)

    async def kill(self, i: int) -> None:
        records = await self.store.records()
        if records:
            record = sorted(records, key=lambda r: r.id)[i % len(records)]
            await self.terminator.terminate(record, "died", "ready", "claimed", "released")
            self.held = [s for s in self.held if s.id != record.id]

    async def reconnect(self) -> None:
        """The connections drop (the reconciler reads everything after a Redis error)."""
        await self.redis.connection_pool.disconnect()
        self.view.invalidate()

    async def vanish(self, i: int) -> None:
        """A sandbox goes and the event saying so is lost (trimmed unread): the full read
        that follows must drop it, from the view and from the journal."""
        await self.kill(i)
        await self.redis.xtrim(KEYS.events, maxlen=0)

    async def trim(self) -> None:
        """A change whose event is trimmed away before the view read it."""
        await self.claim()
        await self.redis.xtrim(KEYS.events, maxlen=0)


OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["create", "claim", "release", "renew", "kill", "vanish", "reconnect", "trim"]
        ),
        st.integers(0, 20),
    ),
    min_size=1,
    max_size=25,
)


async def _agree(world: World) -> None:
    view = {r.id: r for r in (await world.view.refresh()).records}
    fresh = {r.id: r for r in await world.store.records()}
    assert view == fresh
    counts: dict[str, Counter] = {}
    for r in fresh.values():
        counts.setdefault(r.pool, Counter())[r.state] += 1
    assert {pool: +c for pool, c in world.view.counts.items() if +c} == counts
    # the journal as the reconciler keeps it: from the ids each read changed
    changed = world.view.changed
    await world.journal.mark()
    await world.journal.remember(
        list(view.values()),
        None,
        save=False,
        changed=None if changed is None else (world.view.records, changed),
    )
    assert world.journal.known() == {
        i: json.loads(fields_json(r.to_hash())) for i, r in fresh.items()
    }


async def _scenario(url: str, ops: list[tuple[str, int]]) -> None:
    redis = Redis.from_url(url, decode_responses=True)
    try:
        await redis.flushall()
        world = World(redis)
        await ClaimStore(redis, KEYS, maxlen=100_000).publish_pool_settings([POOL])
        for _ in range(3):
            await world.create()
        await _agree(world)
        for op, i in ops:
            step = getattr(world, op)
            await (step(i) if op in ("release", "renew", "kill", "vanish") else step())
            await _agree(world)
        if any(op not in ("vanish", "reconnect", "trim") for op, _ in ops):
            assert world.view.partial_reads > 0  # (those three mean full reads)
    finally:
        await redis.aclose()


@pytest.mark.timeout(60)
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=OPS)
def test_view_equals_a_full_read_after_any_changes(redis_server, ops):
    asyncio.run(_scenario(redis_server, ops))


@pytest.mark.timeout(30)
async def test_a_change_no_event_names_is_caught_by_the_resync(redis):
    world = World(redis)
    await ClaimStore(redis, KEYS, maxlen=100_000).publish_pool_settings([POOL])
    await world.create()
    await world.view.full()
    fulls = world.view.full_reads
    await redis.hset(KEYS.sandbox("sb-0001"), "claimant", "edited by hand")  # no event
    stale = (await world.view.refresh()).records
    assert [r.claimant for r in stale] == [""] and world.view.full_reads == fulls
    world.clock.now += 301  # resync_max_s
    fresh = (await world.view.refresh()).records
    assert [r.claimant for r in fresh] == ["edited by hand"] and world.view.full_reads == fulls + 1


@pytest.mark.timeout(30)
async def test_a_trimmed_change_and_a_lost_stream_mean_a_full_read(redis):
    world = World(redis)
    await ClaimStore(redis, KEYS, maxlen=100_000).publish_pool_settings([POOL])
    await world.create()
    await world.view.full()
    await world.create()
    await redis.xtrim(KEYS.events, maxlen=0)  # sb-0002's events, unread, are gone
    fulls = world.view.full_reads
    assert {r.id for r in (await world.view.refresh()).records} == {"sb-0001", "sb-0002"}
    assert world.view.full_reads == fulls + 1
    await redis.delete(KEYS.events)
    await world.create()
    await redis.delete(KEYS.events)  # the stream itself is gone
    assert len((await world.view.refresh()).records) == 3
    assert world.view.full_reads == fulls + 2
    await redis.xadd(KEYS.events, {"sandbox": "../../etc"})  # junk: an id is only read again
    await redis.xadd(KEYS.events, {"no": "event"})
    assert len((await world.view.refresh()).records) == 3
    assert world.view.full_reads == fulls + 2
