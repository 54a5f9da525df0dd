"""Issue 21's parts against a real redis-server: the outbox (what changed while Redis could
not be reached: written in order, once, flagged) and the custody of a lapsed lease."""

import asyncio
import json
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from sandboxd.config import Config
from sandboxd.control.localstate import LocalState
from sandboxd.control.outbox import Outbox
from sandboxd.leadership import Leadership
from sandboxd.store.events import EventPublisher
from sandboxd.store.fence import Fence, LeaseLapsed, LeaseLost
from sandboxd.store.records import SandboxStore
from tests.support import KEYS, events_of


async def _record(redis: Redis, sandbox_id: str) -> None:
    await redis.hset(KEYS.sandbox(sandbox_id), mapping={"id": sandbox_id, "state": "ready"})
    await redis.sadd(KEYS.sandboxes, sandbox_id)
    await redis.sadd(KEYS.pool_members("p"), sandbox_id)
    await redis.rpush(KEYS.pool_ready("p"), sandbox_id)


@pytest.mark.timeout(20)
async def test_late_changes_are_written_in_order_once_even_when_replayed(redis, tmp_path: Path):
    journal = LocalState(tmp_path / "state")
    events = EventPublisher(redis, KEYS, 1000)
    outbox = Outbox(journal, SandboxStore(redis, KEYS), events)
    for sandbox_id in ("sb-1", "sb-2"):
        await _record(redis, sandbox_id)
        await outbox.add(
            "sandbox.terminated", pool="p", sandbox=sandbox_id, close=True, reason="shutdown"
        )
    await outbox.add("daemon.stopping", instance="i", terminated=2, kept=0)
    saved = (tmp_path / "state" / "outbox.json").read_text()
    assert len(json.loads(saved)) == outbox.pending == 3  # on disk before Redis is asked

    # A crash after the first flush, before the file lost its entries: replayed, once.
    first = await Outbox(journal, SandboxStore(redis, KEYS), events).flush()
    (tmp_path / "state" / "outbox.json").write_text(saved)
    replayed = Outbox(journal, SandboxStore(redis, KEYS), events)
    assert replayed.pending == 3 and await replayed.flush() == []
    assert (
        replayed.pending == 0 and json.loads((tmp_path / "state" / "outbox.json").read_text()) == []
    )

    written = await events_of(redis)
    assert [(e["type"], e["sandbox"]) for e in written] == [
        ("sandbox.terminated", "sb-1"),
        ("sandbox.terminated", "sb-2"),
        ("daemon.stopping", ""),
    ]
    assert [e["id"] for e in written] == [e.id for e in first]
    assert all(e["data"]["late"] is True for e in written)
    assert await redis.exists(KEYS.sandbox("sb-1"), KEYS.sandbox("sb-2")) == 0
    assert await redis.smembers(KEYS.sandboxes) == set()
    assert await redis.lrange(KEYS.pool_ready("p"), 0, -1) == []


@pytest.mark.timeout(20)
async def test_an_outbox_entry_that_does_not_parse_is_dropped(redis, tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    good = {"event": {"id": "e1", "type": "daemon.stopping", "time": "t", "data": "{}"}}
    entries = [
        {**good, "close": "", "pool": ""},
        {**good, "close": "../../etc", "pool": ""},  # not a sandbox id
        {"event": "not fields", "close": "", "pool": ""},
        "not an entry",
    ]
    (state / "outbox.json").write_text(json.dumps(entries))
    (state / "outbox.json").chmod(0o600)
    outbox = Outbox(LocalState(state), SandboxStore(redis, KEYS), EventPublisher(redis, KEYS, 10))
    assert outbox.pending == 1


async def test_a_lapsed_lease_keeps_the_sandboxes_while_this_hosts_record_names_it(
    redis, tmp_path: Path
):
    config = Config(redis_url="redis://127.0.0.1:1/0", lease_ttl_s=1, node="n")
    custody = LocalState(tmp_path / "state")
    leadership = Leadership(
        redis, config, instance="me", identity={}, stop=asyncio.Event(), on_lost=lambda r: None,
        custody=custody,
    )  # fmt: skip
    leadership.node.token = "7:me"
    fence: Fence = leadership.fence
    fence.hold(leadership.node.key, "7:me", ttl_s=1, since=time.monotonic() - 2)
    fence.cut_off = True  # renewals failed to reach Redis: lapsed, not lost
    custody.save_holder("7:me")
    with pytest.raises(LeaseLapsed) as lapsed:  # writes wait, as for an outage
        fence.check()
    assert isinstance(lapsed.value, RedisError) and fence.lost is None
    leadership.check_local()  # the node's sandboxes: still this daemon's
    custody.save_holder("8:standby")  # a daemon of this host took the lease meanwhile
    with pytest.raises(LeaseLost):
        leadership.check_local()
    assert fence.lost is not None

    paused = Fence()  # past its deadline with no failed renewal (paused): lost, as before
    paused.hold("k", "7:me", ttl_s=1, since=time.monotonic() - 2)
    with pytest.raises(LeaseLost):
        paused.check()
