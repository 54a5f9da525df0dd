"""Claims against the real daemon: CLI exec, waiting, on-demand creates, leases, reuse."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from sandboxd.client import ClaimError, ClaimTimeout, Client
from sandboxd.client.sync import SyncClient
from tests.support import (
    KEYS,
    apply,
    cli,
    events_of,
    eventually,
    ready_ids,
    sandbox_processes,
    wait_event,
    wait_ready,
)


@pytest.fixture
async def client(redis_server):
    async with Client.from_url(redis_server, owner="test") as c:
        yield c


async def test_cli_exec_prints_and_exits_with_the_command_code(redis, redis_server, daemon_factory):
    daemon_factory().start()
    await apply(redis, [{"name": "default", "min_ready": 2, "max_total": 4}])
    await wait_ready(redis, "default", 2)

    first = await asyncio.to_thread(
        cli, redis_server, "exec", "default", "--", "python3", "-c", "print(6*7)"
    )
    assert (first.returncode, first.stdout) == (0, "42\n"), first.stderr
    second = await asyncio.to_thread(
        cli, redis_server, "exec", "default", "--", "sh", "-c", "exit 3"
    )
    assert second.returncode == 3

    claimed = [e["sandbox"] for e in await events_of(redis, "sandbox.claimed")]
    assert len(claimed) == 2 and len(set(claimed)) == 2
    for sandbox in claimed:
        await wait_event(redis, "sandbox.terminated", sandbox=sandbox, reason="released")
    back = await wait_ready(redis, "default", 2)
    assert not set(back) & set(claimed)


async def test_cli_claim_renew_release_and_errors(redis, redis_server, daemon_factory):
    daemon_factory().start()
    await apply(redis, [{"name": "default", "min_ready": 1, "max_lease_s": 600}])
    await wait_ready(redis, "default", 1)

    claimed = await asyncio.to_thread(cli, redis_server, "claim", "default", "-o", "json")
    assert claimed.returncode == 0, claimed.stderr
    sandbox_id, token = (json.loads(claimed.stdout)[k] for k in ("id", "claim_token"))
    assert await redis.hget(KEYS.sandbox(sandbox_id), "state") == "claimed"
    with_token = {"SANDBOXD_CLAIM_TOKEN": token}
    renewed = await asyncio.to_thread(
        cli, redis_server, "renew", sandbox_id, "--lease", "500", env=with_token
    )
    assert renewed.returncode == 0 and "lease expires" in renewed.stdout
    ran = await asyncio.to_thread(
        cli, redis_server, "exec", "--sandbox", sandbox_id, "--", "true", env=with_token
    )
    assert ran.returncode == 0, ran.stderr  # exec in a held sandbox does not release it
    assert await redis.hget(KEYS.sandbox(sandbox_id), "state") == "claimed"
    released = await asyncio.to_thread(
        cli, redis_server, "release", sandbox_id, "--token", "-", stdin=token + "\n"
    )
    assert released.returncode == 0, released.stderr
    again = await asyncio.to_thread(cli, redis_server, "release", sandbox_id, env=with_token)
    assert again.returncode == 1 and "not claimed" in again.stderr

    unknown = await asyncio.to_thread(cli, redis_server, "claim", "nope")
    assert unknown.returncode == 2 and "'nope' is not in the spec in force" in unknown.stderr
    too_long = await asyncio.to_thread(cli, redis_server, "claim", "default", "--lease", "601")
    assert too_long.returncode == 2 and "max_lease_s (600 s)" in too_long.stderr


async def test_a_waiting_claim_is_woken_by_the_replacement(redis, client, daemon_factory):
    daemon_factory().start()
    await apply(redis, [{"name": "one", "min_ready": 1, "max_total": 1}])
    await wait_ready(redis, "one", 1)
    holder = await client.claim("one")
    with pytest.raises(ClaimTimeout, match=r"no ready sandbox in pool 'one' within 0\.2s"):
        await client.claim("one", timeout_s=0.2)  # max_total reached: nothing can come

    waiting = asyncio.create_task(_claim(client, "one", 20))
    await eventually(lambda: _subscribers(client, "one"), what="the waiter subscribed")
    await holder.release()
    second = await waiting
    assert second.id != holder.id
    assert await client._redis.hget(KEYS.sandbox(second.id), "claim_id") == second.claim_id


async def _claim(client: Client, pool: str, timeout_s: float):
    return await client.claim(pool, timeout_s=timeout_s)


async def _subscribers(client: Client, pool: str) -> int:
    counts = await client._redis.pubsub_numsub(KEYS.pool_available(pool))
    return counts[0][1]


async def test_on_empty_create_makes_a_sandbox_for_a_waiting_claim(redis, client, daemon_factory):
    daemon_factory().start()
    await apply(redis, [{"name": "lazy", "min_ready": 0, "max_total": 2, "on_empty": "create"}])
    await wait_event(redis, "spec.applied")
    async with client.claim("lazy", timeout_s=20) as sandbox:
        result = await sandbox.exec("echo made on demand")
        assert result.stdout == b"made on demand\n"
    assert await redis.zcard(KEYS.pool_waiters("lazy")) == 0
    await wait_event(redis, "sandbox.terminated", sandbox=sandbox.id, reason="released")
    assert await ready_ids(redis, "lazy") == []  # min_ready 0: nothing kept warm


async def test_client_that_dies_holding_a_claim_loses_it_after_the_lease(
    redis, redis_server, daemon_factory
):
    daemon = daemon_factory(lease_check_interval_s=0.2).start()
    await apply(redis, [{"name": "default", "min_ready": 1}])
    await wait_ready(redis, "default", 1)
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from sandboxd.client import Client
        async def main():
            client = Client.from_url({redis_server!r}, owner="doomed")
            sandbox = await client.claim("default", lease_s=1)
            print(sandbox.id, flush=True)
            await asyncio.Event().wait()  # holds the claim until killed
        asyncio.run(main())
        """
    )
    doomed = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    sandbox_id = (await asyncio.to_thread(doomed.stdout.readline)).strip()
    doomed.kill()  # never releases
    doomed.wait()
    doomed.stdout.close()

    await wait_event(redis, "sandbox.terminated", sandbox=sandbox_id, reason="lease_expired")
    types = [e["type"] for e in await events_of(redis) if e["sandbox"] == sandbox_id]
    assert types[-3:] == ["sandbox.claimed", "sandbox.lease_expired", "sandbox.terminated"]
    expired = await wait_event(redis, "sandbox.lease_expired", sandbox=sandbox_id)
    assert expired["data"]["claimant"] == "doomed"
    assert not await redis.exists(KEYS.sandbox(sandbox_id))
    assert await redis.zscore(KEYS.leases, sandbox_id) is None
    pids = [p.pid for p in sandbox_processes(daemon.workspace)]
    records = await redis.smembers(KEYS.sandboxes)
    assert len(pids) == len(records)  # its process is gone too


