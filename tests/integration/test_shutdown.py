"""SIGTERM: stop reconciling, then terminate or keep the sandboxes, then exit 0."""

import signal

from tests.support import KEYS, apply, events_of, sandbox_processes, wait_event, wait_ready


async def test_sigterm_terminates_every_sandbox(redis, daemon_factory):
    daemon = daemon_factory().start()
    await apply(redis, [{"name": "default", "min_ready": 3}])
    await wait_ready(redis, "default", 3)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    stopping = (await events_of(redis, "daemon.stopping"))[-1]
    assert stopping["data"]["terminated"] == 3 and stopping["data"]["on_shutdown"] == "terminate"
    assert await redis.scard(KEYS.sandboxes) == 0
    assert await redis.get(KEYS.daemon) is None
    assert sandbox_processes(daemon.workspace) == []
    assert list(daemon.workspace.iterdir()) == []
    messages = [line["message"] for line in daemon.logs()]
    assert messages[-1] == "sandboxd stopped"


async def test_keep_leaves_sandboxes_for_the_next_daemon(redis, daemon_factory):
    first = daemon_factory(on_shutdown="keep").start()
    await apply(redis, [{"name": "default", "min_ready": 2}])
    ids = sorted(await wait_ready(redis, "default", 2))
    first.signal(signal.SIGINT)
    assert first.wait() == 0
    assert len(sandbox_processes(first.workspace)) == 2
    daemon_factory().start()
    await wait_event(redis, "daemon.started", adopted=2)
    assert sorted(await redis.lrange(KEYS.pool_ready("default"), 0, -1)) == ids


async def test_sigterm_with_more_sandboxes_than_redis_connections_leaks_none(redis, daemon_factory):
    # Stopping them all at once once failed with "Too many connections" and left them all.
    daemon = daemon_factory(max_concurrent_creates=16).start()
    await apply(redis, [{"name": "default", "min_ready": 110, "max_total": 110}])
    await wait_ready(redis, "default", 110, timeout=120)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    stopping = (await events_of(redis, "daemon.stopping"))[-1]
    assert stopping["data"]["terminated"] == 110
    assert sandbox_processes(daemon.workspace) == []
