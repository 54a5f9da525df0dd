"""`sandboxd api` (E2B's REST API) on loopback: what an unmodified e2b SDK program waits for.

    .venv/bin/python -m bench.e2b_api [--rounds 50]

In one run, against a private redis-server, the real daemon with an e2b pool on the fake
E2B (tests/e2b_fake) and `python -m sandboxd api`, with the async e2b SDK as a program
uses it (E2B_API_URL = sandboxd api, E2B_SANDBOX_URL = the fake's envd, a sandboxd key):
- the floor: a bare HTTP round trip to the API server (a path it does not route: uvicorn
  and Starlette, no Redis), and an authenticated `GET /v2/sandboxes` (the key's check and
  the registry read);
- `Sandbox.create("cloud")` through sandboxd: a warm claim;
- `Sandbox.create("cloud")` + the first `commands.run("true")` (to the sandbox's envd);
- both again on a pool whose claim starts no refill at that moment (`max_total` =
  `min_ready`: the replacement comes after the kill): on 2 CPUs the refill (the daemon's
  pass, its E2B create, the fake's envd starting the new sandbox's processes under
  bubblewrap) competes with the call measured, which a remote E2B would not;
- the cold paths: the SDK's create straight at the fake E2B (+ first command), which costs
  the fake nothing (against E2B, add its cold start), and the local provider's cold create
  of a real sandbox on this host.
"""

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from e2b import AsyncSandbox
from redis.asyncio import Redis
from tests.e2b_fake import FakeE2B
from tests.support import free_port, wait_ready

from bench.common import cold_creates, line, running_daemon
from sandboxd.spec import Spec
from sandboxd.store.apikeys import ApiKeyStore
from sandboxd.store.keys import Keys
from sandboxd.store.specs import SpecStore

E2B_KEY = "e2b_bench_key_0000000000000000000000000000"
KEYS = Keys()
MIN_READY = 5


def spawn_api(redis_url: str, log: Path) -> tuple[subprocess.Popen, str]:
    """`python -m sandboxd api` on a free loopback port, its output in `log`."""
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SANDBOXD_REDIS_URL": redis_url,
        "SANDBOXD_API_LISTEN": f"127.0.0.1:{port}",
        "SANDBOXD_LOG_LEVEL": "WARNING",
    }
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sandboxd", "api"], env=env, stdout=out, stderr=out
        )
    return proc, f"http://127.0.0.1:{port}"


async def until_answering(proc: subprocess.Popen, url: str) -> None:
    async with httpx.AsyncClient() as http:
        for _ in range(400):
            if proc.poll() is not None:
                raise RuntimeError(f"sandboxd api exited with {proc.returncode}")
            try:
                if (await http.get(f"{url}/sandboxes")).status_code == 401:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError("sandboxd api did not answer within 20 s")


async def round_trips(url: str, path: str, n: int, key: str | None = None) -> list[float]:
    headers = {"X-API-KEY": key} if key else {}
    out = []
    async with httpx.AsyncClient(headers=headers) as http:
        await http.get(url + path)  # the connection, kept alive as the SDK's is
        for _ in range(n):
            t0 = time.perf_counter()
            await http.get(url + path)
            out.append((time.perf_counter() - t0) * 1000)
    return out


async def creates(
    redis: Redis, opts: dict, template: str, rounds: int, first_command: bool, pool: str = ""
) -> list[float]:
    out = []
    for _ in range(rounds):
        if pool:  # never time a wait for the refill: a full warm pool is the case measured
            await wait_ready(redis, pool, MIN_READY, timeout=600, interval=0.002)
        t0 = time.perf_counter()
        sandbox = await AsyncSandbox.create(template, **opts)
        if first_command:
            await sandbox.commands.run("true")
        out.append((time.perf_counter() - t0) * 1000)
        await sandbox.kill()
    return out


async def main(rounds: int) -> None:
    os.environ["E2B_API_KEY"] = E2B_KEY  # the daemon's; the program uses sandboxd's key
    with FakeE2B(api_key=E2B_KEY) as fake, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        direct = {"api_key": E2B_KEY, "api_url": fake.url, "sandbox_url": fake.url}
        await creates(None, direct, "base", 3, True)  # warm the SDK's imports and connections
        cold = await creates(None, direct, "base", rounds, False)
        cold_cmd = await creates(None, direct, "base", rounds, True)
        local_cold, isolation = await cold_creates(max(5, rounds // 5), root / "cold")
        settings = {
            "e2b__api_url": fake.url,
            "e2b__sandbox_url": fake.url,
            "e2b__creates_per_s": "50",
            "e2b__creates_burst": "10",
            "reconcile_interval_s": "0.2",
        }
        async with running_daemon(root, **settings) as redis_url:
            redis = Redis.from_url(redis_url, decode_responses=True)
            pool = {"name": "cloud", "provider": "e2b", "min_ready": MIN_READY, "max_total": 20}
            quiet = {"name": "quiet", "provider": "e2b", "min_ready": MIN_READY}
            quiet["max_total"] = MIN_READY
            pools = {"pools": [pool, quiet]}
            await SpecStore(redis, KEYS).apply(Spec.model_validate(pools))
            secret = await ApiKeyStore(redis, KEYS).create("bench")
            api, url = spawn_api(redis_url, root / "api.log")
            try:
                await until_answering(api, url)
                opts = {"api_key": secret, "api_url": url, "sandbox_url": fake.url}
                floor = await round_trips(url, "/no-such-path", rounds * 4)
                listed = await round_trips(url, "/v2/sandboxes", rounds * 4, key=secret)
                await creates(redis, opts, "cloud", 3, True, pool="cloud")  # warm-up
                warm = await creates(redis, opts, "cloud", rounds, False, pool="cloud")
                warm_cmd = await creates(redis, opts, "cloud", rounds, True, pool="cloud")
                await creates(redis, opts, "quiet", 3, True, pool="quiet")  # warm-up
                calm = await creates(redis, opts, "quiet", rounds, False, pool="quiet")
                calm_cmd = await creates(redis, opts, "quiet", rounds, True, pool="quiet")
            finally:
                api.terminate()
                api.wait(10)
                await redis.aclose()

    median = statistics.median
    print(line("HTTP round trip to sandboxd api (floor)", floor))
    print(line("GET /v2/sandboxes (key check + registry)", listed))
    print(line("Sandbox.create via sandboxd (warm)", warm))
    print(line("Sandbox.create + first commands.run", warm_cmd))
    print(line("  the same, no refill during the call", calm))
    print(line("  + first commands.run, no refill", calm_cmd))
    print(line("Sandbox.create at the fake E2B (cold)", cold))
    print(line("  + first commands.run", cold_cmd))
    print(line(f"local cold create ({isolation})", local_cold))
    print(f"warm create vs the floor: {median(warm) / median(floor):.1f}x the HTTP round trip")
    print(f"warm create vs local cold create: {median(local_cold) / median(warm):.1f}x faster")
    print(
        "warm create without a refill competing vs local cold create: "
        f"{median(local_cold) / median(calm):.1f}x faster"
    )
    print(
        "warm create + first command vs local cold create: "
        f"{median(local_cold) / median(warm_cmd):.1f}x faster"
    )
    print(
        f"warm create vs the fake E2B's create: {median(warm) / median(cold):.2f}x the time "
        "(the fake's cold start costs nothing; E2B's does)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    asyncio.run(main(parser.parse_args().rounds))
