"""Redis is input (issue 15): bad data, wrong types and lost derived keys never crash, hang or
strand anything; root tasks are restarted; stopping never hangs; the CLI refuses bad files;
env changes reach ready sandboxes. Real redis-server, real daemon, real sandboxes."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from redis.asyncio import Redis

from sandboxd.client import Client
from tests.support import (
    KEYS,
    apply,
    cli,
    events_of,
    eventually,
    sandbox_processes,
    wait_event,
    wait_ready,
)

DEEP = "[" * 1000 + "]" * 1000  # a 2 KB value


@pytest.fixture
async def raw_redis(redis_server):
    """A client that writes and reads bytes as they are (no decoding)."""
    client = Redis.from_url(redis_server)
    yield client
    await client.aclose()


def _no_traceback(daemon) -> None:
    text = daemon.log_path.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    assert "Redis unavailable" not in text, text[-3000:]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b'{"revision": 9, "pools": [{"name": "caf\xe9"}]}', "not valid UTF-8"),
        ('{"revision": 9, "pools": []}'.encode("utf-16"), "UTF-16"),
        (DEEP.encode(), "nested 1000 deep"),
    ],
    ids=["latin-1", "utf-16", "deep-json"],
)
async def test_a_spec_of_bad_bytes_is_rejected_and_the_previous_stays(
    redis, raw_redis, redis_server, daemon_factory, value, reason
):
    daemon = daemon_factory().start()
    revision = await apply(redis, [{"name": "default", "min_ready": 2}])
    before = sorted(await wait_ready(redis, "default", 2))
    await raw_redis.set(KEYS.spec, value)
    await redis.publish(KEYS.nudge, "manual")
    rejected = await wait_event(redis, "spec.rejected")
    assert any(reason in error for error in rejected["data"]["errors"]), rejected
    assert rejected["data"]["revision_in_force"] == revision
    assert json.loads(await redis.get(KEYS.spec_active))["revision"] == revision
    assert sorted(await redis.lrange(KEYS.pool_ready("default"), 0, -1)) == before
    # still reconciling: a later `sandboxd apply` (which reads the garbage too) is taken
    text = "pools:\n  - name: default\n    min_ready: 3\n"
    applied = await asyncio.to_thread(cli, redis_server, "apply", "-f", "-", stdin=text)
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.startswith(f"applied revision {revision + 1}")
    await wait_ready(redis, "default", 3)
    assert daemon.proc.poll() is None
    _no_traceback(daemon)


async def test_a_restart_with_a_deep_spec_in_redis_serves_and_stops(redis, daemon_factory):
    first = daemon_factory().start()
    revision = await apply(redis, [{"name": "default", "min_ready": 1}])
    await wait_ready(redis, "default", 1)
    assert first.stop() == 0
    await redis.set(KEYS.spec, DEEP)
    second = daemon_factory().start()
    await eventually(
        lambda: _started_after(redis, first), timeout=30, what="daemon.started after restart"
    )
    await wait_ready(redis, "default", 1)
    assert json.loads(await redis.get(KEYS.spec_active))["revision"] == revision
    second.signal(signal.SIGTERM)
    began = time.monotonic()
    assert await asyncio.to_thread(second.wait, 15) == 0
    assert time.monotonic() - began < 15
    _no_traceback(second)


async def _started_after(redis, first) -> bool:
    return len(await events_of(redis, "daemon.started")) >= 2


async def test_a_wrong_typed_record_field_is_quarantined(redis, daemon_factory):
    daemon = daemon_factory().start()
    await apply(redis, [{"name": "default", "min_ready": 2}])
    victim, other = sorted(await wait_ready(redis, "default", 2))
    pid = json.loads(await redis.hget(KEYS.sandbox(victim), "handle"))["pid"]
    await redis.hset(KEYS.sandbox(victim), "spec_revision", "abc")
    corrupt = await wait_event(redis, "state.corrupt", key=KEYS.sandbox(victim))
    assert corrupt["data"]["field"] == "spec_revision" and corrupt["data"]["reason"]
    assert "sandbox terminated" in corrupt["data"]["action"]
    assert not await redis.exists(KEYS.sandbox(victim))
    assert not await redis.sismember(KEYS.sandboxes, victim)
    assert not await redis.sismember(KEYS.pool_members("default"), victim)

    async def replaced():
        ids = await redis.lrange(KEYS.pool_ready("default"), 0, -1)
        return len(ids) == 2 and victim not in ids and other in ids

    await eventually(replaced, timeout=30, what="the pool back at min_ready")
    assert pid not in {p.pid for p in sandbox_processes(daemon.workspace)}
    assert len(await events_of(redis, "state.corrupt")) == 1
    assert daemon.proc.poll() is None
    _no_traceback(daemon)


async def test_a_claimant_of_bad_bytes_breaks_neither_cli_nor_daemon(
    redis, raw_redis, redis_server, daemon_factory
):
    first = daemon_factory(on_shutdown="keep").start()
    await apply(redis, [{"name": "default", "min_ready": 2}])
    victim, _ = sorted(await wait_ready(redis, "default", 2))
    assert first.stop() == 0
    await raw_redis.hset(KEYS.sandbox(victim), "claimant", b"\xff\xfeagent\xc3")
    for args in (["get", "sandboxes"], ["get", "sandboxes", "-o", "json"], ["get", "pools"]):
        result = await asyncio.to_thread(cli, redis_server, *args)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    daemon = daemon_factory().start()
    corrupt = await wait_event(redis, "state.corrupt", key=KEYS.sandbox(victim), timeout=30)
    assert corrupt["data"]["field"] == "claimant" and "UTF-8" in corrupt["data"]["reason"]
    await eventually(
        lambda: _ready_without(redis, victim, 2), timeout=30, what="pool back at min_ready"
    )
    assert daemon.proc.poll() is None
    _no_traceback(daemon)


async def _ready_without(redis, victim: str, count: int) -> bool:
    ids = await redis.lrange(KEYS.pool_ready("default"), 0, -1)
    return len(ids) == count and victim not in ids


async def test_wrong_typed_keys_are_reported_and_the_pool_still_fills(redis, daemon_factory):
    daemon = daemon_factory().start()
    revision = await apply(redis, [{"name": "default", "min_ready": 3}])
    victim, *_ = sorted(await wait_ready(redis, "default", 3))
    await redis.delete(KEYS.spec)
    await redis.hset(KEYS.spec, "x", "y")  # the operator's key: reported, kept in force
    await redis.delete(KEYS.sandbox(victim))
    await redis.set(KEYS.sandbox(victim), "not a hash")  # a record replaced by a string
    ready = await redis.lrange(KEYS.pool_ready("default"), 0, -1)
    await redis.delete(KEYS.pool_ready("default"))
    await redis.hset(KEYS.pool_ready("default"), "x", "y")  # a ready list replaced by a hash
    await redis.publish(KEYS.nudge, "manual")

    spec = await wait_event(redis, "state.corrupt", key=KEYS.spec)
    assert spec["data"]["key_type"] == "hash" and str(revision) in spec["data"]["action"]
    record = await wait_event(redis, "state.corrupt", key=KEYS.sandbox(victim))
    assert record["data"]["key_type"] == "string"
    listing = await wait_event(redis, "state.corrupt", key=KEYS.pool_ready("default"))
    assert listing["data"]["key_type"] == "hash"

    async def refilled():
        ids = await redis.lrange(KEYS.pool_ready("default"), 0, -1)
        return len(ids) == 3 and victim not in ids and set(ready) - {victim} <= set(ids)

    await eventually(refilled, timeout=30, what="3 ready again, the survivors kept")
    assert json.loads(await redis.get(KEYS.spec_active))["revision"] == revision
    assert len(await events_of(redis, "state.corrupt")) == 3  # once each, not every pass
    assert daemon.proc.poll() is None
    _no_traceback(daemon)


async def test_a_deleted_ready_list_is_rebuilt_and_claims_work(redis, redis_server, daemon_factory):
    daemon = daemon_factory().start()
    await apply(redis, [{"name": "p", "min_ready": 4, "max_total": 4}])
    ids = await wait_ready(redis, "p", 4)
    await redis.delete(KEYS.pool_ready("p"))
    repaired = await wait_event(redis, "state.repaired", what="ready_list", pool="p")
    assert repaired["data"]["added"] == 4
    # All back; oldest first by `ready_at` (sandboxes ready in the same instant may swap).
    rebuilt = await redis.lrange(KEYS.pool_ready("p"), 0, -1)
    assert sorted(rebuilt) == sorted(ids)
    ready_at = [await redis.hget(KEYS.sandbox(i), "ready_at") for i in rebuilt]
    assert ready_at == sorted(ready_at)
    async with Client.from_url(redis_server, owner="test") as client:
        claimed = [await client.claim("p", timeout_s=5) for _ in range(4)]
        assert sorted(s.id for s in claimed) == sorted(ids)
        pools = json.loads(
            (await asyncio.to_thread(cli, redis_server, "get", "pools", "-o", "json")).stdout
        )
        assert (pools[0]["ready"], pools[0]["claimed"]) == (0, 4)
        for sandbox in claimed:
            await sandbox.release()
    await wait_ready(redis, "p", 4)
    assert daemon.proc.poll() is None


async def test_lost_members_and_leases_are_rebuilt(redis, redis_server, daemon_factory):
    daemon_factory().start()
    await apply(redis, [{"name": "p", "min_ready": 2, "max_lease_s": 600}])
    await wait_ready(redis, "p", 2)
    async with Client.from_url(redis_server, owner="test") as client:
        sandbox = await client.claim("p", lease_s=600)
        await wait_ready(redis, "p", 2)  # the replacement: 3 records from here on
        deadline = await redis.zscore(KEYS.leases, sandbox.id)
        await redis.delete(KEYS.leases, KEYS.pool_members("p"))
        await redis.zadd(KEYS.leases, {"sb-0000000000000000": 2**50})  # names no claim
        leases = await wait_event(redis, "state.repaired", what="leases")
        assert (leases["data"]["added"], leases["data"]["removed"]) == (1, 1)
        members = await wait_event(redis, "state.repaired", what="members", pool="p")
        assert members["data"]["added"] == 3
        assert await redis.zrange(KEYS.leases, 0, -1, withscores=True) == [(sandbox.id, deadline)]
        await sandbox.release()


async def test_a_lower_revision_written_directly_is_not_applied(redis, daemon_factory):
    daemon_factory().start()
    await apply(redis, [{"name": "default", "min_ready": 1}])
    revision = await apply(redis, [{"name": "default", "min_ready": 2}])
    await wait_ready(redis, "default", 2)
    old = {"revision": revision - 1, "pools": [{"name": "default", "min_ready": 1}]}
    await redis.set(KEYS.spec, json.dumps(old))
    await redis.publish(KEYS.nudge, "manual")
    rejected = await wait_event(redis, "spec.rejected", revision=revision - 1)
    assert any("only move forward" in e for e in rejected["data"]["errors"])
    assert json.loads(await redis.get(KEYS.spec_active))["revision"] == revision
    # the next apply goes past what is in force, not past the old value now stored
    assert await apply(redis, [{"name": "default", "min_ready": 3}]) == revision + 1
    await wait_ready(redis, "default", 3)


async def test_a_failing_root_task_is_restarted(redis, embedded_daemon):
    daemon = await embedded_daemon()
    claims = daemon.wings.leases._claims
    real = claims.expire_due
    calls = {"n": 0}

    async def fails_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return await real(*args, **kwargs)

    claims.expire_due = fails_once
    restarted = await wait_event(redis, "daemon.task_restarted", task="leases")
    assert restarted["data"]["error"] == "RuntimeError: boom"
    assert restarted["data"]["restarts"] == 1
    await eventually(lambda: _async(calls["n"] >= 3), what="the lease loop running again")
    assert not daemon.stop.is_set() and daemon.fatal is None


async def test_an_essential_task_that_keeps_failing_stops_the_daemon(
    redis, embedded_daemon, monkeypatch
):
    from sandboxd import supervision

    monkeypatch.setattr(supervision, "FIRST_DELAY_S", 0.05)
    daemon = await embedded_daemon()

    async def always(*args, **kwargs):
        raise RuntimeError("broken for good")

    daemon.wings.leases._claims.expire_due = always
    await eventually(lambda: _async(daemon.stop.is_set()), what="the daemon giving up")
    assert daemon.fatal == "task leases keeps failing (RuntimeError: broken for good)"
    restarts = await events_of(redis, "daemon.task_restarted")
    assert len(restarts) == supervision.MAX_FAILURES - 1


async def _async(value):
    return value


STUCK_HARNESS = """
import pathlib, sys, time
from sandboxd import supervision
from sandboxd.control import reconciler

