"""Many sandboxes on one daemon: what a pass, an idle daemon, a claim and a replacement cost.

    .venv/bin/python -m bench.scale --sandboxes 10000 [--pools 10] [--rate 200] [--seconds 20]

The real daemon in its own process, with the fast fake provider (bench/fastfake.py: a
sandbox is a dict entry, so what is measured is the daemon's own work), the default
config, and a private redis-server. N sandboxes over `--pools` pools (`min_ready` N/pools,
room for the claimed ones above it). Prints:
- fill: time from the spec applied to N ready, and creates/s (or how far it got within
  `--fill-timeout`);
- reconcile pass duration p50/p99 at idle and while clients claim;
- the daemon's CPU (user + system, share of one core) at idle, and its RSS; idle is
  measured `--settle` seconds after the fill (70: past every sandbox's first full probe,
  which falls within two 30 s health intervals of its adoption, each an `unknown ->
  healthy` write and event; the CPU of that window is printed too);
- claim latency p50/p99 while clients claim at a fixed offered rate (`--rate`, each claim
  released `--hold` seconds later), and claim -> replacement started (`sandbox.creating`
  of that pool, matched to the claims in order) p50/p99;
- Redis bytes per record (MEMORY USAGE of the sandbox hashes) and per event.
Baseline, measured in the same run: a Redis PING round trip (the floor of a claim).
"""

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from redis.asyncio import Redis
from tests.support import free_port

from bench.common import pct
from sandboxd.client import ClaimTimeout, Client, Sandbox
from sandboxd.spec import PoolSpec, Spec
from sandboxd.store.eventtail import parse_entry
from sandboxd.store.keys import Keys
from sandboxd.store.localredis import find_redis_server, start, wait_until_answering
from sandboxd.store.specs import SpecStore

KEYS = Keys()
STUCK_S = 60.0  # the load phase is given up this long after its last claim's hold
PASSES = "bench:scale:passes"  # the daemon process pushes its pass durations (ms) here
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the daemon process -----------------------------------------------------------------


def serve(url: str, root: str) -> None:
    """The daemon with the fast fake provider; reports its pass durations to Redis."""
    from bench.fastfake import FastFakeProvider
    from sandboxd.config import Config
    from sandboxd.daemon import Daemon

    async def report(daemon: Daemon, redis: Redis) -> None:
        await daemon.started.wait()
        assert daemon.wings is not None
        passes = daemon.wings.reconciler.pass_seconds
        while True:
            await asyncio.sleep(0.5)
            batch = [round(s * 1000, 3) for s in passes]
            passes.clear()
            if batch:
                await redis.rpush(PASSES, *batch)

    async def main() -> int:
        config = Config(
            redis_url=url,
            log_level="WARNING",
            local={"workspace_root": str(Path(root) / "boxes")},
        )
        daemon = Daemon(config, providers={"local": FastFakeProvider()})
        redis = Redis.from_url(url, decode_responses=True)
        reporter = asyncio.create_task(report(daemon, redis))
        try:
            return await daemon.run(handle_signals=True)
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
            await redis.aclose()

    profile = os.environ.get("SCALE_PROFILE")  # a file for the daemon's cProfile stats
    if not profile:
        sys.exit(asyncio.run(main()))
    import cProfile

    profiler = cProfile.Profile()
    code = profiler.runcall(asyncio.run, main())
    profiler.dump_stats(profile)
    sys.exit(code)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_mb(pid: int) -> float:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1]) / 1024
    return 0.0


# --- the measurements -------------------------------------------------------------------


async def ready_count(redis: Redis, pools: list[str]) -> int:
    async with redis.pipeline(transaction=False) as pipe:
        for pool in pools:
            pipe.llen(KEYS.pool_ready(pool))
        return sum(await pipe.execute())


async def fill(redis: Redis, pools: list[str], n: int, timeout: float) -> tuple[float, int]:
    """Seconds until `n` are ready (or the timeout), and how many were."""
    t0 = time.perf_counter()
    ready = 0
    while time.perf_counter() - t0 < timeout:
        ready = await ready_count(redis, pools)
        if ready >= n:
            break
        await asyncio.sleep(0.05)
    return time.perf_counter() - t0, ready


async def take_passes(redis: Redis) -> list[float]:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.lrange(PASSES, 0, -1)
        pipe.delete(PASSES)
        values, _ = await pipe.execute()
    return [float(v) for v in values]


