"""Issue 21: the daemon's local actions never wait for Redis.

A stop terminates the node's sandboxes from its local registry when Redis is down, and a
sandbox that dies during an outage is reaped at once; what Redis should say about either
(records closed, events flagged `late`) is written when it answers again, in order, once.
Redis here is a server of the test's own (append-only, so it comes back with its data),
stopped and started again; the lease's TTL is 1 s, so each outage outlasts it.
"""

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from sandboxd.store.localredis import find_redis_server, start, wait_until_answering
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

# Redis' AOF keeps the first daemon's events: `wait_event` for daemon.started would find
# the first daemon's.

TIMEOUT_STOP_S = 15  # the unit's TimeoutStopSec=
SETTINGS = {"lease_ttl_s": 1, "reconcile_interval_s": 0.5, "janitor_interval_s": 0.5}


class OwnRedis:
    """A redis-server the test may stop and start again, with its data (AOF)."""

    def __init__(self, directory: Path):
        self.port = free_port()
        self.directory = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self) -> None:
        args = ("--appendonly", "yes", "--appendfsync", "always")
        self.proc = start(
            find_redis_server(), self.port, self.directory, daemonize=False, extra_args=args
        )
        wait_until_answering("127.0.0.1", self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path / "own-redis")
    server.start()
    yield server
    server.stop()


async def lapsed(daemon) -> bool:
    """The daemon said its lease lapsed (Redis has been away longer than the TTL), or it
    has exited (as it did before issue 21: the lease was lost, nothing done)."""
    said = any(e["message"].startswith("lease lapsed") for e in daemon.logs())
    return said or daemon.proc.poll() is not None


def registered(workspace: Path) -> list[str]:
    return sorted(p.name for p in workspace.iterdir() if p.is_dir()) if workspace.is_dir() else []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("outage", ["shorter than the lease", "past the lease"])
async def test_a_stop_with_redis_down_terminates_every_sandbox_and_closes_them_late(
    daemon_factory, own_redis, outage
):
    redis = Redis.from_url(own_redis.url, decode_responses=True)
    settings = SETTINGS if outage == "past the lease" else {**SETTINGS, "lease_ttl_s": 3}
    try:
        daemon = daemon_factory(redis_url=own_redis.url, **settings).start()
        await apply(redis, [{"name": "default", "min_ready": 3}])
        ids = sorted(await wait_ready(redis, "default", 3))
        await redis.aclose()
        own_redis.stop()
        if outage == "past the lease":
            await eventually(lambda: lapsed(daemon), what="the lease to lapse")
            assert daemon.proc.poll() is None  # cut off, not stopped

        began = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(TIMEOUT_STOP_S) == 0
        stop_s = time.monotonic() - began
        assert stop_s < TIMEOUT_STOP_S
        assert sandbox_processes(daemon.workspace) == []
        assert registered(daemon.workspace) == []
        messages = [e["message"] for e in daemon.logs()]
        assert any(m.startswith("Redis unreachable at stop") for m in messages)
        assert messages[-1] == "sandboxd stopped"
        print(f"stop with Redis down ({outage}): {stop_s:.2f}s")

        # Redis comes back with the records as they were: nothing has closed them yet.
        own_redis.start()
        redis = Redis.from_url(own_redis.url, decode_responses=True)
        assert sorted(await redis.smembers(KEYS.sandboxes)) == ids
        daemon_factory(redis_url=own_redis.url, **SETTINGS).start()

        async def second_start():
            started = await events_of(redis, "daemon.started")
            return started[1] if len(started) == 2 else None

        started = await eventually(second_start, what="the new daemon's daemon.started")
        # Written before adoption: nothing to reap, nothing adopted.
        assert (started["data"]["adopted"], started["data"]["dropped"]) == (0, 0)
        assert started["data"]["orphans"] == 0
        for sandbox_id in ids:
            assert not await redis.exists(KEYS.sandbox(sandbox_id))
        events = await events_of(redis)
        closed = [e for e in events if e["type"] == "sandbox.terminated" and e["sandbox"] in ids]
        assert sorted(e["sandbox"] for e in closed) == ids  # each once
        assert {(e["data"]["reason"], e["data"]["late"], e["data"]["state"]) for e in closed} == {
            ("shutdown", True, "ready")
        }
        stopping = [e for e in events if e["type"] == "daemon.stopping"]
        assert len(stopping) == 1 and stopping[0]["data"]["late"] is True
        assert stopping[0]["data"]["terminated"] == 3
        # In the order they happened, before the new daemon's first word; their times are
        # those of the stop, not of the writing.
        order = [e["type"] for e in events if e["data"].get("late")]
        assert order == ["sandbox.terminated"] * 3 + ["daemon.stopping"]
        position = {e["id"]: i for i, e in enumerate(events)}
        assert max(position[e["id"]] for e in closed) < position[started["id"]]
        assert max(e["time"] for e in closed) < started["time"]
    finally:
        await redis.aclose()


