"""`sandboxd api` (E2B's REST API) on loopback: what an unmodified e2b SDK program waits for.

    .venv/bin/python -m bench.e2b_api [--rounds 50]

In one run, against a private redis-server, the real daemon with a local pool and e2b pools
on the fake E2B (tests/e2b_fake, in a process of its own as E2B is remote) and
`python -m sandboxd api`, with the async e2b SDK as a program uses it (E2B_API_URL =
sandboxd api; E2B_SANDBOX_URL = sandboxd api for the local pool, the fake's envd for the
e2b pools; a sandboxd key):
- the floor: a bare HTTP round trip to the API server (a path it does not route: uvicorn
  and Starlette, no Redis), and an authenticated `GET /v2/sandboxes` (the key's check and
  the registry read);
- `Sandbox.create("default")` through sandboxd: a warm claim of a local sandbox, and with
  the first `commands.run("true")` (sandboxd's envd, carried to the sandbox's agent);
- the same local create 50 ms after the pool is full again (each create above starts the
  moment the refill's new sandbox is ready, while the host is still busy with it and with
  the last sandbox's teardown: a platform's creates mostly come at other times);
- `Sandbox.create("cloud")`, a warm e2b sandbox, and with the first command (the fake's
  envd);
- both again on a pool whose claim starts no refill at that moment (`max_total` =
  `min_ready`: the replacement comes after the kill): on 2 CPUs the refill (the daemon's
  pass, its E2B create, the fake's envd starting the new sandbox's processes under
  bubblewrap) competes with the call measured, which a remote E2B would not;
- the cold paths: the SDK's create straight at the fake E2B (+ first command), which costs
  the fake nothing (against E2B, add its cold start), the local provider's cold create
  of a real sandbox on this host, and the same `Sandbox.create` through sandboxd on a local
  pool with nothing ready (`min_ready: 0`, `on_empty: create`: the call waits for a cold
  create).
"""

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from e2b import AsyncSandbox
from redis.asyncio import Redis
from tests.support import free_port, wait_ready

from bench.common import cold_creates, line, running_daemon
from sandboxd.spec import Spec
from sandboxd.store.apikeys import ApiKeyStore
from sandboxd.store.keys import Keys
from sandboxd.store.specs import SpecStore

E2B_KEY = "e2b_bench_key_0000000000000000000000000000"
KEYS = Keys()
MIN_READY = 5
SETTLE_S = 0.05  # the pool at rest: see creates()


def spawn_api(redis_url: str, root: Path) -> tuple[subprocess.Popen, str]:
    """`python -m sandboxd api` on a free loopback port (envd for the local sandboxes of the
    daemon `running_daemon(root)` runs), its output in `root/api.log`."""
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SANDBOXD_REDIS_URL": redis_url,
        "SANDBOXD_API_LISTEN": f"127.0.0.1:{port}",
        "SANDBOXD_LOG_LEVEL": "WARNING",
        "SANDBOXD_LOCAL__WORKSPACE_ROOT": str(root / "boxes"),
    }
    with open(root / "api.log", "ab") as out:
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
    redis: Redis,
    opts: dict,
    template: str,
    rounds: int,
    first_command: bool,
    pool: str = "",
    settle_s: float = 0.0,
) -> list[float]:
    """`settle_s`: how long after the pool is full again each create starts (0: at once,
    as the refill's new sandbox has just started and the last one's teardown may still
    run; a platform's creates mostly come at other times)."""
    out = []
    for _ in range(rounds):
        if pool:  # never time a wait for the refill: a full warm pool is the case measured
            await wait_ready(redis, pool, MIN_READY, timeout=600, interval=0.002)
            await asyncio.sleep(settle_s)
        t0 = time.perf_counter()
        sandbox = await AsyncSandbox.create(template, **opts)
        if first_command:
            await sandbox.commands.run("true")
        out.append((time.perf_counter() - t0) * 1000)
        await sandbox.kill()
    return out


