"""16 concurrent clients, thousands of claims against the real daemon replenishing pools.

Checked: no sandbox is ever held by two claims at once (and a `reuse: never` sandbox is
never handed out twice at all), every claim gets a sandbox that is claimed by it and usable
or a ClaimTimeout, nothing the last holder left is visible to the next, no pool ever goes
over max_total, and afterwards every pool is back at min_ready with no orphans.
"""

import asyncio
import itertools
import random
import time
from collections import defaultdict
from dataclasses import dataclass

import pytest

from sandboxd.client import ClaimTimeout, Client
from sandboxd.providers.local.agentclient import AgentError
from tests.support import (
    KEYS,
    SOAK,
    apply,
    events_of,
    eventually,
    sample_totals,
    sandbox_processes,
    wait_ready,
)

CLIENTS = 16
CLAIMS_PER_CLIENT = 640 if SOAK else 48  # 10,240 or 768 claims in all
POOLS = {
    "reused": {"name": "reused", "min_ready": 6, "max_total": 10, "reuse": "reset"},
    "fresh": {"name": "fresh", "min_ready": 4, "max_total": 8},
}


@dataclass(frozen=True)
class Held:
    sandbox: str
    pool: str
    claim_id: str
    claimed: float  # monotonic, after the claim returned
    releasing: float  # monotonic, before the release was sent


async def one_client(url: str, number: int, held: list[Held], timeouts: list[str]) -> None:
    rng = random.Random(number)
    async with Client.from_url(url, owner=f"stress-{number}") as client:
        for i in range(CLAIMS_PER_CLIENT):
            pool = "fresh" if (i + number) % 16 == 0 else "reused"
            try:
                sandbox = await client.claim(pool, timeout_s=rng.choice([0.05, 0.5, 5.0]))
            except ClaimTimeout as exc:
                assert f"no ready sandbox in pool '{pool}'" in str(exc)
                timeouts.append(pool)
                continue
            claimed = time.monotonic()
            fields = await client._redis.hmget(KEYS.sandbox(sandbox.id), "state", "claim_id")
            assert fields == ["claimed", sandbox.claim_id]
            await use(sandbox, i)
            held.append(Held(sandbox.id, pool, sandbox.claim_id, claimed, time.monotonic()))
            await sandbox.release()


async def use(sandbox, i: int) -> None:
    """Nothing of the previous holder may be visible; leave something for the next."""
    with pytest.raises(AgentError, match="FileNotFoundError"):
        await sandbox.read("holder")
    await sandbox.write("holder", sandbox.claim_id)
    if i % 8 == 0:
        result = await sandbox.exec(["sh", "-c", "cat holder"])
        assert (result.exit_code, result.stdout) == (0, sandbox.claim_id.encode())


def assert_never_held_twice(held: list[Held]) -> None:
    by_sandbox: dict[str, list[Held]] = defaultdict(list)
    for h in held:
        by_sandbox[h.sandbox].append(h)
    for claims in by_sandbox.values():
        claims.sort(key=lambda h: h.claimed)
        for before, after in itertools.pairwise(claims):
            assert after.claimed > before.releasing, f"{after.sandbox} held twice at once"
        if claims[0].pool == "fresh":
            assert len(claims) == 1, f"{claims[0].sandbox} handed out again without reuse"
    assert len({h.claim_id for h in held}) == len(held)


def assert_cap_in_event_order(events: list[dict]) -> None:
    """Replaying the stream: sandboxes begun minus sandboxes gone never exceeds the cap."""
    alive: dict[str, int] = defaultdict(int)
    for event in events:
        if event["type"] == "sandbox.creating":
            alive[event["pool"]] += 1
            assert alive[event["pool"]] <= POOLS[event["pool"]]["max_total"]
        elif event["type"] == "sandbox.terminated":
            alive[event["pool"]] -= 1


@pytest.mark.timeout(240)
async def test_sixteen_clients_thousands_of_claims(redis, redis_server, daemon_factory):
    daemon = daemon_factory(max_concurrent_creates=6).start()
    await apply(redis, list(POOLS.values()))
    for name, pool in POOLS.items():
        await wait_ready(redis, name, pool["min_ready"])

    held: list[Held] = []
    timeouts: list[str] = []
    peaks: dict[str, int] = {}
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        sampler = group.create_task(sample_totals(redis, stop, peaks))
        async with asyncio.TaskGroup() as clients:
            for number in range(CLIENTS):
                clients.create_task(one_client(redis_server, number, held, timeouts))
        stop.set()
        await sampler

    assert len(held) + len(timeouts) == CLIENTS * CLAIMS_PER_CLIENT
    assert len(held) > CLIENTS * CLAIMS_PER_CLIENT // 3  # 16 clients share 18 sandboxes
    assert_never_held_twice(held)
    assert all(peaks[name] <= POOLS[name]["max_total"] for name in POOLS), peaks

    for name, pool in POOLS.items():
        await wait_ready(redis, name, pool["min_ready"], timeout=60)

    async def settled():
        ids = await redis.smembers(KEYS.sandboxes)
        states = sorted([str(await redis.hget(KEYS.sandbox(i), "state")) for i in ids])
        return states if states == ["ready"] * 10 else None

    await eventually(settled, timeout=60, what="only the min_ready sandboxes left")
    assert len(sandbox_processes(daemon.workspace)) == 10  # no orphans
    assert await redis.zcard(KEYS.leases) == 0
    events = await events_of(redis)
    assert_cap_in_event_order(events)
    claimed = [e for e in events if e["type"] == "sandbox.claimed"]
    assert len(claimed) == len(held)
    assert daemon.proc.poll() is None
