"""Chaos: injected create failures, a failing provider, sudden deaths, a daemon killed
mid-scale — real Redis, real local sandboxes. (Redis restarted under the daemon:
test_redis_outage.py.)"""

import asyncio
import json
import signal

from sandboxd.store.records import SandboxStore
from tests.support import (
    KEYS,
    SOAK,
    apply,
    cli,
    events_of,
    eventually,
    sandbox_processes,
    wait_event,
    wait_ready,
)

FAST_BREAKER = {"failures": 3, "cooldown_s": 0.5, "max_cooldown_s": 1.0}


async def no_orphans(redis, workspace) -> None:
    """Every live sandbox process has a record, every record a live process, every
    directory a record."""
    records = await SandboxStore(redis, KEYS).records()
    live = sorted(p.pid for p in sandbox_processes(workspace))
    assert live == sorted(r.handle["pid"] for r in records)
    dirs = sorted(p.name for p in workspace.iterdir()) if workspace.exists() else []
    assert dirs == sorted(r.id for r in records)


async def pool_facts(redis, pool: str) -> dict:
    return json.loads(await redis.hget(KEYS.daemon_pools, pool))


async def test_a_30_percent_create_failures_every_pool_still_reaches_target(redis, embedded_daemon):
    daemon = await embedded_daemon(
        faults={"local": {"create_failure_rate": 0.3, "seed": 11}}, max_concurrent_creates=4
    )
    await apply(
        redis,
        [
            {"name": "a", "min_ready": 8, "breaker": FAST_BREAKER},
            {"name": "b", "min_ready": 5, "breaker": FAST_BREAKER},
        ],
    )
    await wait_ready(redis, "a", 8, timeout=60)
    await wait_ready(redis, "b", 5, timeout=60)
    injected = daemon.providers["local"].injected["create_failure"]
    failed = await events_of(redis, "sandbox.create_failed")
    assert injected > 0 and len(failed) == injected
    assert {e["data"]["error"] for e in failed} == {"injected create failure"}

    async def counted():  # the heartbeat may be a beat behind the events
        facts = {p: await pool_facts(redis, p) for p in ("a", "b")}
        return facts if sum(f["failed_attempts"] for f in facts.values()) == injected else None

    facts = await eventually(counted, what="the heartbeat to count every failed create")
    assert all(
        f["created"] >= 1 and f["last_error"] for f in facts.values() if f["failed_attempts"]
    )
    await no_orphans(redis, daemon.workspace)


async def test_b_a_failing_provider_opens_the_breaker_and_the_pool_heals_after(
    redis, embedded_daemon, redis_server
):
    daemon = await embedded_daemon(faults={"local": {"create_failure_rate": 1.0}})
    await apply(redis, [{"name": "p", "min_ready": 4, "breaker": FAST_BREAKER}])
    opened = await wait_event(redis, "pool.breaker_opened", pool="p")
    assert opened["data"]["failures"] == 3 and opened["data"]["error"] == "injected create failure"
    assert len(await events_of(redis, "sandbox.create_failed")) == 3  # within N attempts

    async def reopened_twice():
        return len(await events_of(redis, "pool.breaker_opened")) >= 3

    await eventually(reopened_twice, what="two failed trial creates")
    facts = await pool_facts(redis, "p")
    assert facts["breaker"] in ("open", "half_open")
    assert facts["below_target"].startswith(("breaker open", "breaker half-open"))
    table = (await asyncio.to_thread(cli, redis_server, "status")).stdout
    assert "BREAKER" in table and ("injected create failure" in table or "half-open" in table)
    daemon.providers["local"].faults.create_failure_rate = 0.0  # the provider recovers
    await wait_event(redis, "pool.breaker_closed", pool="p")
    await wait_ready(redis, "p", 4)
    attempts = len(await events_of(redis, "sandbox.create_failed"))
    trials = len(await events_of(redis, "pool.breaker_opened")) - 1
    assert attempts == 3 + trials  # while open: one trial create per cooldown, no more

    async def reported_closed():
        return (await pool_facts(redis, "p"))["breaker"] == "closed"

    await eventually(reported_closed, what="the heartbeat to report the breaker closed")


async def test_c_random_kills_all_replaced_never_over_max_total(redis, embedded_daemon):
    daemon = await embedded_daemon(faults={"local": {"seed": 5}})
    await apply(redis, [{"name": "p", "min_ready": 5, "max_total": 6}])
    await wait_ready(redis, "p", 5)
    provider = daemon.providers["local"]
    killed, most = [], 0
    loop = asyncio.get_running_loop()
    end = loop.time() + (300 if SOAK else 10)  # 10 s: about 65 kills
    while loop.time() < end:
        victim = await provider.kill_random()
        if victim:
            killed.append(victim)
        most = max(most, await redis.scard(KEYS.pool_members("p")))
        await asyncio.sleep(0.15)  # the chaos' pace, not a synchronisation
    assert len(killed) > 40 and most <= 6

    async def healed():
        ids = await redis.lrange(KEYS.pool_ready("p"), 0, -1)
        return len(ids) == 5 and not set(ids) & set(killed)

    await eventually(healed, what="5 ready, none of them killed")
    for victim in killed:
        await wait_event(redis, "sandbox.terminated", sandbox=victim)
    await no_orphans(redis, daemon.workspace)


async def test_e_kill_9_mid_scale_then_restart_leaks_nothing_and_reaches_target(
    redis, daemon_factory
):
    first = daemon_factory(max_concurrent_creates=3).start()
    await apply(redis, [{"name": "p", "min_ready": 20, "max_total": 20, "max_surge": 3}])

    async def mid_scale():
        records = await SandboxStore(redis, KEYS).records()
        states = [r.state for r in records]
        return states.count("ready") >= 5 and "creating" in states

    await eventually(mid_scale, what="scaling under way")
    first.signal(signal.SIGKILL)
    first.wait()
    daemon_factory().start()
    await wait_ready(redis, "p", 20, timeout=60)
    await eventually(lambda: _settled(redis), what="no create in flight")
    await no_orphans(redis, first.workspace)
    assert len(sandbox_processes(first.workspace)) == 20


async def _settled(redis) -> bool:
    records = await SandboxStore(redis, KEYS).records()
    return len(records) == 20 and all(r.state == "ready" for r in records)
