"""Apply raises and lowers pools; a sampler checks max_total is never exceeded."""

import asyncio

import pytest
from bench.fastfake import FastFakeProvider

from sandboxd.config import Config
from sandboxd.control.creator import Creator
from sandboxd.control.replacements import Recoveries
from sandboxd.spec import PoolSpec
from sandboxd.store.events import EventPublisher
from sandboxd.store.records import SandboxStore
from tests.support import KEYS, apply, events_of, eventually, sample_totals, wait_event, wait_ready


async def test_scale_up_and_down_never_exceeds_max_total(redis, daemon_factory):
    daemon = daemon_factory(max_concurrent_creates=3).start()
    await apply(redis, [{"name": "default", "min_ready": 2, "max_total": 8}])
    await wait_ready(redis, "default", 2)
    peaks: dict[str, int] = {}
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        sampler = group.create_task(sample_totals(redis, stop, peaks))
        await apply(redis, [{"name": "default", "min_ready": 8, "max_total": 8}])
        await wait_ready(redis, "default", 8)
        await apply(redis, [{"name": "default", "min_ready": 1, "max_total": 8}])
        await wait_ready(redis, "default", 1)
        stop.set()
    assert peaks["default"] <= 8 and sampler.result() > 10  # sampled throughout, never over
    scaled = await events_of(redis, "pool.scaled")
    assert any(e["data"]["terminating"] == 7 for e in scaled)

    async def seven_terminated():
        terminated = await events_of(redis, "sandbox.terminated")
        return terminated if len(terminated) >= 7 else None

    terminated = await eventually(seven_terminated, what="7 sandbox.terminated events")
    assert [e["data"]["reason"] for e in terminated] == ["scaled_down"] * 7
    assert daemon.proc.poll() is None


async def test_removing_a_pool_drains_it(redis, daemon_factory):
    daemon_factory().start()
    await apply(redis, [{"name": "keep", "min_ready": 1}, {"name": "gone", "min_ready": 2}])
    await wait_ready(redis, "gone", 2)
    await apply(redis, [{"name": "keep", "min_ready": 1}])

    async def gone_is_empty():
        records = [
            await redis.hget(KEYS.sandbox(i), "pool") for i in await redis.smembers(KEYS.sandboxes)
        ]
        return "gone" not in records and "keep" in records

    await eventually(gone_is_empty, what="pool `gone` drained")

    async def both_reported():
        terminated = await events_of(redis, "sandbox.terminated")
        return terminated if len(terminated) == 2 else None

    terminated = await eventually(both_reported, what="2 sandbox.terminated events")
    assert {e["data"]["reason"] for e in terminated} == {"drained"}


async def test_failing_create_is_retried_and_reported(redis, daemon_factory):
    daemon_factory(
        create_attempts=2, local={"templates": {"broken": {"setup": "echo nope >&2; exit 4"}}}
    ).start()
    await apply(redis, [{"name": "bad", "template": "broken", "min_ready": 1}])
    failed = await eventually(
        lambda: events_of(redis, "sandbox.create_failed"), what="create_failed"
    )
    first = failed[0]["data"]
    assert first["attempt"] == 1 and first["will_retry"] is True
    assert "template setup exited 4" in first["error"] and "nope" in first["error"]
    closed = await wait_event(redis, "sandbox.terminated", reason="create_failed")
    assert closed["sandbox"] == failed[0]["sandbox"]
    assert await redis.scard(KEYS.sandboxes) <= 1


class _Counting(FastFakeProvider):
    """The fast fake, remembering the most creates it saw running at once."""

    def __init__(self, creator: "list[Creator]") -> None:
        super().__init__()
        self._creator = creator
        self.peak = 0

    async def create(self, sandbox_id, pool, *, revision=0):
        self.peak = max(self.peak, len(self._creator[0].inflight))
        await asyncio.sleep(0)  # others run meanwhile
        return await super().create(sandbox_id, pool, revision=revision)


def _creator(redis, config, provider) -> Creator:
    events = EventPublisher(redis, KEYS, 10_000)
    return Creator(
        config=config,
        store=SandboxStore(redis, KEYS),
        events=events,
        providers={"local": provider},
        recoveries=Recoveries(events),
        instance="test",
        nudge=lambda pool: None,
    )


async def test_owed_creates_start_as_creates_end_without_a_pass(redis, tmp_path):
    """What a pass's plan wanted beyond the global slots starts as soon as a slot frees:
    no reconcile pass runs here at all, and never more than max_concurrent_creates at once."""
    config = Config(max_concurrent_creates=2, local={"workspace_root": str(tmp_path)})
    holder: list[Creator] = []
    provider = _Counting(holder)
    creator = _creator(redis, config, provider)
    holder.append(creator)
    spec = PoolSpec(name="p", min_ready=12, max_total=12)
    creator.pace([spec])
    async with asyncio.timeout(10), asyncio.TaskGroup() as work:
        creator.work = work
        creator.owe({"p": 10, "gone": 3}, {"p": spec}, revision=1)  # "gone": not in force
        assert creator.owed == {"p": 10}
        for _ in range(2):  # what the pass itself started
            await creator.start(spec, 1, work)
    assert await redis.llen(KEYS.pool_ready("p")) == 12
    assert provider.peak <= 2 and not creator.owed and not creator.inflight


async def test_no_owed_create_starts_while_a_pass_plans(redis, tmp_path):
    config = Config(max_concurrent_creates=4, local={"workspace_root": str(tmp_path)})
    creator = _creator(redis, config, FastFakeProvider())
    spec = PoolSpec(name="p", min_ready=3)
    creator.pace([spec])
    async with asyncio.timeout(10), asyncio.TaskGroup() as work:
        creator.work = work
        creator.owe({"p": 2}, {"p": spec}, revision=1)
        async with creator.planning:  # a pass between its read and its plan
            assert await creator.refill() == 0
        assert await creator.refill() == 1  # slow start: one at first, the next as it ends
    assert await redis.llen(KEYS.pool_ready("p")) == 2 and not creator.owed


@pytest.mark.timeout(180)
async def test_a_stop_of_ten_thousand_sandboxes_keeps_its_lease_and_ends_them_all(
    redis, redis_server, tmp_path
):
    """10,000 terminations at once starved the lease's renewal: the lease was lost
    mid-stop and the rest were left running. A stop now ends them a bounded number at a
    time; every one is terminated, the lease held throughout, the exit 0."""
    from sandboxd.daemon import Daemon
    from sandboxd.spec import Spec
    from sandboxd.store.specs import SpecStore

    n, pools = 10_000, [f"p{i}" for i in range(10)]
    provider = FastFakeProvider()
    config = Config(redis_url=redis_server, local={"workspace_root": str(tmp_path)})
    daemon = Daemon(config, providers={"local": provider})
    task = asyncio.create_task(daemon.run(handle_signals=False))
    try:
        await daemon.started.wait()
        spec = Spec(pools=[PoolSpec(name=p, min_ready=n // 10, max_total=n // 10) for p in pools])
        await SpecStore(redis, KEYS).apply(spec)

        async def filled():
            async with redis.pipeline(transaction=False) as pipe:
                for pool in pools:
                    pipe.llen(KEYS.pool_ready(pool))
                return sum(await pipe.execute()) == n

        await eventually(filled, timeout=120, what=f"{n} ready")
    finally:
        daemon.stop.set()
        code = await task
    assert code == 0 and daemon.leadership is not None
    assert daemon.leadership.fence.lost is None
    assert provider.sandboxes == {} and await redis.scard(KEYS.sandboxes) == 0