async def idle(redis: Redis, pid: int, seconds: float) -> tuple[list[float], float]:
    """Pass durations and CPU share while nothing happens."""
    await asyncio.sleep(1.0)  # the fill's last nudged passes are over
    await take_passes(redis)
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    await asyncio.sleep(seconds)
    cpu = (cpu_seconds(pid) - cpu0) / (time.perf_counter() - t0)
    return await take_passes(redis), cpu


class Load:
    """Clients claiming at a fixed offered rate over the pools, each claim released after
    `hold` s; the replacement creates seen on the stream are matched to claims in order."""

    def __init__(self, url: str, pools: list[str], rate: float, hold: float, clients: int):
        self.clients = [Client.from_url(url) for _ in range(clients)]
        self.pools = pools
        self.rate = rate
        self.hold = hold
        self.latency: list[float] = []
        self.replacement: list[float] = []
        self.missed = 0  # empty pool (ClaimTimeout)
        self.claimed: dict[str, deque[float]] = {p: deque() for p in pools}
        self.waiting = {"claim": 0, "hold": 0, "release": 0}  # claims in each step now

    async def run(self, seconds: float, redis: Redis) -> None:
        cursor = (await redis.xrevrange(KEYS.events, count=1) or [("0-0", {})])[0][0]
        async with asyncio.TaskGroup() as group:
            tail = group.create_task(self._tail(redis, cursor))
            try:  # a claim or release that never ends is said, not waited for forever
                async with asyncio.timeout(seconds + self.hold + STUCK_S):
                    async with asyncio.TaskGroup() as claims:
                        t0, i = time.perf_counter(), 0
                        while (due := t0 + i / self.rate) < t0 + seconds:
                            await asyncio.sleep(max(0.0, due - time.perf_counter()))
                            client = self.clients[i % len(self.clients)]
                            pool = self.pools[i % len(self.pools)]
                            claims.create_task(self._claim(client, pool))
                            i += 1
            except TimeoutError:
                raise SystemExit(
                    f"the load did not end {STUCK_S:g} s after its last claim: still in "
                    f"{self.waiting} (claims made {len(self.latency)}, empty {self.missed})"
                ) from None
            await asyncio.sleep(1.0)  # the last replacements
            tail.cancel()
        for client in self.clients:
            await client.aclose()

    async def _claim(self, client: Client, pool: str) -> None:
        t0 = time.perf_counter()
        self.waiting["claim"] += 1
        try:
            sandbox: Sandbox = await client.claim(pool, timeout_s=0)
        except ClaimTimeout:
            self.missed += 1
            return
        finally:
            self.waiting["claim"] -= 1
        self.latency.append((time.perf_counter() - t0) * 1000)
        self.claimed[pool].append(t0)
        self.waiting["hold"] += 1
        await asyncio.sleep(self.hold)
        self.waiting["hold"] -= 1
        self.waiting["release"] += 1
        await sandbox.release()
        self.waiting["release"] -= 1

    async def _tail(self, redis: Redis, cursor: str) -> None:
        while True:
            reply = await redis.xread({KEYS.events: cursor}, count=1000, block=1000)
            now = time.perf_counter()
            for _, entries in reply:
                for entry_id, fields in entries:
                    cursor = entry_id
                    event = parse_entry(entry_id, fields)
                    if event is None or event.type != "sandbox.creating":
                        continue
                    waiting = self.claimed.get(event.pool or "")
                    if waiting:
                        self.replacement.append((now - waiting.popleft()) * 1000)


async def footprint(redis: Redis) -> tuple[float, float, float]:
    """Average bytes per sandbox record (MEMORY USAGE of a sample of 200 hashes; and
    Redis's used memory, stream excluded, over the records) and per event of the stream."""
    ids = list(await redis.srandmember(KEYS.sandboxes, 200))
    sizes = [await redis.memory_usage(KEYS.sandbox(i)) or 0 for i in ids]
    length = await redis.xlen(KEYS.events)
    stream = await redis.memory_usage(KEYS.events, samples=0) or 0
    records = await redis.scard(KEYS.sandboxes)
    used = (await redis.info("memory"))["used_memory"] - stream
    return (
        statistics.mean(sizes) if sizes else 0.0,
        used / records if records else 0.0,
        stream / length if length else 0.0,
    )


