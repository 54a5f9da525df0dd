"""Many pools: what per-pool bookkeeping costs an idle daemon, and what `status` costs.

    .venv/bin/python bench/many_pools.py [--pools 20000] [--seconds 30] [--runs 7]

A spec of N pools with `min_ready: 0` (nothing is created: the cost measured is the per-pool
bookkeeping alone) is applied to the real daemon with a private redis-server. Once it is in
force, the daemon's CPU % (psutil, per second) and RSS, the heartbeat's size and the Redis
writes per second are sampled for `--seconds`, then `sandboxd status` is timed (the CLI as a
subprocess, and StateView.status() in process). Baselines, in the same run: the same figures
at `--baseline-pools` pools, and a bare Redis PING round trip.
"""

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from redis.asyncio import Redis

from bench.common import line, running_daemon
from sandboxd.cli.views import StateView
from sandboxd.spec import Spec
from sandboxd.store.keys import Keys
from sandboxd.store.specs import SpecStore

KEYS = Keys()
WRITES = ("set", "hset", "hdel", "del", "hincrbyfloat", "hsetnx", "sadd", "sinterstore")


async def apply_pools(redis: Redis, n: int) -> int:
    pools = [{"name": f"p{i}", "min_ready": 0, "max_total": 1} for i in range(n)]
    applied = await SpecStore(redis, KEYS).apply(Spec.model_validate({"pools": pools}))
    return applied.document.revision


async def wait_in_force(redis: Redis, revision: int, n: int) -> float:
    """Seconds until the daemon has the revision in force and the pools claimable."""
    t0 = time.perf_counter()
    view = StateView(redis, KEYS)
    while True:
        daemon = await view.daemon() or {}
        if daemon.get("revision") == revision and await redis.hlen(KEYS.pools) == n:
            return time.perf_counter() - t0
        await asyncio.sleep(0.1)


async def redis_counters(redis: Redis) -> tuple[int, int]:
    """(write commands so far, bytes received from clients so far)."""
    stats = await redis.info("commandstats")
    writes = sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in WRITES)
    return writes, int((await redis.info("stats"))["total_net_input_bytes"])


async def idle(redis: Redis, pid: int, seconds: float) -> dict[str, list[float]]:
    """Per second: the daemon's CPU %, RSS (MB), heartbeat bytes; over the window: mean
    CPU %, Redis write commands and bytes received per second."""
    proc = psutil.Process(pid)
    proc.cpu_percent(None)
    cpu, rss, beat = [], [], []
    (writes0, bytes0), t0, cpu0 = await redis_counters(redis), time.monotonic(), proc.cpu_times()
    for _ in range(int(seconds)):
        await asyncio.sleep(1.0)
        cpu.append(proc.cpu_percent(None))
        rss.append(proc.memory_info().rss / 1e6)
        beat.append(float(await redis.strlen(KEYS.daemon)))
    elapsed, cpu1 = time.monotonic() - t0, proc.cpu_times()
    writes1, bytes1 = await redis_counters(redis)
    used = cpu1.user + cpu1.system - cpu0.user - cpu0.system
    return {
        "cpu": cpu,
        "cpu_mean": [used / elapsed * 100],
        "rss": rss,
        "beat": beat,
        "writes": [(writes1 - writes0) / elapsed],
        "in_bytes": [(bytes1 - bytes0) / elapsed],
    }


def cli_status(url: str, runs: int) -> list[float]:
    env = {**os.environ, "SANDBOXD_REDIS_URL": url}
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "sandboxd", "status"],
            env=env,
            stdout=subprocess.DEVNULL,
            check=True,
        )
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def view_status(redis: Redis, runs: int) -> list[float]:
    view, out = StateView(redis, KEYS), []
    for _ in range(runs):
        t0 = time.perf_counter()
        status = await view.status()
        out.append((time.perf_counter() - t0) * 1000)
    assert status["daemon"]["alive"]
    return out


async def ping(redis: Redis, n: int = 500) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await redis.ping()
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def measure(n: int, args: argparse.Namespace) -> dict[str, list[float]]:
    root = Path(tempfile.mkdtemp(prefix="sbd-many-"))
    try:
        intervals = ("reconcile_interval_s", "heartbeat_interval_s", "sample_interval_s")
        settings = {name: str(args.interval) for name in intervals if args.interval}
        async with running_daemon(root, **settings) as url:
            redis = Redis.from_url(url, decode_responses=True)
            try:
                revision = await apply_pools(redis, n)
                applied_s = await wait_in_force(redis, revision, n)
                pid = (await StateView(redis, KEYS).daemon() or {})["pid"]
                await asyncio.sleep(args.settle)
                figures = await idle(redis, pid, args.seconds)
                figures["applied"] = [applied_s * 1000]
                figures["cli"] = cli_status(url, args.runs)
                figures["view"] = await view_status(redis, args.runs * 3)
                figures["ping"] = await ping(redis)
            finally:
                await redis.aclose()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return figures


def report(n: int, f: dict[str, list[float]]) -> None:
    print(f"-- {n} pools (in force {f['applied'][0] / 1000:.1f} s after apply)")
    print(line("daemon idle CPU (per second)", f["cpu"], "%"))
    print(f"{'daemon idle CPU (whole window)':<40} mean {f['cpu_mean'][0]:8.3f} %")
    print(line("daemon RSS", f["rss"], "MB"))
    print(line("heartbeat value", f["beat"], "B"))
    print(f"{'Redis write commands':<40} {f['writes'][0]:8.1f} /s")
    print(f"{'Redis bytes received':<40} {f['in_bytes'][0] / 1e3:8.1f} kB/s")
    print(line("`sandboxd status` (CLI process)", f["cli"]))
    print(line("StateView.status() in process", f["view"]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pools", type=int, default=20_000)
    parser.add_argument("--baseline-pools", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--settle", type=float, default=3, help="seconds before sampling")
    parser.add_argument("--runs", type=int, default=7, help="CLI `status` runs")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="tick/heartbeat/sample s (0: defaults)"
    )
    args = parser.parse_args()
    print(
        f"{psutil.cpu_count()} CPUs; reconcile, heartbeat and sample interval "
        f"{args.interval or 'the defaults (5, 2, 5)'} s; "
        f"{args.seconds:.0f} s idle window"
    )
    base = asyncio.run(measure(args.baseline_pools, args))
    many = asyncio.run(measure(args.pools, args))
    print(line("baseline: Redis PING round trip", base["ping"]))
    report(args.baseline_pools, base)
    report(args.pools, many)
    print(f"-- ratio {args.pools} pools / {args.baseline_pools} pools (medians)")
    for key, what in (
        ("cpu_mean", "idle CPU (window mean)"),
        ("beat", "heartbeat"),
        ("in_bytes", "Redis bytes received"),
        ("cli", "CLI status"),
        ("view", "StateView.status()"),
    ):
        ratio = statistics.median(many[key]) / max(statistics.median(base[key]), 1e-9)
        print(f"{what:<40} {ratio:8.1f}x")
    ratio = statistics.median(many["view"]) / statistics.median(base["ping"])
    print(f"{'StateView.status() / PING':<40} {ratio:8.0f}x")


if __name__ == "__main__":
    main()
