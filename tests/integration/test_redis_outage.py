"""The daemon waits for Redis at start, and survives Redis going away while it runs."""

import json

from redis.asyncio import Redis

from sandboxd.localredis import find_redis_server, start, wait_until_answering
from sandboxd.state import SandboxStore

from conftest import free_port, sandbox_processes
from helpers import KEYS, apply, eventually, wait_event, wait_ready


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
        # and the janitor terminates the sandboxes nobody has a record of any more.
        server.terminate()
        server.wait(10)
        server = _start_with_password(port, tmp_path)
        wait_until_answering("127.0.0.1", port)
        await redis.aclose()
        redis = Redis.from_url(url, decode_responses=True)
        await apply(redis, [{"name": "default", "min_ready": 1}])
        (after,) = await wait_ready(redis, "default", 1)
        for sandbox in before:
            leaked = await wait_event(redis, "sandbox.leaked", sandbox=sandbox)
            assert leaked["data"] == {"provider": "local", "verified_gone": True}
        live = sandbox_processes(daemon.workspace)
        records = await SandboxStore(redis, KEYS).records()
        assert [r.id for r in records] == [after]
        assert [p.pid for p in live] == [records[0].handle["pid"]]
        beat = await eventually(lambda: redis.get(KEYS.daemon), what="heartbeat")
        assert json.loads(beat)["revision"] == 1
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