async def pings(redis: Redis, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await redis.ping()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def fmt(samples: list[float]) -> str:
    if not samples:
        return "        -          -"
    return f"{statistics.median(samples):9.2f} {pct(samples, 0.99):10.2f}"


async def run(args: argparse.Namespace, root: Path) -> None:
    port = free_port()
    redis_proc = start(find_redis_server(), port, root / "redis", daemonize=False)
    wait_until_answering("127.0.0.1", port)
    url = f"redis://127.0.0.1:{port}/0"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "bench.scale", "--serve", url, "--root", str(root)],
        env={**os.environ, "SANDBOXD_LOG_LEVEL": "WARNING"},
        stdout=subprocess.DEVNULL,
    )
    redis = Redis.from_url(url, decode_responses=True)
    try:
        while not await redis.exists(KEYS.daemon):
            await asyncio.sleep(0.05)
        n, per_pool = args.sandboxes, args.sandboxes // args.pools
        names = [f"p{i}" for i in range(args.pools)]
        room = max(10, int(args.rate * (args.hold + 1) / args.pools) * 2)
        spec = Spec(
            pools=[PoolSpec(name=p, min_ready=per_pool, max_total=per_pool + room) for p in names]
        )
        await SpecStore(redis, KEYS).apply(spec)
        fill_s, filled = await fill(redis, names, per_pool * args.pools, args.fill_timeout)
        # Every sandbox's first probe (unknown -> healthy, a write and an event each) falls
        # in its first health interval: idle is measured after that, when nothing happens.
        settle_t0 = time.perf_counter()
        settle_cpu0 = cpu_seconds(daemon.pid)
        await asyncio.sleep(args.settle)
        settle_cpu = (cpu_seconds(daemon.pid) - settle_cpu0) / (time.perf_counter() - settle_t0)
        await take_passes(redis)
        idle_passes, idle_cpu = await idle(redis, daemon.pid, args.seconds)
        rss = rss_mb(daemon.pid)
        ping = await pings(redis, 1000)
        load = Load(url, names, args.rate, args.hold, args.clients)
        cpu0, t0 = cpu_seconds(daemon.pid), time.perf_counter()
        await load.run(args.seconds, redis)
        busy_cpu = (cpu_seconds(daemon.pid) - cpu0) / (time.perf_counter() - t0)
        busy_passes = await take_passes(redis)
        record_bytes, used_bytes, event_bytes = await footprint(redis)
    finally:
        await redis.aclose()
        daemon.terminate()
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
        redis_proc.terminate()
        redis_proc.wait(10)
    load_avg = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"{n} sandboxes over {args.pools} pools, fast fake provider; {os.cpu_count()} CPUs, "
        f"load average {load_avg}"
    )
    done = "" if filled >= per_pool * args.pools else f" (NOT finished: {filled} ready)"
    print(f"fill                     {fill_s:8.1f} s   {filled / fill_s:8.0f} creates/s{done}")
    print(f"{'':<34} {'p50':>9} {'p99':>10}   (ms)")
    print(f"{'pass duration, idle':<34} {fmt(idle_passes)}   (n={len(idle_passes)})")
    print(f"{'pass duration, under claims':<34} {fmt(busy_passes)}   (n={len(busy_passes)})")
    print(f"{'baseline: Redis PING':<34} {fmt(ping)}")
    print(
        f"{'claim':<34} {fmt(load.latency)}   (n={len(load.latency)}, "
        f"{load.missed} found the pool empty; {args.rate:.0f}/s offered)"
    )
    print(
        f"{'claim -> replacement started':<34} {fmt(load.replacement)}   "
        f"(n={len(load.replacement)})"
    )
    print(
        f"daemon CPU at idle        {idle_cpu * 100:6.1f} %   under claims {busy_cpu * 100:5.1f} %"
        f"   RSS {rss:6.0f} MB   (first probes, {args.settle:.0f} s after the fill: "
        f"{settle_cpu * 100:.1f} %)"
    )
    print(
        f"Redis per record          {record_bytes:6.0f} B (hash; {used_bytes:.0f} B of used "
        f"memory)   per event {event_bytes:6.0f} B"
    )
    if load.latency:
        ratio = statistics.median(load.latency) / statistics.median(ping)
        print(f"ratio claim / PING        {ratio:6.1f}x median")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sandboxes", type=int, default=1000)
    parser.add_argument("--pools", type=int, default=10)
    parser.add_argument("--rate", type=float, default=200.0, help="claims/s offered")
    parser.add_argument("--hold", type=float, default=1.0, help="s a claim is held")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0, help="idle and load windows")
    parser.add_argument("--fill-timeout", type=float, default=600.0)
    parser.add_argument(
        "--settle", type=float, default=70.0, help="s after the fill before idle is measured"
    )
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # the daemon process
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.root)
        return
    root = Path(tempfile.mkdtemp(prefix="sandboxd-scale-"))
    try:
        asyncio.run(run(args, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
