"""What the benchmarks share: percentiles, a report line, cold creates, a running daemon."""

import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from redis.asyncio import Redis
from tests.support import free_port

from sandboxd.config import LocalProviderConfig
from sandboxd.providers.local.provider import LocalProvider
from sandboxd.spec import PoolSpec
from sandboxd.store.keys import Keys
from sandboxd.store.localredis import find_redis_server, start, wait_until_answering


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def line(name: str, samples: list[float], unit: str = "ms") -> str:
    return (
        f"{name:<40} median {statistics.median(samples):8.3f} {unit}   "
        f"p99 {pct(samples, 0.99):8.3f} {unit}   (n={len(samples)})"
    )


async def cold_creates(n: int, root: Path, **config) -> tuple[list[float], str]:
    """Milliseconds from create() to a sandbox ready to exec, one at a time."""
    provider = LocalProvider(LocalProviderConfig(workspace_root=root, **config))
    pool = PoolSpec(name="bench")
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        handle = await provider.create(f"sb-bench-{i}", pool)
        out.append((time.perf_counter() - t0) * 1000)
        await provider.terminate(f"sb-bench-{i}", handle)
    return out, provider.isolation


@contextlib.asynccontextmanager
async def running_daemon(root: Path, *, fake: bool = False, **settings: str) -> AsyncIterator[str]:
    """A private redis-server and the real daemon (env SANDBOXD_<NAME>=value); yields the URL
    once the daemon's heartbeat is there. `fake`: with the fast fake provider standing in
    for the local one (bench/fastfake.py), so the daemon's sandboxes cost nothing."""
    port = free_port()
    redis_proc = start(find_redis_server(), port, root / "redis", daemonize=False)
    wait_until_answering("127.0.0.1", port)
    url = f"redis://127.0.0.1:{port}/0"
    env = {
        **os.environ,
        "SANDBOXD_REDIS_URL": url,
        "SANDBOXD_LOCAL__WORKSPACE_ROOT": str(root / "boxes"),
        "SANDBOXD_LOG_LEVEL": "WARNING",
        **{f"SANDBOXD_{k.upper()}": v for k, v in settings.items()},
    }
    command = ["-m", "bench.scale", "--serve", url, "--root", str(root)] if fake else []
    daemon = subprocess.Popen(
        [sys.executable, *(command or ["-m", "sandboxd", "run"])],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    redis = Redis.from_url(url, decode_responses=True)
    try:
        while not await redis.exists(Keys().daemon):
            await asyncio.sleep(0.01)
        yield url
    finally:
        await redis.aclose()
        daemon.terminate()
        daemon.wait(30)
        redis_proc.terminate()
        redis_proc.wait(10)
