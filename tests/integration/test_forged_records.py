"""A forged Redis record never makes the root daemon kill a host process or delete a path
(issue: a record whose handle named pid 1 and `workspace_root/..` made the daemon kill that
process tree and remove the directory)."""

import subprocess

import psutil

from sandboxd.store.records import SandboxRecord, SandboxStore
from tests.support import KEYS, apply, cli, wait_event, wait_ready


async def test_a_forged_record_is_closed_without_touching_what_it_names(
    redis, daemon_factory, tmp_path
):
    daemon = daemon_factory().start()
    await apply(redis, [{"name": "p", "min_ready": 1}])
    await wait_ready(redis, "p", 1)
    victim = subprocess.Popen(["sleep", "120"])
    precious = daemon.workspace.parent  # the parent of workspace_root, as in the report
    (precious / "keep-me").write_text("still here")
    try:
        for sandbox_id, pool in (("sb-forged0000000001", "gone-pool"), ("sb-forged000000002", "p")):
            forged = SandboxRecord(
                id=sandbox_id,
                pool=pool,
                provider="local",
                state="ready",
                template="base",
                spec_revision=1,
                instance="attacker",
                handle={
                    "pid": victim.pid,
                    "create_time": psutil.Process(victim.pid).create_time(),
                    "dir": str(daemon.workspace / ".."),
                    "socket": "/var/run/docker.sock",
                },
            )
            await SandboxStore(redis, KEYS).add(forged)
            await wait_event(redis, "sandbox.terminated", sandbox=sandbox_id)
        assert victim.poll() is None, "the daemon killed a process a Redis record named"
        assert (precious / "keep-me").read_text() == "still here"
        assert daemon.workspace.is_dir()
        assert daemon.proc.poll() is None
        # The pool's real sandbox is untouched.
        assert len(await wait_ready(redis, "p", 1)) == 1
    finally:
        victim.kill()
        victim.wait()


async def test_a_forged_stream_entry_is_skipped_by_the_daemon_and_the_cli(
    redis, redis_server, daemon_factory
):
    """Whoever may append to the event stream (every client) cannot stop the daemon's event
    tail (which feeds metrics) nor `sandboxd events` with an entry that is not an event."""
    daemon = daemon_factory().start()
    await apply(redis, [{"name": "p", "min_ready": 1}])
    await wait_ready(redis, "p", 1)
    await redis.xadd(KEYS.events, {"type": "bogus", "data": "not json"})
    await redis.xadd(KEYS.events, {"nothing": "useful"})
    await apply(redis, [{"name": "p", "min_ready": 2}])  # events after the bad ones
    await wait_ready(redis, "p", 2)
    assert daemon.proc.poll() is None
    done = cli(redis_server, "events", "-n", "50")
    assert done.returncode == 0 and "Traceback" not in done.stderr
    assert "sandbox.ready" in done.stdout and "not a sandboxd event" in done.stderr


async def test_a_stream_at_its_largest_id_is_replaced_and_reconciling_goes_on(
    redis, daemon_factory
):
    """An entry with the largest possible id makes every XADD after it fail: the daemon
    replaces the stream (saying so) instead of failing every pass."""
    daemon = daemon_factory().start()
    await apply(redis, [{"name": "p", "min_ready": 1}])
    await wait_ready(redis, "p", 1)
    await redis.xadd(KEYS.events, {"x": "y"}, id="18446744073709551615-18446744073709551615")
    await apply(redis, [{"name": "p", "min_ready": 3}])
    await wait_ready(redis, "p", 3)
    corrupt = await wait_event(redis, "state.corrupt", key=KEYS.events)
    assert corrupt["data"]["action"] == "deleted and started anew"
    assert daemon.proc.poll() is None
