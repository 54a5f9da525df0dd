"""Consumer groups of the event stream, on a real redis-server: at least once across a
`kill -9` (Client.events), and retention that waits for registered groups (the real daemon
trims; past the hard bound `events.dropped` says what a group lost)."""

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sandboxd.client import Client
from sandboxd.store.events import EventPublisher
from tests.support import KEYS, PREFIX, cli, eventually, wait_event

pytestmark = pytest.mark.timeout(60)

# A consumer of group `billing` that writes each event id it handled to a file and hangs in
# the handler of its 121st event (in the middle of its third batch of 50).
CONSUMER = """
import asyncio, sys
from sandboxd.client import Client

async def main(url, out):
    handled = 0
    async with Client.from_url(url, prefix=sys.argv[3]) as client:
        with open(out, "a") as sink:
            async for event in client.events("billing", "a", count=50, start="0"):
                if handled == 120:
                    await asyncio.Event().wait()  # stuck mid-batch: killed here
                sink.write(event.id + "\\n")
                sink.flush()
                handled += 1

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def sandboxd(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    """The CLI of this tree (PYTHONPATH kept: the venv may hold another checkout)."""
    return cli(redis_url, *args, env={"PYTHONPATH": os.environ.get("PYTHONPATH", "")})


async def publish(redis, n: int, pools=("p1", "p2")) -> list[str]:
    publisher = EventPublisher(redis, KEYS, maxlen=100)
    return [
        (await publisher.publish("pool.scaled", pool=pools[i % len(pools)], n=i)).id
        for i in range(n)
    ]


async def publish_at_once(redis, n: int) -> list[str]:
    """`n` events in one transaction: no retention pass of the daemon runs in between."""
    publisher = EventPublisher(redis, KEYS, maxlen=100)
    events = [publisher.build("pool.scaled", pool="p1", n=i) for i in range(n)]
    async with redis.pipeline(transaction=True) as pipe:
        for event in events:
            pipe.xadd(KEYS.events, event.to_fields())
        await pipe.execute()
    return [event.id for event in events]


async def stream_event_ids(redis) -> list[str]:
    return [fields.get("id") for _, fields in await redis.xrange(KEYS.events)]


async def test_a_consumer_killed_mid_batch_loses_nothing(redis, redis_server, tmp_path: Path):
    first = await publish(redis, 300)
    out = tmp_path / "a.ids"
    out.touch()
    proc = subprocess.Popen(
        [sys.executable, "-c", CONSUMER, redis_server, str(out), PREFIX],
        env=os.environ.copy(),
    )
    try:

        async def stuck_in_its_121st() -> bool:
            if not _lines(out, 120):  # (the group exists from its first line on)
                return False
            pending = await redis.xpending_range(KEYS.events, "billing", "-", "+", 100, "a")
            return len(pending) == 50

        await eventually(stuck_in_its_121st, timeout=20, what="consumer a to handle 120 events")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    handled_by_a = out.read_text().split()
    pending_at_a = [
        p["message_id"]
        for p in await redis.xpending_range(KEYS.events, "billing", "-", "+", 1000, "a")
    ]
    # 101..150: its third batch, read; 101..120 handled, acknowledged with the batch (never:
    # killed first), 121 in its handler, the rest waiting
    assert len(pending_at_a) == 50
    later = await publish(redis, 100)  # the stream goes on meanwhile

    seen_by_b: list[tuple[str, str]] = []  # (stream id, event id)
    expected = set(await stream_event_ids(redis))

    async def consume_b() -> None:
        async with Client.from_url(redis_server, prefix=PREFIX) as client:
            events = client.events("billing", "b", claim_idle_s=0.3, count=50)
            async with contextlib.aclosing(events):
                async for event in events:
                    seen_by_b.append((event.stream_id, event.id))
                    if expected <= set(handled_by_a) | {i for _, i in seen_by_b}:
                        return

    await asyncio.wait_for(consume_b(), 20)
    # every event id reached the group, a's unacknowledged entries went to b
    assert set(handled_by_a) | {i for _, i in seen_by_b} == expected
    assert set(first + later) <= expected
    assert set(pending_at_a) <= {s for s, _ in seen_by_b}
    # b acknowledged each once its handler returned: only the one it left the loop in
    # (`return`) is still pending, delivered again to whoever reads next
    pending = await redis.xpending_range(KEYS.events, "billing", "-", "+", 100)
    assert [(p["message_id"], p["consumer"]) for p in pending] == [(seen_by_b[-1][0], "b")]


def _lines(path: Path, n: int) -> bool:
    return len(path.read_text().split()) >= n


async def _read(redis_server: str, group: str, wanted: set[str], timeout: float) -> set[str]:
    """Read group `group` until every id of `wanted` came (or the stream has no more)."""
    seen: set[str] = set()

    async def go() -> None:
        async with Client.from_url(redis_server, prefix=PREFIX) as client:
            events = client.events(group, "c1", pools=["p1", "p2"], block_ms=200)
            async with contextlib.aclosing(events):
                async for event in events:
                    seen.add(event.id)
                    if wanted <= seen:
                        return

    try:
        await asyncio.wait_for(go(), timeout)
    except TimeoutError:
        pass
    return seen


def _daemon(daemon_factory, max_len: int):
    return daemon_factory(
        event_stream_maxlen=100,
        events={"max_len": max_len, "trim_interval_s": 0.1},
    ).start()


async def test_retention_waits_for_a_registered_group(redis, redis_server, daemon_factory):
    _daemon(daemon_factory, max_len=5000)
    await wait_event(redis, "daemon.started")
    unheld = await publish(redis, 300)  # before the group's start: nothing holds them
    registered = sandboxd(redis_server, "consumers", "add", "billing", "--from", "new")
    assert registered.returncode == 0, registered.stderr
    unregistered = await redis.xgroup_create(KEYS.events, "scratch", id="0")
    assert unregistered
    missed = await publish(redis, 500)  # 5x event_stream_maxlen while the group is stopped

    async def trimmed_to_the_group() -> bool:
        oldest = await redis.xrange(KEYS.events, count=1)
        return bool(oldest) and oldest[0][1]["id"] not in unheld

    # the daemon trimmed what nobody registered needs (the unregistered group's too)...
    await eventually(trimmed_to_the_group, timeout=15, what="the stream trimmed")
    # ... and kept all the registered group has not read
    assert set(missed) <= set(await stream_event_ids(redis))
    seen = await _read(redis_server, "billing", set(missed), timeout=15)
    assert set(missed) <= seen and not set(unheld) & seen

    listing = sandboxd(redis_server, "consumers", "list", "-o", "json")
    assert listing.returncode == 0, listing.stderr
    groups = {g["name"]: g for g in json.loads(listing.stdout)}
    assert groups["billing"]["registered"] and groups["billing"]["pending"] <= 1  # (see above)
    assert not groups["scratch"]["registered"]
    table = sandboxd(redis_server, "consumers", "list")
    assert "LAST_DELIVERED" in table.stdout and "billing" in table.stdout
    # once read, the group holds nothing: the stream shrinks back towards 100 entries
    await eventually(
        lambda: _shorter(redis, 150), timeout=15, what="the stream trimmed back to its length"
    )


async def _shorter(redis, n: int) -> bool:
    return await redis.xlen(KEYS.events) < n


async def test_past_the_hard_bound_events_dropped_says_what_a_group_lost(
    redis, redis_server, daemon_factory
):
    _daemon(daemon_factory, max_len=200)
    await wait_event(redis, "daemon.started")
    assert sandboxd(redis_server, "consumers", "add", "billing").returncode == 0
    # At once: a pass in the middle would drop part, and the rest of the publishing would
    # then push its events.dropped out of the stream before the test reads it.
    missed = await publish_at_once(redis, 500)
    dropped = await wait_event(redis, "events.dropped", timeout=15)
    assert dropped["data"]["reason"] == "events.max_len"

    async def total_lost() -> int:
        events = [
            json.loads(f["data"])
            for _, f in await redis.xrange(KEYS.events)
            if f.get("type") == "events.dropped"
        ]
        return sum(e["groups"].get("billing", 0) for e in events)

    await eventually(lambda: _shorter(redis, 260), timeout=15, what="the hard bound")
    seen = await _read(redis_server, "billing", set(missed[-150:]), timeout=15)
    # Counted after the read: passes may trim on while the publishing ends, but nothing the
    # group has read counts as lost to it any more.
    lost = await total_lost()
    never_read = [i for i in missed if i not in seen]
    assert never_read, "the hard bound must have cost the stopped group events"
    assert never_read == missed[: len(never_read)]  # the oldest went
    assert lost >= len(never_read)  # events.dropped accounted for every one (and more
    # of the daemon's own events the group had not read either)
    assert lost <= len(never_read) + 20


async def test_group_cli_refuses_bad_input_and_reads_with_a_group(redis, redis_server):
    bad = sandboxd(redis_server, "events", "--group", "no spaces", "--consumer", "c")
    assert bad.returncode == 2 and "consumer group" in bad.stderr and "Traceback" not in bad.stderr
    alone = sandboxd(redis_server, "events", "--group", "g")
    assert alone.returncode == 2 and "--consumer" in alone.stderr
    assert sandboxd(redis_server, "consumers", "add", "x/y").returncode == 2
    assert sandboxd(redis_server, "consumers", "remove", "nobody").returncode == 2
    await redis.hset(KEYS.event_consumers, "bad name\n", "{}")  # written by someone: input
    await redis.xgroup_create(KEYS.events, "ops", id="0", mkstream=True)
    ids = await publish(redis, 3)
    out = sandboxd(
        redis_server, "events", "--group", "ops", "--consumer", "c", "-n", "3", "-o", "json"
    )
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["id"] for line in out.stdout.splitlines()] == ids
    assert (await redis.xpending(KEYS.events, "ops"))["pending"] == 0
    listing = sandboxd(redis_server, "consumers", "list", "-o", "json")
    assert listing.returncode == 0 and "bad name" not in listing.stdout


async def test_a_consumer_resumes_after_its_connections_are_killed(redis, redis_server):
    from redis.asyncio import Redis

    seen: list[str] = []
    ids = await publish(redis, 10)
    consumer = Redis.from_url(redis_server, decode_responses=True, client_name="consumer-x")
    client = Client(consumer, prefix=PREFIX)

    async def consume() -> None:
        events = client.events("resume", "c1", start="0", block_ms=200, count=5)
        async with contextlib.aclosing(events):
            async for event in events:
                seen.append(event.id)

    task = asyncio.create_task(consume())
    try:
        await eventually(lambda: _has(seen, ids), what="the first 10")
        for _ in range(3):  # killed while blocked in XREADGROUP, and again after new events
            killed = await _kill(redis, "consumer-x")
            assert killed
            ids += await publish(redis, 10)
            await eventually(
                lambda wanted=list(ids): _has(seen, wanted), timeout=15, what="events after a kill"
            )
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await consumer.aclose()
    assert set(seen) == set(ids)


async def _has(seen: list[str], ids: list[str]) -> bool:
    return set(ids) <= set(seen)


async def _kill(redis, name: str) -> int:
    clients = [c for c in await redis.client_list() if c.get("name") == name]
    for c in clients:
        await redis.client_kill_filter(_id=c["id"])
    return len(clients)
