"""The daemon waits for Redis at start, and survives Redis going away while it runs."""

import json

from redis.asyncio import Redis

from sandboxd.store.localredis import find_redis_server, start, wait_until_answering
from sandboxd.store.records import SandboxStore
from tests.support import (
    KEYS,
    apply,
    events_of,
    eventually,
    free_port,
    sandbox_processes,
    wait_event,
    wait_ready,
)


async def test_waits_for_redis_then_serves_and_survives_a_restart(daemon_factory, tmp_path):
    port = free_port()
    url = f"redis://:s3cretpass@127.0.0.1:{port}/0"
    daemon = daemon_factory(redis_url=url, janitor_interval_s=0.3).start()

    async def waiting_logged():
        return [e for e in daemon.logs() if e["message"].startswith("waiting for Redis")]

    await eventually(waiting_logged, what="`waiting for Redis` in the log")
    server = _start_with_password(port, tmp_path)
    redis = Redis.from_url(url, decode_responses=True)
    try:
        wait_until_answering("127.0.0.1", port)
        await apply(redis, [{"name": "default", "min_ready": 2}])
        before = await wait_ready(redis, "default", 2)
        # Redis goes away and loses everything (no persistence): the daemon keeps serving,
        # writes back the spec and the records of its running sandboxes (nothing is reaped),
        # and then follows what the operator applies next.
        server.terminate()
        server.wait(10)
        server = _start_with_password(port, tmp_path)
        wait_until_answering("127.0.0.1", port)
        await redis.aclose()
        redis = Redis.from_url(url, decode_responses=True)
        restored = await wait_event(redis, "state.restored", timeout=30)
        assert restored["data"]["records"] == 2 and restored["data"]["spec_revision"] == 1
        assert sorted(await wait_ready(redis, "default", 2)) == sorted(before)
        applied = await apply(redis, [{"name": "default", "min_ready": 1, "max_total": 1}])

        async def one_left():
            records = await SandboxStore(redis, KEYS).records()
            return records if len(records) == 1 and records[0].state == "ready" else None

        (record,) = await eventually(one_left, what="the pool down to the one sandbox applied")
        assert record.id in before  # one of the same sandboxes, not a new one
        assert not await events_of(redis, "sandbox.leaked")
        live = sandbox_processes(daemon.workspace)
        assert [p.pid for p in live] == [record.handle["pid"]]

        async def beat_in_force():
            beat = await redis.get(KEYS.daemon)
            return beat and json.loads(beat)["revision"] == applied

        await eventually(beat_in_force, what=f"the heartbeat at revision {applied}")
        assert daemon.proc.poll() is None
        text = daemon.log_path.read_text()
        assert "s3cretpass" not in text and "***" in text
    finally:
        await redis.aclose()
        daemon.stop()
        server.terminate()
        server.wait(10)


def _start_with_password(port: int, tmp_path):
    return start(
        find_redis_server(),
        port,
        tmp_path / "r",
        daemonize=False,
        extra_args=("--requirepass", "s3cretpass"),
    )