@contextlib.contextmanager
def fake_e2b(api_key: str) -> Iterator[str]:
    """The fake E2B in its own process (as E2B is remote): its work for a refill does not
    take the measured client's interpreter. Yields its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.e2b_fake", "--api-key", api_key],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = proc.stdout.readline().strip() if proc.stdout else ""
        if not url:
            raise RuntimeError(f"the fake E2B did not start (exit {proc.wait(10)})")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


async def main(rounds: int) -> None:
    os.environ["E2B_API_KEY"] = E2B_KEY  # the daemon's; the program uses sandboxd's key
    with fake_e2b(E2B_KEY) as fake_url, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        direct = {"api_key": E2B_KEY, "api_url": fake_url, "sandbox_url": fake_url}
        await creates(None, direct, "base", 3, True)  # warm the SDK's imports and connections
        cold = await creates(None, direct, "base", rounds, False)
        cold_cmd = await creates(None, direct, "base", rounds, True)
        local_cold, isolation = await cold_creates(max(5, rounds // 5), root / "cold")
        settings = {
            "e2b__api_url": fake_url,
            "e2b__sandbox_url": fake_url,
            "e2b__creates_per_s": "50",
            "e2b__creates_burst": "10",
            "reconcile_interval_s": "0.2",
        }
        async with running_daemon(root, **settings) as redis_url:
            redis = Redis.from_url(redis_url, decode_responses=True)
            local = {"name": "default", "min_ready": MIN_READY, "max_total": 20}
            # The cold path through the same call: no ready sandbox, the create waits for one.
            empty = {"name": "empty", "min_ready": 0, "max_total": 2, "on_empty": "create"}
            pool = {"name": "cloud", "provider": "e2b", "min_ready": MIN_READY, "max_total": 20}
            quiet = {"name": "quiet", "provider": "e2b", "min_ready": MIN_READY}
            quiet["max_total"] = MIN_READY
            pools = {"pools": [local, empty, pool, quiet]}
            await SpecStore(redis, KEYS).apply(Spec.model_validate(pools))
            secret = await ApiKeyStore(redis, KEYS).create("bench")
            api, url = spawn_api(redis_url, root)
            try:
                await until_answering(api, url)
                at_local = {"api_key": secret, "api_url": url, "sandbox_url": url}
                at_e2b = {"api_key": secret, "api_url": url, "sandbox_url": fake_url}
                floor = await round_trips(url, "/no-such-path", rounds * 4)
                listed = await round_trips(url, "/v2/sandboxes", rounds * 4, key=secret)
                measured = {}
                for template, opts in (("default", at_local), ("cloud", at_e2b), ("quiet", at_e2b)):
                    await creates(redis, opts, template, 3, True, pool=template)  # warm-up
                    measured[template] = (
                        await creates(redis, opts, template, rounds, False, pool=template),
                        await creates(redis, opts, template, rounds, True, pool=template),
                    )
                at_rest = await creates(
                    redis, at_local, "default", rounds, False, pool="default", settle_s=SETTLE_S
                )
                cold_api = await creates(redis, at_local, "empty", max(5, rounds // 5), False)
            finally:
                api.terminate()
                api.wait(10)
                await redis.aclose()

    median = statistics.median
    warm, warm_cmd = measured["default"]
    print(line("HTTP round trip to sandboxd api (floor)", floor))
    print(line("GET /v2/sandboxes (key check + registry)", listed))
    print(line("Sandbox.create, local pool (warm)", warm))
    print(line("  + first commands.run (sandboxd envd)", warm_cmd))
    print(line(f"  the same {SETTLE_S * 1000:.0f} ms after the refill", at_rest))
    print(line("Sandbox.create, e2b pool (warm)", measured["cloud"][0]))
    print(line("  + first commands.run (E2B's envd)", measured["cloud"][1]))
    print(line("  the same, no refill during the call", measured["quiet"][0]))
    print(line("  + first commands.run, no refill", measured["quiet"][1]))
    print(line("Sandbox.create at the fake E2B (cold)", cold))
    print(line("  + first commands.run", cold_cmd))
    print(line(f"local cold create ({isolation})", local_cold))
    print(line("Sandbox.create, empty local pool (cold)", cold_api))
    print(f"warm create vs the floor: {median(warm) / median(floor):.1f}x the HTTP round trip")
    print(f"warm create vs local cold create: {median(local_cold) / median(warm):.1f}x faster")
    print(
        "warm create vs the same call on an empty pool (the cold path): "
        f"{median(cold_api) / median(warm):.1f}x faster"
    )
    print(
        f"warm create {SETTLE_S * 1000:.0f} ms after the refill vs local cold create: "
        f"{median(local_cold) / median(at_rest):.1f}x, vs the cold path: "
        f"{median(cold_api) / median(at_rest):.1f}x faster"
    )
    print(
        "warm create + first command vs local cold create: "
        f"{median(local_cold) / median(warm_cmd):.1f}x faster"
    )
    print(
        f"e2b pool: warm create vs the fake E2B's create: "
        f"{median(measured['cloud'][0]) / median(cold):.2f}x the time "
        "(the fake's cold start costs nothing; E2B's does)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    asyncio.run(main(parser.parse_args().rounds))
