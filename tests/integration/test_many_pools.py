"""Many pools stay cheap (issue 15): the heartbeat carries a summary, not every pool, and a
pool's facts in `<prefix>:daemon:pools` (and its claim settings in `<prefix>:pools`) are
written only when they change — watched with Redis MONITOR while the daemon idles."""

import asyncio
import contextlib
import json

from redis.asyncio import Redis

from sandboxd.cli.views import StateView
from tests.support import KEYS, apply, eventually

POOLS = 2000
WRITES = {"set", "hset", "hdel", "del", "hsetnx", "hincrbyfloat", "unlink", "rename"}


def spec(**changed: dict) -> list[dict]:
    pools = [{"name": f"p{i}", "min_ready": 0, "max_total": 1} for i in range(POOLS)]
    for pool in pools:
        pool.update(changed.get(pool["name"], {}))
    return pools


async def writes_while(redis_url: str, seconds: float) -> list[list[str]]:
    """Every write command Redis runs (scripts' included) for `seconds`: [name, key, ...]."""
    seen: list[list[str]] = []
    client = Redis.from_url(redis_url, decode_responses=True)

    async def watch() -> None:
        async with client.monitor() as monitor:
            async for command in monitor.listen():
                words = command["command"].split(" ")
                if words[0].lower() in WRITES:
                    seen.append([words[0].lower(), *words[1:3]])

    task = asyncio.create_task(watch())
    try:
        await asyncio.sleep(seconds)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.aclose()
    return seen


def touching(writes: list[list[str]], key: str) -> list[list[str]]:
    return [w for w in writes if len(w) > 1 and w[1] in (key, f'"{key}"')]


async def test_2000_idle_pools_a_small_heartbeat_and_no_rewrites(
    redis, redis_server, embedded_daemon
):
    daemon = await embedded_daemon()
    daemon.config.heartbeat_interval_s = 0.1  # read live, as a reload sets them
    daemon.config.reconcile_interval_s = 0.2
    revision = await apply(redis, spec())

    async def in_force():
        beat = json.loads(await redis.get(KEYS.daemon) or "{}")
        summary = beat.get("pool_summary") or {}
        counted = await redis.hlen(KEYS.daemon_pools)
        return beat if beat.get("revision") == revision and counted == POOLS and summary else None

    beat = await eventually(in_force, what="2000 pools in force and reported")
    assert beat["pool_summary"]["pools"] == POOLS
    assert "pools" not in beat  # a summary, not every pool
    await asyncio.sleep(0.5)  # the passes after the apply settle
    assert await redis.strlen(KEYS.daemon) < 2048  # it was ~750 kB for 2000 pools

    written = daemon.wings.heartbeat.pools.fields_written
    writes = await writes_while(redis_server, 1.2)  # ~12 beats, ~6 reconcile ticks
    assert len(touching(writes, KEYS.daemon)) >= 5  # it is beating all along
    assert touching(writes, KEYS.daemon_pools) == []  # nothing changed: nothing rewritten
    assert touching(writes, KEYS.pools) == []
    assert daemon.wings.heartbeat.pools.fields_written == written

    # One pool changes: only its field is written, in both hashes.
    await apply(redis, spec(p7={"max_total": 3}))

    async def rewritten():
        facts = json.loads(await redis.hget(KEYS.daemon_pools, "p7") or "{}")
        return facts if facts.get("max_total") == 3 else None

    await eventually(rewritten, what="p7's new size in its facts")
    assert json.loads(await redis.hget(KEYS.pools, "p7"))["max_total"] == 3
    assert daemon.wings.heartbeat.pools.fields_written == written + 1

    # `status` reads the heartbeat and the pools' facts (one HGETALL), and the spec once.
    status = await StateView(redis, KEYS).status()
    assert len(status["daemon"]["pools"]) == POOLS == len(status["pools"])
    assert status["daemon"]["pools"]["p7"]["max_total"] == 3

    # Lost behind the daemon's back (a DEL, FLUSHDB): written whole again.
    await redis.delete(KEYS.daemon_pools, KEYS.pools)

    async def healed():
        return await redis.hlen(KEYS.daemon_pools) == POOLS == await redis.hlen(KEYS.pools)

    await eventually(healed, what="both hashes rewritten")
