"""Redis losing its data loses nothing that runs (issue: after FLUSHDB, or a Redis restart
without persistence, the spec was not written back, the janitor killed live claimed
sandboxes as leaks, and the next daemon restart drained every pool)."""

import asyncio
import contextlib
import json
import subprocess

import pytest
from redis.asyncio import Redis

from sandboxd.client import Client
from sandboxd.store.localredis import find_redis_server, start, wait_until_answering
from sandboxd.store.records import SandboxStore
from tests.support import (
    KEYS,
    apply,
    eventually,
    free_port,
    sandbox_processes,
    wait_event,
    wait_ready,
)


async def claimed_pair(redis: Redis) -> tuple[Client, list]:
    client = Client(redis, owner="holder")
    held = [await client.claim("p", lease_s=600, timeout_s=20) for _ in range(2)]
    return client, held


async def live_pids(workspace) -> set[int]:
    return {p.pid for p in sandbox_processes(workspace)}


async def test_flushdb_while_serving_two_claims_puts_everything_back(redis, daemon_factory):
    daemon = daemon_factory(janitor_interval_s=0.5).start()
    await apply(redis, [{"name": "p", "min_ready": 2, "max_total": 6}])
    await wait_ready(redis, "p", 2)
    client, held = await claimed_pair(redis)
    await wait_ready(redis, "p", 2)  # replacements made for the two claimed
    before = await live_pids(daemon.workspace)
    ids_before = {r.id for r in await SandboxStore(redis, KEYS).records()}
    assert len(before) == 4 and len(ids_before) == 4

    await redis.flushdb()
    restored = await wait_event(redis, "state.restored")
    assert restored["data"]["spec_revision"] == 1
    assert restored["data"]["records"] == 4 and restored["data"]["claimed"] == 2

    records = {r.id: r for r in await SandboxStore(redis, KEYS).records()}
    assert set(records) == ids_before
    for sandbox in held:
        assert records[sandbox.id].state == "claimed"
        assert records[sandbox.id].claim_id == sandbox.claim_id
    assert set(await redis.lrange(KEYS.pool_ready("p"), 0, -1)) == ids_before - {s.id for s in held}
    # Nothing was killed, drained, reaped or made twice: the same processes run.
    assert await live_pids(daemon.workspace) == before
    types = [e.get("type") for _, e in await redis.xrange(KEYS.events)]
    assert "sandbox.leaked" not in types and "sandbox.terminated" not in types
    assert "sandbox.creating" not in types
    # Holders still own their claims: run a command, release with the token.
    assert (await held[0].exec("echo still mine")).stdout == b"still mine\n"
    for sandbox in held:
        await sandbox.release()
    await wait_ready(redis, "p", 2)
    assert daemon.proc.poll() is None
    await client.aclose()


async def test_a_daemon_restarted_over_an_emptied_redis_restores_instead_of_draining(
    redis, daemon_factory
):
    first = daemon_factory(on_shutdown="keep").start()
    await apply(redis, [{"name": "p", "min_ready": 2, "max_total": 6}])
    await wait_ready(redis, "p", 2)
    client, held = await claimed_pair(redis)
    await wait_ready(redis, "p", 2)
    before = await live_pids(first.workspace)
    assert first.stop() == 0
    await redis.flushdb()  # e.g. redis restarted without persistence while we were down

    second = daemon_factory(on_shutdown="keep").start()
    restored = await wait_event(redis, "state.restored")
    assert restored["data"]["records"] == 4 and restored["data"]["spec_revision"] == 1
    await wait_event(redis, "daemon.started")
    assert await live_pids(second.workspace) == before
    assert {p["name"] for p in [{"name": "p"}]} == {"p"}
    assert len(await wait_ready(redis, "p", 2)) == 2
    for sandbox in held:
        await sandbox.release()
    await client.aclose()


@pytest.mark.timeout(90)
async def test_redis_restarted_without_persistence_under_a_running_daemon(tmp_path, daemon_factory):
    binary = find_redis_server()
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"

    def start_redis() -> subprocess.Popen:
        proc = start(binary, port, tmp_path / "volatile-redis", daemonize=False)
        wait_until_answering("127.0.0.1", port)
        return proc

    server = start_redis()
    redis = Redis.from_url(url, decode_responses=True)
    try:
        daemon = daemon_factory(redis_url=url).start()
        await apply(redis, [{"name": "p", "min_ready": 1, "max_total": 4}])
        await wait_ready(redis, "p", 1)
        client, held = await claimed_pair(redis)
        before = await live_pids(daemon.workspace)
        # The daemon learns of a claim at its next pass (a claim a moment before the crash
        # is not yet known to it): Redis goes once the claims are in its journal.
        journal = daemon.workspace.parent / "state" / "records.json"

        async def claims_known() -> bool:
            try:
                saved = json.loads(journal.read_text())
            except (OSError, ValueError):
                return False
            return all(saved.get(s.id, {}).get("state") == "claimed" for s in held)

        await eventually(claims_known, what="the claims in the daemon's journal")
        with contextlib.suppress(Exception):
            await redis.shutdown(nosave=True)
        server.wait(10)
        server = start_redis()  # empty: no persistence
        await wait_event(redis, "state.restored", timeout=30)
        records = {r.id: r for r in await SandboxStore(redis, KEYS).records()}
        assert {s.id for s in held} <= set(records)
        assert before <= await live_pids(daemon.workspace)
        for sandbox in held:
            await sandbox.release()
        await client.aclose()

        async def refilled() -> bool:
            return len(await redis.lrange(KEYS.pool_ready("p"), 0, -1)) >= 1

        await eventually(refilled, what="pool back at min_ready")
        await asyncio.sleep(0)
    finally:
        await redis.aclose()
        server.terminate()
        server.wait(10)


async def test_a_deleted_record_of_a_claim_is_put_back_not_reaped(redis, daemon_factory):
    """Redis lost one record but not the marker (a DEL, an old dump): the janitor finds the
    sandbox without a record and puts the journal's record back instead of killing it."""
    daemon = daemon_factory(janitor_interval_s=0.3).start()
    await apply(redis, [{"name": "p", "min_ready": 1, "max_total": 4}])
    await wait_ready(redis, "p", 1)
    async with Client(redis, owner="holder") as client:
        sandbox = await client.claim("p", lease_s=600, timeout_s=20)
        await wait_ready(redis, "p", 1)
        before = await live_pids(daemon.workspace)

        async def journaled() -> bool:  # a pass has seen the claim
            return daemon.log_path.exists() and sandbox.id in (
                (daemon.workspace.parent / "state" / "records.json").read_text()
                if (daemon.workspace.parent / "state" / "records.json").exists()
                else ""
            )

        await eventually(journaled, what="the claim in the journal")
        await redis.delete(KEYS.sandbox(sandbox.id))
        back = await wait_event(redis, "state.restored")
        assert back["data"]["records"] == 1 and back["data"]["claimed"] == 1
        assert (await SandboxStore(redis, KEYS).get(sandbox.id)).state == "claimed"
        assert await live_pids(daemon.workspace) >= before
        types = [e.get("type") for _, e in await redis.xrange(KEYS.events)]
        assert "sandbox.leaked" not in types
        await sandbox.release()
