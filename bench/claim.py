"""Warm-claim latency and throughput against the real daemon, with their baselines.

    .venv/bin/python bench/claim.py [--pool 200] [--rounds 10] [--clients 16] [--procs CPUs]

In one run, against one private redis-server and the real daemon with a `reuse: reset`
pool of real local sandboxes (so rounds can repeat without cold creates):
- PING round trip: the physical floor of anything done over Redis;
- warm claim, one client, sandboxes claimed one after the other;
- warm claim with 16 concurrent clients (own connections) draining the pool, and the
  throughput that gives, with the clients in this process and then spread over one client
  process per CPU (as agents on a host are separate programs);
- time from a claim to the daemon starting the replacement create (`reuse: never` pool);
- cold create of the same provider, one at a time.
"""

import argparse
import asyncio
import gc
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from redis.asyncio import Redis
from tests.support import wait_ready

from bench.common import cold_creates, line, running_daemon
from sandboxd.client import ClaimTimeout, Client, Sandbox
from sandboxd.spec import PoolSpec, Spec
from sandboxd.store.events import Event
from sandboxd.store.keys import Keys
from sandboxd.store.specs import SpecStore

KEYS = Keys()


async def pings(redis: Redis, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await redis.ping()
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def timed_claim(client: Client, pool: str, samples: list[float]) -> Sandbox | None:
    t0 = time.perf_counter()
    try:
        sandbox = await client.claim(pool, timeout_s=0)
    except ClaimTimeout:
        return None
    samples.append((time.perf_counter() - t0) * 1000)
    return sandbox


async def release_all(sandboxes: list[Sandbox], redis: Redis, pool: str, size: int) -> None:
    await asyncio.gather(*(s.release() for s in sandboxes))
    await wait_ready(
        redis, pool, size, timeout=600, interval=0.002
    )  # reset by the daemon, ready again


async def single_client(url: str, redis: Redis, size: int, rounds: int) -> list[float]:
    samples: list[float] = []
    async with Client.from_url(url) as client:
        for _ in range(rounds):
            held = [await timed_claim(client, "warm", samples) for _ in range(size)]
            await release_all([s for s in held if s], redis, "warm", size)
    return samples


async def drain(client: Client, samples: list[float], held: list[Sandbox]) -> float:
    """Claim until the pool is empty; returns when the last claim succeeded."""
    last = time.perf_counter()
    while (sandbox := await timed_claim(client, "warm", samples)) is not None:
        held.append(sandbox)
        last = time.perf_counter()
    return last


async def concurrent_clients(
    url: str, redis: Redis, size: int, rounds: int, clients: int
) -> tuple[list[float], list[float]]:
    """All clients in this process (one interpreter, one core at most)."""
    samples: list[float] = []
    rates: list[float] = []
    pool = [Client.from_url(url) for _ in range(clients)]
    try:
        for c in pool:
            await c._redis.ping()  # connections open before the clock starts
        for _ in range(rounds):
            held: list[Sandbox] = []
            t0 = time.perf_counter()
            ends = await asyncio.gather(*(drain(c, samples, held) for c in pool))
            rates.append(len(held) / (max(ends) - t0))
            await release_all(held, redis, "warm", size)
    finally:
        for c in pool:
            await c.aclose()
    return samples, rates


def _client_process(url: str, clients: int, connected, go, results, freeze_gc: bool) -> None:
    """One client program: connect, wait for the start, drain with `clients` clients.
    `freeze_gc`: what a long-running client program may do once started (the daemon does):
    `gc.freeze()`, so that a full collection does not walk every object of its imports."""

    async def run() -> None:
        pool = [Client.from_url(url) for _ in range(clients)]
        for c in pool:
            await c._redis.ping()
        if freeze_gc:
            gc.collect()
            gc.freeze()
        connected.release()
        await asyncio.to_thread(go.wait)
        samples: list[float] = []
        held: list[Sandbox] = []
        ends = await asyncio.gather(*(drain(c, samples, held) for c in pool))
        # perf_counter is CLOCK_MONOTONIC on Linux: comparable across processes
        results.put((max(ends), [(s.id, s.claim_token) for s in held], samples))
        for c in pool:
            await c.aclose()

    asyncio.run(run())


async def clients_in_processes(
    url: str, redis: Redis, size: int, rounds: int, clients: int, procs: int, freeze_gc: bool
) -> tuple[list[float], list[float]]:
    """The same clients spread over `procs` client programs, as agents on one host are."""
    ctx = multiprocessing.get_context("spawn")
    rates: list[float] = []
    samples: list[float] = []
    releaser = Client(redis)
    for _ in range(rounds):
        connected, go, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
        shares = [clients // procs + (i < clients % procs) for i in range(procs)]
        workers = [
            ctx.Process(target=_client_process, args=(url, n, connected, go, results, freeze_gc))
            for n in shares
        ]
        for w in workers:
            w.start()
        for _ in workers:
            await asyncio.to_thread(connected.acquire)
        t0 = time.perf_counter()
        go.set()
        done = [await asyncio.to_thread(results.get) for _ in workers]
        for w in workers:
            w.join()
        held = [pair for _, pairs, _ in done for pair in pairs]
        samples += [ms for _, _, latencies in done for ms in latencies]
        rates.append(len(held) / (max(end for end, _, _ in done) - t0))
        for sandbox_id, token in held:
            await releaser.release(sandbox_id, token)
        await wait_ready(redis, "warm", size, timeout=600, interval=0.002)
    return rates, samples


async def replenish_delays(url: str, redis: Redis, n: int) -> list[float]:
    """Claim from a `reuse: never` pool; time until its replacement's `sandbox.creating`."""
    out = []
    async with Client.from_url(url) as client:
        for _ in range(n):
            await wait_ready(redis, "fresh", 2, timeout=600, interval=0.002)
            last_id = (await redis.xrevrange(KEYS.events, count=1))[0][0]
            t0 = time.perf_counter()
            sandbox = await client.claim("fresh", timeout_s=0)
            while True:
                reply = await redis.xread({KEYS.events: last_id}, block=5000)
                entries = reply[0][1] if reply else []
                types = [Event.from_fields(f).type for _, f in entries]
                if entries:
                    last_id = entries[-1][0]
                if "sandbox.creating" in types:
                    out.append((time.perf_counter() - t0) * 1000)
                    break
            await sandbox.release()
    return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--pool", type=int, default=None, help="warm sandboxes (200, ~13 MB each; 2000 fake)"
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--creates", type=int, default=30)
    parser.add_argument(
        "--procs", type=int, default=os.cpu_count(), help="client processes for the spread run"
    )
    parser.add_argument(
        "--fake",
        action="store_true",
        help="the fast fake provider instead of real local sandboxes (claims alone: no "
        "sandbox resets between rounds, no probes of real sandboxes beside them)",
    )
    parser.add_argument(
        "--freeze-gc",
        action="store_true",
        help="the client processes call gc.freeze() once connected (see docs/claims.md)",
    )
    args = parser.parse_args()
    if args.pool is None:
        args.pool = 2000 if args.fake else 200
    root = Path(tempfile.mkdtemp(prefix="sandboxd-bench-"))
    try:
        async with running_daemon(root, fake=args.fake, max_concurrent_creates="10") as url:
            redis = Redis.from_url(url, decode_responses=True)
            spec = Spec(
                pools=[
                    PoolSpec(name="warm", min_ready=args.pool, max_total=args.pool, reuse="reset"),
                    PoolSpec(name="fresh", min_ready=2, max_total=4),
                ]
            )
            await SpecStore(redis, KEYS).apply(spec)
            await wait_ready(redis, "warm", args.pool, timeout=600, interval=0.002)
            ping = await pings(redis, 2000)
            single = await single_client(url, redis, args.pool, args.rounds)
            many, rates = await concurrent_clients(url, redis, args.pool, args.rounds, args.clients)
            spread, spread_samples = await clients_in_processes(
                url, redis, args.pool, args.rounds, args.clients, args.procs, args.freeze_gc
            )
            replenish = await replenish_delays(url, redis, 20)
            await redis.aclose()
        cold, isolation = await cold_creates(args.creates, root / "cold")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.fake:
        isolation += " (the claims' daemon: fast fake provider)"
    rates_by_procs = {1: rates, args.procs: spread}
    report(args, isolation, ping, single, many, spread_samples, rates_by_procs, replenish, cold)


def report(args, isolation, ping, single, many, spread, rates, replenish, cold) -> None:
    print(f"local provider, isolation: {isolation}; {os.cpu_count()} CPUs; pool {args.pool}")
    print(line("baseline: Redis PING round trip", ping))
    print(line("warm claim, 1 client", single))
    print(line(f"warm claim, {args.clients} concurrent clients", many))
    frozen = " (their gc frozen)" if args.freeze_gc else ""
    print(line(f"  the same over {args.procs} processes{frozen}", spread))
    for procs, per_round in rates.items():
        name = f"claims/s, {args.clients} clients in {procs} process{'es' * (procs > 1)}"
        print(
            f"{name:<40} median {statistics.median(per_round):8.0f}          "
            f"min {min(per_round):8.0f}"
        )
    print(line("claim -> replacement create started", replenish))
    print(line("cold create (same provider)", cold))
    claim = statistics.median(single)
    print(f"ratio warm claim / PING                  median {claim / statistics.median(ping):.1f}x")
    print(f"ratio cold create / warm claim           median {statistics.median(cold) / claim:.0f}x")


if __name__ == "__main__":
    asyncio.run(main())
