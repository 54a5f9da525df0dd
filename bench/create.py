"""Local provider cold-create latency, and time from `apply` to N ready sandboxes.

    .venv/bin/python bench/create.py [--creates 50] [--ready 20]

Baseline, measured in the same run: spawning the same interpreter bare (`python -c pass`),
the floor for any sandbox whose agent is a Python process.
"""

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from redis.asyncio import Redis

from sandboxd.config import LocalProviderConfig
from sandboxd.keys import Keys
from sandboxd.localredis import find_redis_server, start, wait_until_answering
from sandboxd.providers.local import LocalProvider
from sandboxd.spec import PoolSpec, Spec
from sandboxd.specstore import SpecStore


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def line(name: str, samples: list[float]) -> str:
    return (
        f"{name:<32} median {statistics.median(samples):8.2f} ms   "
        f"p99 {pct(samples, 0.99):8.2f} ms   (n={len(samples)})"
    )


async def bare_spawn(n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(sys.executable, "-I", "-S", "-c", "pass")
        await proc.wait()
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def cold_creates(n: int, root: Path) -> tuple[list[float], str]:
    provider = LocalProvider(LocalProviderConfig(workspace_root=root))
    pool = PoolSpec(name="bench")
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        handle = await provider.create(f"sb-bench-{i}", pool)
        out.append((time.perf_counter() - t0) * 1000)
        await provider.terminate(f"sb-bench-{i}", handle)
    return out, provider.isolation


async def apply_to_ready(count: int, root: Path) -> float:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    redis_proc = start(find_redis_server(), port, root / "redis", daemonize=False)
    wait_until_answering("127.0.0.1", port)
    url = f"redis://127.0.0.1:{port}/0"
    env = {
        **os.environ,
        "SANDBOXD_REDIS_URL": url,
        "SANDBOXD_LOCAL__WORKSPACE_ROOT": str(root / "boxes"),
        "SANDBOXD_MAX_CONCURRENT_CREATES": "10",
        "SANDBOXD_LOG_LEVEL": "WARNING",
    }
    daemon = subprocess.Popen(
        [sys.executable, "-m", "sandboxd", "run"], env=env, stdout=subprocess.DEVNULL
    )
    redis = Redis.from_url(url, decode_responses=True)
    try:
        while not await redis.exists(Keys().daemon):
            await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        await SpecStore(redis, Keys()).apply(
            Spec(pools=[PoolSpec(name="bench", min_ready=count, max_total=count)])
        )
        while await redis.llen(Keys().pool_ready("bench")) < count:
            await asyncio.sleep(0.002)
        return (time.perf_counter() - t0) * 1000
    finally:
        await redis.aclose()
        daemon.terminate()
        daemon.wait(15)
        redis_proc.terminate()
        redis_proc.wait(10)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--creates", type=int, default=50)
    parser.add_argument("--ready", type=int, default=20)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sandboxd-bench-"))
    try:
        baseline = await bare_spawn(args.creates)
        creates, isolation = await cold_creates(args.creates, root / "cold")
        to_ready = await apply_to_ready(args.ready, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"local provider, isolation: {isolation}; {os.cpu_count()} CPUs")
    print(line("baseline: bare interpreter spawn", baseline))
    print(line("cold create (ready to exec)", creates))
    ratio = statistics.median(creates) / statistics.median(baseline)
    print(f"ratio cold create / bare spawn      median {ratio:.1f}x")
    print(
        f"apply -> {args.ready} ready sandboxes          {to_ready:8.1f} ms "
        f"(max_concurrent_creates = 10)"
    )


if __name__ == "__main__":
    asyncio.run(main())
