"""Waiting on Redis with a deadline (never sleeping as synchronisation), specs, the CLI."""

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import Redis

from sandboxd.spec import Spec
from sandboxd.store.events import Event
from sandboxd.store.keys import Keys
from sandboxd.store.specs import SpecStore

PREFIX = "sandboxd"
KEYS = Keys(PREFIX)

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]],
    *,
    timeout: float = 20.0,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Poll `probe` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


async def apply(redis: Redis, pools: list[dict]) -> int:
    """Apply a spec the way `sandboxd apply` does; returns the revision."""
    applied = await SpecStore(redis, KEYS).apply(Spec.model_validate({"pools": pools}))
    return applied.document.revision


def until(check: Callable[[], T], what: str = "condition", within: float = 10.0) -> T:
    """The synchronous `eventually`, for tests driving a synchronous SDK: `check()`'s first
    true value, polled until `within` seconds have passed (then fail with `what`)."""
    deadline = time.monotonic() + within
    while not (found := check()):
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        time.sleep(0.02)
    return found


async def ready_ids(redis: Redis, pool: str) -> list[str]:
    return await redis.lrange(KEYS.pool_ready(pool), 0, -1)


async def wait_ready(
    redis: Redis, pool: str, count: int, timeout: float = 30.0, interval: float = 0.02
) -> list[str]:
    """The pool's ready ids once there are exactly `count` (benchmarks poll faster)."""

    async def probe():
        ids = await ready_ids(redis, pool)
        return ids if len(ids) == count else None

    what = f"{count} ready in pool {pool}"
    return await eventually(probe, timeout=timeout, interval=interval, what=what)


async def events_of(redis: Redis, *types: str) -> list[dict]:
    entries = await redis.xrange(KEYS.events)
    out = [Event.from_fields(fields).model_dump() | {"stream_id": sid} for sid, fields in entries]
    return [e for e in out if not types or e["type"] in types]


async def wait_event(redis: Redis, type_: str, timeout: float = 20.0, **match) -> dict:
    async def probe():
        for event in await events_of(redis, type_):
            if all(event.get(k) == v or event["data"].get(k) == v for k, v in match.items()):
                return event
        return None

    return await eventually(probe, timeout=timeout, what=f"event {type_} {match}")


def cli(
    redis_url: str, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {"SANDBOXD_REDIS_URL": redis_url, "PATH": "/usr/bin:/bin", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "sandboxd", *args],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


async def sample_totals(redis: Redis, stop: asyncio.Event, peaks: dict[str, int]) -> int:
    """Until `stop`: the most sandboxes of each pool seen at once, into `peaks`; returns how
    many samples were taken (a cap like max_total is checked against them)."""
    samples = 0
    while not stop.is_set():
        ids = await redis.smembers(KEYS.sandboxes)
        async with redis.pipeline(transaction=False) as pipe:
            for sandbox_id in ids:
                pipe.hget(KEYS.sandbox(sandbox_id), "pool")
            pools = await pipe.execute()
        for name in {p for p in pools if p}:
            peaks[name] = max(peaks.get(name, 0), pools.count(name))
        samples += 1
        await asyncio.sleep(0.005)
    return samples