@pytest.mark.timeout(60)
async def test_a_sandbox_killed_while_redis_is_down_is_reaped_and_replaced_when_redis_answers(
    daemon_factory, own_redis
):
    redis = Redis.from_url(own_redis.url, decode_responses=True)
    # A janitor sweeping often: it must find the dead sandbox's record closed (late), not
    # `lost`, however soon after Redis answers it sweeps.
    settings = {**SETTINGS, "janitor_interval_s": 0.05}
    try:
        daemon = daemon_factory(redis_url=own_redis.url, **settings).start()
        await apply(redis, [{"name": "default", "min_ready": 2}])
        victim, survivor = sorted(await wait_ready(redis, "default", 2))
        await redis.aclose()
        own_redis.stop()
        await eventually(lambda: lapsed(daemon), what="the lease to lapse")
        assert daemon.proc.poll() is None  # cut off, not stopped

        meta = json.loads((daemon.workspace / victim / "meta.json").read_text())
        os.kill(meta["pid"], signal.SIGKILL)

        async def reaped():  # and said so, once its closing is on disk (the outbox)
            said = [e for e in daemon.logs() if e["message"].startswith("sandbox died while")]
            return said and victim not in registered(daemon.workspace)

        await eventually(reaped, what="the dead sandbox reaped from the registry")
        said = [e for e in daemon.logs() if e["message"].startswith("sandbox died while Redis")]
        assert [e["sandbox"] for e in said] == [victim]
        assert registered(daemon.workspace) == [survivor]
        own_redis.start()
        redis = Redis.from_url(own_redis.url, decode_responses=True)
        closed = await wait_event(redis, "sandbox.terminated", sandbox=victim)
        assert closed["data"]["reason"] == "died" and closed["data"]["late"] is True
        recovered = await wait_event(redis, "recovery.succeeded", old=victim)
        replacement = recovered["data"]["new"]
        assert replacement not in (victim, survivor)
        assert sorted(await wait_ready(redis, "default", 2)) == sorted([survivor, replacement])
        assert not await redis.exists(KEYS.sandbox(victim))
        events = await events_of(redis, "sandbox.terminated")
        assert [e["sandbox"] for e in events] == [victim]  # once, and nothing else closed
        assert daemon.proc.poll() is None  # the same daemon, the same lease again
        assert len(sandbox_processes(daemon.workspace)) == 2
    finally:
        await redis.aclose()


@pytest.mark.timeout(60)
async def test_keep_keeps_them_with_redis_down_and_the_next_start_adopts_them(
    daemon_factory, own_redis
):
    redis = Redis.from_url(own_redis.url, decode_responses=True)
    settings = {**SETTINGS, "on_shutdown": "keep"}
    try:
        daemon = daemon_factory(redis_url=own_redis.url, **settings).start()
        await apply(redis, [{"name": "default", "min_ready": 2}])
        ids = sorted(await wait_ready(redis, "default", 2))
        await redis.aclose()
        own_redis.stop()
        await eventually(lambda: lapsed(daemon), what="the lease to lapse")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(TIMEOUT_STOP_S) == 0
        assert len(sandbox_processes(daemon.workspace)) == 2
        assert registered(daemon.workspace) == ids

        own_redis.start()
        redis = Redis.from_url(own_redis.url, decode_responses=True)
        daemon_factory(redis_url=own_redis.url, **settings).start()

        async def second_start():
            started = await events_of(redis, "daemon.started")
            return started[1] if len(started) == 2 else None

        started = await eventually(second_start, what="the new daemon's daemon.started")
        assert (started["data"]["adopted"], started["data"]["dropped"]) == (2, 0)
        assert sorted(await wait_ready(redis, "default", 2)) == ids
        assert await events_of(redis, "sandbox.terminated") == []
        (stopping,) = await events_of(redis, "daemon.stopping")
        assert stopping["data"]["late"] is True and stopping["data"]["kept"] == 2
    finally:
        await redis.aclose()
