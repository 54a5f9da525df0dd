"""Local provider cold-create latency, and time from `apply` to N ready sandboxes.

    .venv/bin/python bench/create.py [--creates 50] [--ready 20]

Baseline, measured in the same run: spawning the same interpreter bare (`python -c pass`),
the floor for any sandbox whose agent is a Python process.
"""

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from redis.asyncio import Redis
from tests.support import wait_ready

from bench.common import cold_creates, line, running_daemon
from sandboxd.spec import PoolSpec, Spec
from sandboxd.store.keys import Keys
from sandboxd.store.specs import SpecStore


async def bare_spawn(n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(sys.executable, "-I", "-S", "-c", "pass")
        await proc.wait()
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def apply_to_ready(count: int, root: Path) -> float:
    async with running_daemon(root, max_concurrent_creates="10") as url:
        redis = Redis.from_url(url, decode_responses=True)
        try:
            t0 = time.perf_counter()
            await SpecStore(redis, Keys()).apply(
                Spec(pools=[PoolSpec(name="bench", min_ready=count, max_total=count)])
            )
            await wait_ready(redis, "bench", count, timeout=600, interval=0.002)
            return (time.perf_counter() - t0) * 1000
        finally:
            await redis.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--creates", type=int, default=50)
    parser.add_argument("--ready", type=int, default=20)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sandboxd-bench-"))
    try:
        baseline = await bare_spawn(args.creates)
        creates, isolation = await cold_creates(args.creates, root / "cold")
        # The same, with the user namespace, seccomp filter and cgroup limits switched off
        # (bubblewrap as root, as before they existed): what the protections cost.
        bare, bare_isolation = await cold_creates(
            args.creates,
            root / "unprotected",
            allow_weaker_isolation=True,
            disable=["userns", "seccomp", "cgroups"],
        )
        to_ready = await apply_to_ready(args.ready, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"local provider, isolation: {isolation}; {os.cpu_count()} CPUs")
    print(line("baseline: bare interpreter spawn", baseline))
    print(line(f"cold create, {bare_isolation} (no limits)", bare))
    print(line(f"cold create, {isolation}", creates))
    ratio = statistics.median(creates) / statistics.median(baseline)
    print(f"ratio cold create / bare spawn      median {ratio:.1f}x")
    cost = statistics.median(creates) / statistics.median(bare)
    print(f"ratio protected / unprotected create median {cost:.2f}x")
    print(
        f"apply -> {args.ready} ready sandboxes          {to_ready:8.1f} ms "
        f"(max_concurrent_creates = 10)"
    )


if __name__ == "__main__":
    asyncio.run(main())
