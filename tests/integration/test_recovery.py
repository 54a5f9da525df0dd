"""Killed sandboxes are replaced; a killed daemon's successor adopts the same sandboxes."""

import os
import signal

from sandboxd.store.records import SandboxStore
from tests.support import (
    KEYS,
    apply,
    events_of,
    eventually,
    sandbox_processes,
    wait_event,
    wait_ready,
)


async def record_pids(redis) -> dict[str, int]:
    records = await SandboxStore(redis, KEYS).records()
    return {r.id: r.handle["pid"] for r in records if "pid" in r.handle}


async def test_killed_sandbox_is_replaced_within_a_tick(redis, daemon_factory):
    daemon_factory(reconcile_interval_s=1.0).start()
    await apply(redis, [{"name": "default", "min_ready": 2}])
    victim, survivor = await wait_ready(redis, "default", 2)
    os.kill((await record_pids(redis))[victim], signal.SIGKILL)
    died = await wait_event(redis, "sandbox.terminated", sandbox=victim)
    assert died["data"]["reason"] == "died" and died["data"]["state"] == "ready"
    ids = await eventually(lambda: _ready_without(redis, victim), what="replacement ready")
    assert survivor in ids and len(ids) == 2
    replacement = (set(ids) - {survivor}).pop()
    ready = await wait_event(redis, "sandbox.ready", sandbox=replacement)
    assert ready["stream_id"] > died["stream_id"]
    started = await wait_event(redis, "recovery.started", sandbox=victim)
    done = await wait_event(redis, "recovery.succeeded", old=victim)
    assert started["data"]["reason"] == "died" and done["data"]["new"] == replacement
    assert started["stream_id"] < died["stream_id"] < ready["stream_id"] < done["stream_id"]


async def _ready_without(redis, gone: str):
    ids = await redis.lrange(KEYS.pool_ready("default"), 0, -1)
    return ids if len(ids) == 2 and gone not in ids else None


async def test_kill_9_daemon_then_restart_adopts_the_same_sandboxes(redis, daemon_factory):
    first = daemon_factory().start()
    await apply(redis, [{"name": "default", "min_ready": 3}, {"name": "b", "min_ready": 1}])
    before = sorted(await wait_ready(redis, "default", 3) + await wait_ready(redis, "b", 1))
    first.signal(signal.SIGKILL)
    first.wait()
    second = daemon_factory().start()
    await wait_event(redis, "daemon.started", adopted=4)
    adopted = sorted(e["sandbox"] for e in await events_of(redis, "sandbox.adopted"))
    assert adopted == before
    assert sorted(await redis.smembers(KEYS.sandboxes)) == before
    live = sandbox_processes(first.workspace)
    assert sorted(p.pid for p in live) == sorted((await record_pids(redis)).values())
    started = (await events_of(redis, "daemon.started"))[-1]["stream_id"]
    later = [
        e
        for e in await events_of(redis, "sandbox.creating", "sandbox.terminated")
        if e["stream_id"] > started
    ]
    assert later == []  # nothing recreated, nothing lost
    assert second.proc.poll() is None


async def test_orphans_and_dead_records_are_cleaned_at_start(redis, daemon_factory):
    first = daemon_factory(on_shutdown="keep").start()
    await apply(redis, [{"name": "default", "min_ready": 3}])
    a, b, c = await wait_ready(redis, "default", 3)
    first.stop()
    pids = await record_pids(redis)
    os.kill(pids[a], signal.SIGKILL)  # record left, process gone
    await redis.delete(KEYS.sandbox(b))  # process left, record gone
    await redis.srem(KEYS.sandboxes, b)
    await redis.lrem(KEYS.pool_ready("default"), 0, b)
    daemon_factory().start()
    await wait_event(redis, "daemon.started")
    assert (await wait_event(redis, "sandbox.terminated", sandbox=a))["data"]["reason"] == "died"
    assert (await wait_event(redis, "sandbox.terminated", sandbox=b))["data"]["reason"] == "orphan"
    ids = await wait_ready(redis, "default", 3)
    assert c in ids and a not in ids and b not in ids
    live = sandbox_processes(first.workspace)
    assert sorted(p.pid for p in live) == sorted((await record_pids(redis)).values())


async def test_the_janitor_closes_a_lost_record_and_replaces_the_sandbox(redis, daemon_factory):
    # Liveness ticks and probes far apart, deaths not watched: only the janitor can notice.
    daemon_factory(
        reconcile_interval_s=60, janitor_interval_s=0.2, local={"watch_deaths": False}
    ).start()
    slow = {"interval_s": 86400}
    await apply(redis, [{"name": "default", "min_ready": 2, "health": slow}])
    victim, _ = await wait_ready(redis, "default", 2)
    os.kill((await record_pids(redis))[victim], signal.SIGKILL)
    lost = await wait_event(redis, "sandbox.terminated", sandbox=victim)
    assert lost["data"]["reason"] == "lost"
    done = await wait_event(redis, "recovery.succeeded", old=victim)
    assert victim not in await wait_ready(redis, "default", 2)
    assert done["data"]["reason"] == "lost"


async def test_a_death_is_noticed_when_it_happens_not_at_the_tick(redis, daemon_factory):
    """A pidfd per live sandbox: a death nudges the reconciler (a 60 s tick, no probes)."""
    daemon_factory(reconcile_interval_s=60).start()
    await apply(redis, [{"name": "default", "min_ready": 2, "health": {"interval_s": 3600}}])
    victim, survivor = await wait_ready(redis, "default", 2)
    os.kill((await record_pids(redis))[victim], signal.SIGKILL)
    died = await wait_event(redis, "sandbox.terminated", sandbox=victim, timeout=10)
    assert died["data"]["reason"] == "died"
    ids = await eventually(lambda: _ready_without(redis, victim), timeout=10, what="replacement")
    assert survivor in ids