supervision.HardStop.__init__.__defaults__ = (3.0,)  # the unit's 13 s, shorter for the test

flag = pathlib.Path(sys.argv[1])
real = reconciler.Reconciler.reconcile_once

async def reconcile_once(self):
    if flag.exists():
        flag.with_suffix(".stuck").touch()
        time.sleep(3600)  # blocks the event loop itself: no cancellation can end it
    return await real(self)

reconciler.Reconciler.reconcile_once = reconcile_once
from sandboxd.cli.main import main
sys.exit(main(["--config", sys.argv[2], "run"]))
"""


async def test_sigterm_ends_a_daemon_stuck_in_a_blocking_call(redis, daemon_factory, tmp_path):
    daemon = daemon_factory()
    flag = tmp_path / "hang"
    log = open(daemon.log_path, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(STUCK_HARNESS), str(flag), str(daemon.config_path)],
        env=daemon.env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        await apply(redis, [{"name": "default", "min_ready": 1}])
        await wait_ready(redis, "default", 1)
        flag.touch()
        await redis.publish(KEYS.nudge, "manual")
        await eventually(lambda: _async(flag.with_suffix(".stuck").exists()), what="stuck")
        proc.send_signal(signal.SIGTERM)
        began = time.monotonic()
        code = await asyncio.to_thread(proc.wait, 16)
        assert 2.5 < time.monotonic() - began < 15  # the hard stop's, before TimeoutStopSec
        assert code == 1
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    lines = [
        json.loads(line) for line in daemon.log_path.read_text().splitlines() if line[:1] == "{"
    ]
    assert any("after SIGTERM: exiting now" in line["message"] for line in lines)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"[" * 2048, "(file): nested 2048 deep"),
        (b"pools:\n  - name: caf\xe9\n", "(file): not valid UTF-8"),
        ("pools: []".encode("utf-16"), "(file): not valid UTF-8 (UTF-16"),
        (b'pools:\n  - name: default\n    env: {A: "a\\0b"}\n', "env.A: must not contain NUL"),
        (b"- " * 1000 + b"x\n", "(file): nested too deeply"),
    ],
    ids=["deep", "latin-1", "utf-16", "nul", "deep-yaml"],
)
async def test_cli_apply_refuses_bad_files_with_exit_2(
    redis, redis_server, tmp_path, content, expected
):
    spec_file = tmp_path / "bad.yaml"
    spec_file.write_bytes(content)
    result = await asyncio.to_thread(cli, redis_server, "apply", "-f", str(spec_file))
    assert result.returncode == 2, result
    assert expected in result.stderr and "nothing applied" in result.stderr
    assert "Traceback" not in result.stderr
    assert await redis.get(KEYS.spec) is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
async def test_a_signal_to_cli_exec_releases_the_claim(redis, redis_server, daemon_factory, sig):
    daemon_factory().start()
    await apply(redis, [{"name": "default", "min_ready": 1}])
    await wait_ready(redis, "default", 1)
    env = {"SANDBOXD_REDIS_URL": redis_server, "PATH": os.environ["PATH"]}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandboxd", "exec", "default", "--", "sleep", "600"],
        env=env,
        stderr=subprocess.PIPE,
    )
    claimed = await wait_event(redis, "sandbox.claimed")
    proc.send_signal(sig)
    assert await asyncio.to_thread(proc.wait, 20) == 128 + sig
    with proc.stderr:
        stderr = proc.stderr.read()
    assert b"Traceback" not in stderr and b"stopped by" in stderr
    released = await wait_event(redis, "sandbox.released", sandbox=claimed["sandbox"])
    assert released["data"]["forced"] is False


async def test_an_env_change_rolls_ready_sandboxes_over(redis, redis_server, daemon_factory):
    daemon_factory().start()
    pool = {"name": "default", "min_ready": 3, "max_total": 4, "max_surge": 1}
    first = await apply(redis, [{**pool, "env": {"GREETING": "old"}}])
    old = set(await wait_ready(redis, "default", 3))
    second = await apply(redis, [{**pool, "env": {"GREETING": "new"}}])

    async def rolled():
        ids = set(await redis.lrange(KEYS.pool_ready("default"), 0, -1))
        return len(ids) == 3 and not ids & old

    await eventually(rolled, timeout=60, what="every ready sandbox replaced")

    async def reasons():
        gone = await events_of(redis, "sandbox.terminated")
        found = {e["sandbox"]: e["data"]["reason"] for e in gone if e["sandbox"] in old}
        return found if len(found) == len(old) else None

    assert await eventually(reasons, what="the old ones gone") == dict.fromkeys(old, "spec_changed")
    # make-before-break within max_total: never more than 4 at once
    scaled = await events_of(redis, "pool.scaled")
    assert max(e["data"]["to_total"] for e in scaled) <= 4
    async with Client.from_url(redis_server, owner="test") as client:
        async with client.claim("default") as sandbox:
            result = await sandbox.exec(["sh", "-c", "echo $GREETING"])
            assert result.stdout == b"new\n"
    rows = json.loads(
        (await asyncio.to_thread(cli, redis_server, "get", "sandboxes", "-o", "json")).stdout
    )
    assert rows and {row["spec_revision"] for row in rows} == {second}
    table = (await asyncio.to_thread(cli, redis_server, "get", "sandboxes")).stdout
    assert "REV" in table.splitlines()[0] and first != second
