"""The keepalive's decisions for claimed sandboxes: follow the lease in capped steps."""

import time
from types import SimpleNamespace

from sandboxd.control.keepalive import LEASE_GRACE_S, Keepalive
from sandboxd.store.records import SandboxRecord


class CappedProvider:
    """An Extendable provider whose plan allows at most `cap` seconds at once."""

    def __init__(self, cap: int, fail: int = 0):
        self.cap = cap
        self.fail = fail
        self.calls: list[float] = []

    async def extend(self, sandbox_id, handle, seconds):
        self.calls.append(seconds)
        if self.fail:
            self.fail -= 1
            raise RuntimeError("E2B away")
        return min(seconds, self.cap)


class Events:
    def __init__(self):
        self.published: list[str] = []

    async def publish(self, type, **data):
        self.published.append(type)


def claimed(lease_expires_ms: int) -> SandboxRecord:
    return SandboxRecord(
        id="sb-1", pool="p", provider="e2b", state="claimed", template="base",
        spec_revision=1, instance="i", lease_expires_ms=lease_expires_ms,
    )  # fmt: skip


def keepalive(provider, events=None) -> Keepalive:
    specs = SimpleNamespace(in_force=None)
    return Keepalive(store=None, specs=specs, providers={"e2b": provider}, events=events)


async def test_a_long_lease_is_followed_in_steps_of_the_cap_until_its_end():
    provider = CappedProvider(cap=60)
    k = keepalive(provider)
    now = time.time()
    record = claimed(int((now + 150) * 1000))
    seconds = k._lease_due(record, now)
    assert seconds is not None and 154 < seconds <= 155 + LEASE_GRACE_S
    await k._extend(record, seconds)
    assert k._lease_due(record, now + 29) is None  # more than half of the 60 s left
    assert k._lease_due(record, time.time() + 31) is not None  # half gone: the next step
    assert k.interval_s() <= 30.5  # woken in time for it
    # Once the timeout set covers the rest of the lease (and its grace), nothing more.
    k._expires["sb-1"] = now + 150 + LEASE_GRACE_S
    assert k._lease_due(record, now + 140) is None


async def test_a_renew_is_followed_at_once_and_a_failed_extend_is_tried_again():
    events = Events()
    provider = CappedProvider(cap=3600, fail=1)
    k = keepalive(provider, events)
    now = time.time()
    record = claimed(int((now + 60) * 1000))
    await k._extend(record, k._lease_due(record, now))
    assert events.published == ["sandbox.keepalive_failed"]
    assert k._lease_due(record, now) is not None  # not marked done: tried again
    await k._extend(record, k._lease_due(record, now))
    assert k._lease_due(record, now) is None
    renewed = claimed(int((now + 300) * 1000))
    assert k._lease_due(renewed, now) is not None


async def test_with_local_pools_only_nothing_reads_the_event_stream(monkeypatch):
    """No pool of a provider with timeouts: a round reads no event (each would cost a busy
    daemon's CPU for nothing) and waits; a pool of one is followed from then on."""
    import fakeredis

    from sandboxd.control import keepalive as module
    from sandboxd.spec import PoolSpec, SpecDocument
    from sandboxd.store.keys import Keys

    redis = fakeredis.FakeAsyncRedis(decode_responses=True)
    store = SimpleNamespace(redis=redis, keys=Keys())
    specs = SimpleNamespace(in_force=SpecDocument(revision=1, pools=[PoolSpec(name="p")]))
    k = Keepalive(store=store, specs=specs, providers={"e2b": CappedProvider(cap=60)}, events=None)
    reads: list[str] = []

    async def read_after(redis, stream, cursor, *, block_ms):
        reads.append(cursor)
        return []

    monkeypatch.setattr(module, "read_after", read_after)
    monkeypatch.setattr(module, "IDLE_TICK_S", 0.0)
    await k._serve()
    assert reads == [] and k._cursor is None
    specs.in_force = SpecDocument(
        revision=2, pools=[PoolSpec(name="p"), PoolSpec(name="cloud", provider="e2b")]
    )
    monkeypatch.setattr(k, "once", lambda: _nothing())
    monkeypatch.setattr(k, "interval_s", lambda: 0.01)
    await k._serve()
    assert reads and k._cursor is not None  # followed from the stream's end on


async def _nothing() -> None:
    return None
