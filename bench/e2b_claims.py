"""E2B pools against the fake E2B (tests/e2b_fake) on loopback: what a client waits for.

    python bench/e2b_claims.py [rounds]

- baseline: a cold `AsyncSandbox.create` plus the first command, as a client without
  sandboxd does it;
- a claim from a warm (`idle: run`) pool plus the first command;
- a claim from a paused (`idle: pause`) pool plus the first command: the resume on connect
  is the price of not paying for idle sandboxes.

The fake answers in microseconds where E2B takes ~100 ms to seconds, so the absolute numbers
are the daemon's and the SDK's own overhead; against E2B, add its create and resume times.
"""

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from e2b import AsyncSandbox
from redis.asyncio import Redis
from tests.e2b_fake import FakeE2B
from tests.support import wait_ready

from bench.common import line, running_daemon
from sandboxd.client import Client
from sandboxd.spec import Spec
from sandboxd.store.keys import Keys
from sandboxd.store.specs import SpecStore

KEY = "e2b_bench_key_0000000000000000000000000000"


async def cold(fake: FakeE2B, rounds: int) -> list[float]:
    opts = {"api_key": KEY, "api_url": fake.url, "sandbox_url": fake.url}
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        sandbox = await AsyncSandbox.create(template="base", **opts)
        await sandbox.commands.run("true")
        out.append((time.perf_counter() - t0) * 1000)
        await sandbox.kill()
    return out


async def claimed(
    url: str, pool: str, rounds: int, e2b_url: str
) -> tuple[list[float], list[float]]:
    redis = Redis.from_url(url, decode_responses=True)
    total, connect = [], []
    endpoints = {"e2b": {"api_url": e2b_url, "sandbox_url": e2b_url}}
    async with Client(redis, endpoints=endpoints) as client:  # no E2B key: the claim's token
        for _ in range(rounds):
            await wait_ready(redis, pool, 3, timeout=600, interval=0.002)
            t0 = time.perf_counter()
            async with client.claim(pool, lease_s=60) as sandbox:
                await sandbox.exec("true")
                total.append((time.perf_counter() - t0) * 1000)
                connect.append(sandbox._conn().connect_ms or 0.0)
    await redis.aclose()
    return total, connect


async def main(rounds: int) -> None:
    os.environ["E2B_API_KEY"] = KEY  # the daemon's (and the baseline's); claimants use none
    with FakeE2B(api_key=KEY) as fake, tempfile.TemporaryDirectory() as tmp:
        baseline = await cold(fake, rounds)
        settings = {
            "e2b__api_url": fake.url,
            "e2b__sandbox_url": fake.url,
            "e2b__creates_per_s": "50",
            "e2b__creates_burst": "10",
            "reconcile_interval_s": "0.2",
        }
        async with running_daemon(Path(tmp), **settings) as url:
            redis = Redis.from_url(url, decode_responses=True)
            pools = [
                {"name": "warm", "provider": "e2b", "min_ready": 3, "max_total": 10},
                {
                    "name": "paused",
                    "provider": "e2b",
                    "min_ready": 3,
                    "max_total": 10,
                    "e2b": {"idle": "pause"},
                },
            ]
            await SpecStore(redis, Keys()).apply(Spec.model_validate({"pools": pools}))
            await redis.aclose()
            warm, _ = await claimed(url, "warm", rounds, fake.url)
            paused, resume = await claimed(url, "paused", rounds, fake.url)
    print(line("cold create + first command (baseline)", baseline))
    print(line("claim warm + first command", warm))
    print(line("claim paused + resume + first command", paused))
    print(line("  of which connect (resume)", resume))
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(f"warm claim vs cold create: {median(baseline) / median(warm):.1f}x faster")
    print(f"paused vs warm claim: {median(paused) / median(warm):.2f}x the time")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 30))
