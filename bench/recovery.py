"""Recovery: death -> replacement ready, time to detect an unhealthy sandbox, and what
probing 500 sandboxes costs the reconcile loop.

    .venv/bin/python bench/recovery.py [--rounds 20] [--interval 1.0] [--probed 500]

Baselines, measured in the same run: a cold create (the floor for any replacement), and
the configured intervals (detection cannot beat the tick or threshold x probe interval).
"""

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path

from redis.asyncio import Redis
from tests.support import free_port, wait_ready

from bench.common import cold_creates, line, running_daemon
from bench.fastfake import FastFakeProvider
from sandboxd.config import Config, Faults
from sandboxd.daemon import Daemon
from sandboxd.providers.faults import inject
from sandboxd.providers.local.agentclient import AgentClient
from sandboxd.spec import Spec
from sandboxd.store.events import Event
from sandboxd.store.keys import Keys
from sandboxd.store.localredis import find_redis_server, start, wait_until_answering
from sandboxd.store.records import SandboxStore
from sandboxd.store.specs import SpecStore

KEYS = Keys()


async def next_event(redis: Redis, last: str, type_: str, **match: str) -> str:
    """Read the stream after `last` until an event of `type_` whose sandbox or data fields
    have the `match` values; returns its stream id."""
    while True:
        for _, batch in await redis.xread({KEYS.events: last}, block=10_000, count=100):
            for stream_id, fields in batch:
                last = stream_id
                event = Event.from_fields(fields)
                values = {"sandbox": event.sandbox, **event.data}
                if event.type == type_ and all(values.get(k) == v for k, v in match.items()):
                    return last


async def deaths(redis: Redis, rounds: int) -> tuple[list[float], list[float]]:
    """SIGKILL a ready sandbox: ms to `sandbox.terminated` (detection), to the replacement
    ready (`recovery.succeeded`)."""
    detect, replace = [], []
    store = SandboxStore(redis, KEYS)
    for _ in range(rounds):
        await wait_ready(redis, "deaths", 4, timeout=600, interval=0.002)
        victim = (await redis.lrange(KEYS.pool_ready("deaths"), 0, 0))[0]
        last = (await redis.xrevrange(KEYS.events, count=1))[0][0]
        pid = (await store.get(victim)).handle["pid"]
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        last = await next_event(redis, last, "sandbox.terminated", sandbox=victim)
        detect.append((time.perf_counter() - t0) * 1000)
        await next_event(redis, last, "recovery.succeeded", old=victim)
        replace.append((time.perf_counter() - t0) * 1000)
    return detect, replace


async def unhealthy(redis: Redis, rounds: int) -> list[float]:
    """Remove the file the probe checks: ms until `sandbox.health_changed` to unhealthy."""
    out = []
    store = SandboxStore(redis, KEYS)
    for _ in range(rounds):
        await wait_ready(redis, "probed", 2, timeout=600, interval=0.002)
        ids = await redis.lrange(KEYS.pool_ready("probed"), 0, -1)
        records = [await store.get(i) for i in ids]
        victim = next((r for r in records if r and r.health == "healthy"), None)
        if victim is None:
            await asyncio.sleep(0.1)  # not probed yet; bench pacing, not synchronisation
            continue
        last = (await redis.xrevrange(KEYS.events, count=1))[0][0]
        t0 = time.perf_counter()
        await AgentClient(victim.handle["socket"]).exec(["rm", "ok"])
        await next_event(redis, last, "sandbox.health_changed", sandbox=victim.id, to="unhealthy")
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def real_recovery(args, root: Path) -> None:
    templates = json.dumps({"probed": {"setup": 'touch "$HOME/ok"'}})
    settings = {
        "reconcile_interval_s": str(args.interval),
        "local__templates": templates,
        "max_concurrent_creates": "4",
    }
    health = {"command": 'test -f "$HOME/ok"', "interval_s": args.interval, "failure_threshold": 3}
    async with running_daemon(root, **settings) as url:
        redis = Redis.from_url(url, decode_responses=True)
        try:
            pools = [
                {"name": "deaths", "min_ready": 4, "health": {"interval_s": 3600}},
                {"name": "probed", "template": "probed", "min_ready": 2, "health": health},
            ]
            await SpecStore(redis, KEYS).apply(Spec.model_validate({"pools": pools}))
            detect, replace = await deaths(redis, args.rounds)
            sick = await unhealthy(redis, args.rounds)
        finally:
            await redis.aclose()
    cold, isolation = await cold_creates(args.rounds, root / "cold")
    interval_ms = args.interval * 1000
    print(f"isolation: {isolation}; reconcile tick and probe interval {args.interval} s")
    print(line("baseline: cold create", cold))
    print(line("death -> detected (pidfd, else the tick)", detect))
    print(line("death -> replacement ready", replace))
    print(line("probe fails -> unhealthy (threshold 3)", sick))
    print(
        f"  detection / tick: {statistics.median(detect) / interval_ms:.2f} median; "
        f"unhealthy / (3 x interval): {statistics.median(sick) / (3 * interval_ms):.2f} median; "
        f"replacement / cold create: {statistics.median(replace) / statistics.median(cold):.1f}x"
    )