async def test_renew_moves_the_deadline_and_a_stale_claim_cannot_renew(
    redis, client, daemon_factory
):
    daemon_factory().start()
    await apply(redis, [{"name": "default", "min_ready": 1, "lease_s": 30}])
    await wait_ready(redis, "default", 1)
    sandbox = await client.claim("default")
    before = sandbox.lease_expires_ms
    await sandbox.renew(lease_s=120)
    assert sandbox.lease_expires_ms >= before + 89_000
    assert await redis.zscore(KEYS.leases, sandbox.id) == sandbox.lease_expires_ms
    with pytest.raises(ClaimError, match="held by another claim"):
        await client.renew(sandbox.id, "someone-else's token")
    await sandbox.release()
    with pytest.raises(ClaimError, match="not claimed"):
        await sandbox.renew()


async def test_reuse_reset_wipes_files_and_processes(redis, client, daemon_factory):
    daemon_factory().start()
    await apply(redis, [{"name": "warm", "min_ready": 1, "max_total": 1, "reuse": "reset"}])
    await wait_ready(redis, "warm", 1)
    async with client.claim("warm") as first:
        await first.write("left-behind.txt", "secret of the first holder")
        started = await first.exec("setsid sleep 1000 >/dev/null 2>&1 < /dev/null & echo $!")
        assert started.exit_code == 0
    await wait_event(redis, "sandbox.reset", sandbox=first.id)
    async with client.claim("warm", timeout_s=20) as second:
        assert second.id == first.id and second.claim_id != first.claim_id
        listing = await second.exec("ls -A; ps -eo comm")
        assert b"left-behind.txt" not in listing.stdout
        assert b"sleep" not in listing.stdout
        assert await redis.hget(KEYS.sandbox(first.id), "uses") == "2"


