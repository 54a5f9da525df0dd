"""Health probes and supervised agents, on the real daemon with real sandboxes."""

from sandboxd.client import Client
from sandboxd.providers.local.agentclient import AgentClient
from sandboxd.store.records import SandboxStore
from tests.support import KEYS, apply, cli, events_of, eventually, wait_event, wait_ready

PROBED = {"probed": {"setup": 'touch "$HOME/ok"'}}


def fast_health(**extra) -> dict:
    return {"command": 'test -f "$HOME/ok"', "interval_s": 0.2, "failure_threshold": 2, **extra}


async def sequence(redis, sandbox: str) -> list[str]:
    """The sandbox's own events and the recovery events naming it, in stream order."""
    out = []
    for e in await events_of(redis):
        if e["sandbox"] == sandbox or e["data"].get("old") == sandbox:
            out.append(e["type"] + (f":{e['data']['to']}" if "to" in e["data"] else ""))
    return out


async def test_a_failing_probe_makes_the_sandbox_unhealthy_and_it_is_replaced(
    redis, daemon_factory
):
    daemon_factory(local={"templates": PROBED}).start()
    await apply(
        redis, [{"name": "web", "template": "probed", "min_ready": 2, "health": fast_health()}]
    )
    victim, other = await wait_ready(redis, "web", 2)
    await wait_event(redis, "sandbox.health_changed", sandbox=victim, to="healthy")
    record = await SandboxStore(redis, KEYS).get(victim)
    await AgentClient(record.handle["socket"]).exec(["rm", "ok"])  # the probe starts failing
    done = await wait_event(redis, "recovery.succeeded", old=victim)
    assert await sequence(redis, victim) == [
        "sandbox.creating",
        "sandbox.ready",
        "sandbox.health_changed:healthy",
        "sandbox.health_changed:degraded",
        "sandbox.health_changed:unhealthy",
        "recovery.started",
        "sandbox.terminated",
        "recovery.succeeded",
    ]
    unhealthy = await wait_event(redis, "sandbox.health_changed", sandbox=victim, to="unhealthy")
    assert "probe exited 1" in unhealthy["data"]["reason"]
    terminated = await wait_event(redis, "sandbox.terminated", sandbox=victim)
    assert terminated["data"]["reason"] == "unhealthy"
    new = done["data"]["new"]
    creating = await wait_event(redis, "sandbox.creating", sandbox=new)
    assert creating["data"]["replaces"] == victim
    assert sorted(await wait_ready(redis, "web", 2)) == sorted([other, new])


async def test_an_unhealthy_claimed_sandbox_is_left_to_its_holder_and_the_event_names_it(
    redis, daemon_factory
):
    daemon_factory(local={"templates": PROBED}).start()
    await apply(
        redis, [{"name": "web", "template": "probed", "min_ready": 1, "health": fast_health()}]
    )
    (sandbox,) = await wait_ready(redis, "web", 1)
    async with Client(redis) as client:
        claim = await client.claim("web", owner="holder", timeout_s=5)
        assert claim.id == sandbox
        record = await SandboxStore(redis, KEYS).get(sandbox)
        await AgentClient(record.handle["socket"]).exec(["rm", "ok"])
        event = await wait_event(redis, "sandbox.health_changed", sandbox=sandbox, to="unhealthy")
        assert event["data"]["claimant"] == "holder"
        assert event["data"]["claim_id"] == claim.claim_id
        assert (await SandboxStore(redis, KEYS).get(sandbox)).state == "claimed"
        assert not await events_of(redis, "recovery.started")


CRASHING = {"command": 'echo "hello from $SANDBOX_ID"; exit 3', "backoff_s": 0.05}


async def test_a_crashing_agent_is_restarted_with_backoff_then_its_sandbox_replaced(
    redis, daemon_factory, redis_server
):
    daemon_factory(agent_poll_interval_s=0.1).start()
    run = {**CRASHING, "max_restarts": 3, "window_s": 60}
    await apply(redis, [{"name": "bots", "min_ready": 1, "run": run}])
    (first,) = await wait_ready(redis, "bots", 1)
    failed = await wait_event(redis, "agent.failed", sandbox=first)
    assert "exited with 3 after 3 restarts" in failed["data"]["reason"]
    mine = [e for e in await events_of(redis) if e["sandbox"] == first]
    agent = [e["type"] for e in mine if e["type"].startswith("agent.")]
    assert agent == ["agent.started", "agent.exited"] + [
        "agent.restarting",
        "agent.started",
        "agent.exited",
    ] * 3 + ["agent.failed"]
    exits = [e["data"]["exit_code"] for e in mine if e["type"] == "agent.exited"]
    assert exits == [3, 3, 3, 3]
    delays = [e["data"]["delay_s"] for e in mine if e["type"] == "agent.restarting"]
    assert delays == sorted(delays) and delays[-1] <= 0.05 * 4  # grows, jittered, capped
    done = await wait_event(redis, "recovery.succeeded", old=first)
    started = await wait_event(redis, "recovery.started", sandbox=first)
    assert started["data"]["reason"] == "unhealthy"
    assert "agent failed" in started["data"]["detail"]
    assert done["data"]["new"] != first
    logs = cli(redis_server, "logs", first)  # kept after the sandbox is gone
    assert logs.returncode == 0
    assert logs.stdout.splitlines() == [f"hello from {first}"] * 4


async def test_an_agent_that_recovers_keeps_its_sandbox_and_logs_follow(
    redis, daemon_factory, redis_server
):
    daemon_factory(agent_poll_interval_s=0.1).start()
    script = (
        'if [ -f "$HOME/crashed" ]; then echo steady; exec sleep 1000; fi; '
        'touch "$HOME/crashed"; echo crashing; exit 1'
    )
    await apply(redis, [{"name": "bots", "min_ready": 1, "run": {"command": script}}])
    (sandbox,) = await wait_ready(redis, "bots", 1)
    await eventually(
        lambda: _agent_starts(redis, sandbox, 2), what="the agent started a second time"
    )

    async def both_lines():
        out = cli(redis_server, "logs", sandbox).stdout.splitlines()
        return out if out == ["crashing", "steady"] else None

    await eventually(both_lines, what="both runs' output in `sandboxd logs`")
    assert not await events_of(redis, "agent.failed", "recovery.started")
    assert await redis.lrange(KEYS.pool_ready("bots"), 0, -1) == [sandbox]


async def _agent_starts(redis, sandbox: str, count: int) -> bool:
    starts = [e for e in await events_of(redis, "agent.started") if e["sandbox"] == sandbox]
    return len(starts) >= count