async def loop_lag(stop: asyncio.Event, out: list[float]) -> None:
    """How late a 10 ms timer fires: anything that blocks the event loop shows up here."""
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(0.01)
        out.append((time.perf_counter() - t0) * 1000 - 10)


async def probing(redis_url: str, count: int, interval_s: float, seconds: float) -> tuple:
    """500 sandboxes of a fast fake (probes add 5 ms via the fault wrapper); the reconcile
    pass durations and event-loop lag over `seconds`."""
    provider = inject(FastFakeProvider(), Faults(probe_latency_s=0.005))
    config = Config(
        redis_url=redis_url,
        reconcile_interval_s=0.2,
        max_concurrent_creates=100,
        health_concurrency=32,
        local={"workspace_root": "/nonexistent"},
    )
    redis = Redis.from_url(redis_url, decode_responses=True)
    await redis.flushall()
    daemon = Daemon(config, providers={"local": provider})
    task = asyncio.create_task(daemon.run(handle_signals=False))
    try:
        pools = [
            {
                "name": "many",
                "min_ready": count,
                "max_total": count,
                "max_surge": 100,
                "health": {"interval_s": interval_s},
            }
        ]
        await SpecStore(redis, KEYS).apply(Spec.model_validate({"pools": pools}))
        await wait_ready(redis, "many", count, timeout=600, interval=0.002)
        probes_before = daemon.wings.monitor.probes
        daemon.wings.reconciler.pass_seconds.clear()
        stop, lag = asyncio.Event(), []
        lagger = asyncio.create_task(loop_lag(stop, lag))
        await asyncio.sleep(seconds)  # the measurement window
        stop.set()
        await lagger
        passes = [s * 1000 for s in daemon.wings.reconciler.pass_seconds]
        return passes, lag, (daemon.wings.monitor.probes - probes_before) / seconds
    finally:
        daemon.stop.set()
        await task
        await redis.aclose()


async def probe_cost(args, root: Path) -> None:
    port = free_port()
    proc = start(find_redis_server(), port, root / "redis-probe", daemonize=False)
    wait_until_answering("127.0.0.1", port)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        quiet = await probing(url, args.probed, 86400, args.seconds)
        busy = await probing(url, args.probed, 1.0, args.seconds)
    finally:
        proc.terminate()
        proc.wait(10)
    for name, (passes, lag, rate) in (("no probing", quiet), ("probing every 1 s", busy)):
        print(f"{args.probed} sandboxes, {name}: {rate:.0f} probes/s")
        print(line("  reconcile pass duration", passes))
        print(line("  event-loop lag (10 ms timer)", lag))
    ratio = statistics.median(busy[0]) / statistics.median(quiet[0])
    print(f"  pass duration with/without probing: {ratio:.2f}x median")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--probed", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sandboxd-bench-"))
    try:
        await real_recovery(args, root)
        await probe_cost(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