async def test_a_failing_reset_terminates_the_sandbox(redis, client, daemon_factory):
    daemon_factory().start()
    pool = {
        "name": "warm",
        "min_ready": 1,
        "reuse": "reset",
        "reset_command": "echo no >&2; exit 1",
    }
    await apply(redis, [pool])
    await wait_ready(redis, "warm", 1)
    sandbox = await client.claim("warm")
    await sandbox.release()
    terminated = await wait_event(redis, "sandbox.terminated", sandbox=sandbox.id)
    assert terminated["data"]["reason"] == "reset_failed"
    assert "exited 1: no" in terminated["data"]["error"]
    assert sandbox.id not in await wait_ready(redis, "warm", 1)


async def test_ctrl_c_during_cli_exec_still_releases(redis, redis_server, daemon_factory):
    daemon_factory().start()
    await apply(redis, [{"name": "default", "min_ready": 1}])
    await wait_ready(redis, "default", 1)
    env = {"SANDBOXD_REDIS_URL": redis_server, "PATH": os.environ["PATH"]}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandboxd", "exec", "default", "--", "sleep", "600"],
        env=env,
    )
    claimed = await wait_event(redis, "sandbox.claimed")
    proc.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(proc.wait, 20) == 130
    await wait_event(redis, "sandbox.released", sandbox=claimed["sandbox"])


async def test_sync_client(redis, redis_server, daemon_factory):
    daemon_factory().start()
    await apply(redis, [{"name": "default", "min_ready": 1}])
    await wait_ready(redis, "default", 1)

    def use_it() -> tuple[str, bytes, str]:
        with SyncClient(redis_server, owner="sync") as sync, sync.claim("default") as sandbox:
            sandbox.write("note.txt", "hello")
            result = sandbox.exec(["cat", "note.txt"])
            return sandbox.id, result.stdout, sandbox.claimant

    sandbox_id, out, claimant = await asyncio.to_thread(use_it)
    assert (out, claimant) == (b"hello", "sync")
    await wait_event(redis, "sandbox.released", sandbox=sandbox_id)


async def test_a_replicated_claim_that_no_replica_acknowledges_is_given_back(
    redis, redis_server, daemon_factory
):
    """claim_durability = replicated against a Redis without replicas: the claim is refused
    as not_replicated (client and CLI), and the sandbox is not left claimed."""
    daemon_factory().start()
    await apply(redis, [{"name": "default", "min_ready": 1}])
    await wait_ready(redis, "default", 1)
    client = Client.from_url(redis_server, claim_durability="replicated", replication_timeout_ms=50)
    try:
        with pytest.raises(ClaimError) as refused:
            await client.claim("default", timeout_s=0)
    finally:
        await client.aclose()
    assert refused.value.reason == "not_replicated"
    given_back = (await events_of(redis, "sandbox.released"))[0]["sandbox"]
    assert await redis.hget(KEYS.sandbox(given_back), "state") != "claimed"

    await wait_ready(redis, "default", 1)
    env = {"SANDBOXD_CLAIM_DURABILITY": "replicated", "SANDBOXD_CLAIM_REPLICATION_TIMEOUT_MS": "50"}
    shown = await asyncio.to_thread(cli, redis_server, "claim", "default", env=env)
    assert shown.returncode == 1 and "reached no Redis replica" in shown.stderr
    assert "Traceback" not in shown.stderr
    with pytest.raises(ValueError, match="acknowledged or replicated"):
        Client(redis, claim_durability="maybe")
