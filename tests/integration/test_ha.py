"""One writer per node: the node lease, the hot standby and fencing, with real daemon
processes against a real redis-server (issue 17).

Every test checks the same three things at the end: no sandbox held twice (processes ==
records, one record per process), no orphan (every live sandbox has a record), no duplicate
create (the pool is exactly at min_ready)."""

import asyncio
import contextlib
import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis

from sandboxd.store.fence import PASS_THROUGH
from sandboxd.store.records import SandboxStore
from tests.support import (
    E2B_TEST_KEY,
    KEYS,
    apply,
    cli,
    events_of,
    eventually,
    free_port,
    sandbox_processes,
    wait_event,
    wait_ready,
)

pytestmark = pytest.mark.skipif(shutil.which("redis-cli") is None, reason="needs redis-cli")
TTL = 2.0
POOL = {"name": "ha", "min_ready": 2, "max_total": 4}
EXIT_LEASE_LOST = 75


async def daemons(redis: Redis) -> dict[str, dict]:
    """instance -> its line in `<prefix>:daemons` (fresh ones only)."""
    lines = {k: json.loads(v) for k, v in (await redis.hgetall(KEYS.daemons)).items()}
    return {k: v for k, v in lines.items() if time.time() - v["heartbeat_at"] < 3}


async def active(redis: Redis, other_than: str | None = None) -> dict | None:
    found = [d for d in (await daemons(redis)).values() if d["role"] == "active"]
    found = [d for d in found if d["instance"] != other_than]
    return found[0] if len(found) == 1 else None


def instance_of(daemon) -> str:
    for line in daemon.logs():
        if line.get("message") == "sandboxd starting":
            return line["instance"]
    raise AssertionError("the daemon logged no start")


async def converged(redis: Redis, workspace: Path) -> None:
    """min_ready ready, one record per live sandbox process and one process per record."""

    async def check():
        records = await SandboxStore(redis, KEYS).records()
        pids = {int(r.handle.get("pid", 0)) for r in records}
        live = {p.pid for p in sandbox_processes(workspace)}
        ready = await redis.lrange(KEYS.pool_ready("ha"), 0, -1)
        ok = len(ready) == POOL["min_ready"] and len(records) == len(pids) == POOL["min_ready"]
        return ok and pids == live

    await eventually(check, timeout=30, what="the pool at min_ready, processes == records")


def ha_daemon(daemon_factory):
    return daemon_factory(lease_ttl_s=TTL, janitor_interval_s=0.5, lease_check_interval_s=0.5)


async def test_two_daemons_started_together_one_is_active_the_other_a_standby(
    redis, redis_server, daemon_factory
):
    first, second = ha_daemon(daemon_factory), ha_daemon(daemon_factory)
    first.start()
    second.start()
    await apply(redis, [POOL])

    async def one_each():
        roles = sorted(d["role"] for d in (await daemons(redis)).values())
        return roles == ["active", "standby"]

    await eventually(one_each, what="one active daemon and one standby")
    await converged(redis, first.workspace)
    standby = next(d for d in (await daemons(redis)).values() if d["role"] == "standby")
    leader = await active(redis)
    assert standby["active_instance"] == leader["instance"]
    assert standby["active_epoch"] == leader["epoch"] >= 1
    waiting = first if instance_of(first) == standby["instance"] else second
    messages = [line["message"] for line in waiting.logs()]
    assert any(m.startswith("standby: node") for m in messages)
    assert "sandboxd ready" not in messages  # it adopted, created and published nothing

    shown = json.loads(cli(redis_server, "status", "-o", "json").stdout)["daemons"]
    assert sorted((d["role"], d["epoch"]) for d in shown) == [
        ("active", leader["epoch"]),
        ("standby", 0),
    ]
    text = cli(redis_server, "status").stdout
    node_line = next(line for line in text.splitlines() if line.startswith("node "))
    assert f"active {leader['instance']}" in node_line and f"epoch {leader['epoch']}" in node_line
    assert f"standby {standby['instance']}" in node_line


async def test_a_killed_active_daemon_is_replaced_by_its_standby_with_the_same_sandboxes(
    redis, daemon_factory
):
    first = ha_daemon(daemon_factory).start()
    await apply(redis, [POOL])
    ids = set(await wait_ready(redis, "ha", 2))
    old = await eventually(lambda: active(redis), what="the first daemon active")
    second = ha_daemon(daemon_factory).start()

    async def standing_by():
        return any(d["role"] == "standby" for d in (await daemons(redis)).values())

    await eventually(standing_by, what="the second daemon to stand by")
    first.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    new = await eventually(
        lambda: active(redis, other_than=old["instance"]), timeout=15, what="the takeover"
    )
    took_s = time.monotonic() - killed_at
    assert new["epoch"] == old["epoch"] + 1
    assert took_s < TTL + 2.0, f"takeover took {took_s:.1f}s with a {TTL}s lease"
    await converged(redis, second.workspace)
    assert set(await redis.lrange(KEYS.pool_ready("ha"), 0, -1)) == ids  # adopted, not new
    assert second.proc.poll() is None


class Monitor:
    """`redis-cli MONITOR` into a file: every command Redis executes, with its client."""

    LINE = re.compile(r"^[\d.]+ \[\d+ (?P<addr>[^\]]+)\] (?P<args>.*)$")

    def __init__(self, port: int, path: Path):
        self.path = path
        self._out = open(path, "wb")
        self.proc = subprocess.Popen(
            ["redis-cli", "-p", str(port), "monitor"], stdout=self._out, stderr=subprocess.STDOUT
        )

    def stop(self) -> list[tuple[str, list[str]]]:
        self.proc.terminate()
        self.proc.wait(5)
        self._out.close()
        found = []
        for line in self.path.read_text(errors="replace").splitlines():
            match = self.LINE.match(line)
            if match:
                args = re.findall(r'"((?:[^"\\]|\\.)*)"', match["args"])
                found.append((match["addr"], args))
        return found


async def addresses_of(redis: Redis, instance: str) -> set[str]:
    clients = await redis.client_list()
    return {c["addr"] for c in clients if c.get("name", "").endswith(f":{instance}")}


def unfenced_writes(commands, instance: str, addrs: set[str], token: str) -> list[list[str]]:
    """Commands of the daemon `instance` (from `addrs`, or from a connection that named
    itself after it) that could have written without carrying `token`."""
    addrs = set(addrs)
    found = []
    for addr, args in commands:
        if not args:
            continue
        name = args[0].upper()
        if name == "CLIENT" and len(args) > 2 and args[1].upper() == "SETNAME":
            if args[2].endswith(f":{instance}"):
                addrs.add(addr)
            continue
        if addr not in addrs:
            continue
        if name in PASS_THROUGH:
            continue
        if name in ("EVAL", "EVALSHA") and token in args:
            continue  # fenced: refused by Redis unless the token still holds the lease
        found.append(args)
    return found


async def test_a_paused_daemon_writes_nothing_as_its_old_epoch_and_exits(
    redis, redis_server, daemon_factory, tmp_path
):
    first = ha_daemon(daemon_factory).start()
    await apply(redis, [POOL])
    await wait_ready(redis, "ha", 2)
    old = await eventually(lambda: active(redis), what="the first daemon active")
    token = await redis.get(KEYS.node_lease(old["node"]))
    second = ha_daemon(daemon_factory).start()
    first.signal(signal.SIGSTOP)
    try:
        await eventually(
            lambda: active(redis, other_than=old["instance"]), timeout=15, what="the takeover"
        )
        await converged(redis, second.workspace)
        addrs = await addresses_of(redis, old["instance"])
        monitor = Monitor(int(redis_server.rsplit(":", 1)[1].split("/")[0]), tmp_path / "mon")
        await asyncio.sleep(0.2)  # let MONITOR attach before the old daemon wakes
    finally:
        first.signal(signal.SIGCONT)
    code = await asyncio.to_thread(first.wait, 20)
    commands = monitor.stop()
    assert code == EXIT_LEASE_LOST
    assert unfenced_writes(commands, old["instance"], addrs, token) == []
    assert any("lease lost" in line.get("message", "") for line in first.logs())
    await converged(redis, second.workspace)
    assert second.proc.poll() is None


class FreezableProxy:
    """A TCP proxy to Redis on loopback that the test can freeze: bytes stop flowing both
    ways while the connections stay open (a network partition, as the daemon sees it)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> "FreezableProxy":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        for task in (self._pipe(reader, up_writer), self._pipe(up_reader, writer)):
            made = asyncio.create_task(task)
            self._tasks.add(made)
            made.add_done_callback(self._tasks.discard)

    async def _pipe(self, reader, writer) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()


async def test_a_daemon_cut_from_redis_is_replaced_and_its_late_writes_are_refused(
    redis, redis_server, daemon_factory, tmp_path
):
    port = int(redis_server.rsplit(":", 1)[1].split("/")[0])
    async with FreezableProxy(port) as proxy:
        first = daemon_factory(
            redis_url=f"redis://127.0.0.1:{proxy.port}/0",
            lease_ttl_s=TTL,
            janitor_interval_s=0.5,
            lease_check_interval_s=0.5,
        ).start()
        await apply(redis, [POOL])
        await wait_ready(redis, "ha", 2)
        old = await eventually(lambda: active(redis), what="the first daemon active")
        token = await redis.get(KEYS.node_lease(old["node"]))
        addrs = await addresses_of(redis, old["instance"])
        second = ha_daemon(daemon_factory).start()
        proxy.flowing.clear()  # the partition
        await eventually(
            lambda: active(redis, other_than=old["instance"]), timeout=15, what="the takeover"
        )
        await converged(redis, second.workspace)
        monitor = Monitor(port, tmp_path / "mon")
        await asyncio.sleep(0.2)
        proxy.flowing.set()  # healed: whatever the first daemon had sent arrives now
        code = await asyncio.to_thread(first.wait, 30)
        commands = monitor.stop()
    assert code == EXIT_LEASE_LOST
    assert unfenced_writes(commands, old["instance"], addrs, token) == []
    await converged(redis, second.workspace)
    assert second.proc.poll() is None


async def test_a_killed_cloud_leader_is_followed_by_a_daemon_that_adopts_its_e2b_sandboxes(
    redis, daemon_factory, fake_e2b
):
    """Cloud pools are not tied to a host: one daemon among all nodes leads them. Two nodes;
    the leader is killed; the other node's daemon takes the lead and adopts the E2B
    sandboxes from E2B's listing, creating none twice."""

    def node(name: str):
        daemon = daemon_factory(
            node=name,
            lease_ttl_s=TTL,
            e2b={"api_url": fake_e2b.url, "sandbox_url": fake_e2b.url, "list_interval_s": 0.5},
        )
        daemon.env["E2B_API_KEY"] = E2B_TEST_KEY
        return daemon

    first = node("a").start()
    await apply(redis, [{"name": "cloud", "provider": "e2b", "min_ready": 2, "max_total": 4}])
    ids = set(await wait_ready(redis, "cloud", 2))
    second = node("b").start()

    async def both_active():
        found = {d["node"]: d for d in (await daemons(redis)).values() if d["role"] == "active"}
        return found if set(found) == {"a", "b"} else None

    roles = await eventually(both_active, what="a daemon active for each node")
    assert await redis.get(KEYS.leader) == f"{roles['a']['epoch']}:{roles['a']['instance']}"
    first.signal(signal.SIGKILL)
    leading = await wait_event(redis, "daemon.leading", timeout=20)
    assert leading["data"]["node"] == "b" and leading["data"]["adopted"] == 2
    assert set(await wait_ready(redis, "cloud", 2)) == ids
    assert len(fake_e2b.ours()) == 2  # nothing created twice
    assert not await events_of(redis, "sandbox.terminated")
    assert second.proc.poll() is None


async def test_a_daemon_with_another_registry_refuses_to_stand_in_for_the_node(
    redis, daemon_factory, tmp_path
):
    """A `make run` beside the service: same node, another workspace_root. Taking over would
    orphan the service's sandboxes, so it refuses (exit 78, which systemd does not restart)."""
    ha_daemon(daemon_factory).start()
    await apply(redis, [POOL])
    ids = set(await wait_ready(redis, "ha", 2))
    other = daemon_factory(lease_ttl_s=TTL, local={"workspace_root": str(tmp_path / "other")})
    other.start()
    assert await asyncio.to_thread(other.wait, 20) == 78
    said = [line["message"] for line in other.logs()]
    assert any("cannot be its standby" in m for m in said)
    assert set(await redis.lrange(KEYS.pool_ready("ha"), 0, -1)) == ids


async def standby_and_active(redis, daemon_factory):
    first = ha_daemon(daemon_factory).start()
    await apply(redis, [POOL])
    await wait_ready(redis, "ha", 2)
    old = await eventually(lambda: active(redis), what="the first daemon active")
    second = ha_daemon(daemon_factory).start()

    async def standing_by():
        return any(d["role"] == "standby" for d in (await daemons(redis)).values())

    await eventually(standing_by, what="the second daemon to stand by")
    return first, second, old


async def test_a_flushdb_leaves_the_active_daemon_active(redis, daemon_factory):
    """The lease vanishes before it would run out: its holder takes it again at once; the
    standby does not take it before it would have run out, so the two never act at once."""
    first, second, old = await standby_and_active(redis, daemon_factory)
    await redis.flushdb()
    back = await eventually(lambda: active(redis), timeout=15, what="an active daemon again")
    assert back["instance"] == old["instance"]
    await converged(redis, first.workspace)
    assert first.proc.poll() is None and second.proc.poll() is None
    assert any("taken again" in line.get("message", "") for line in first.logs())


async def test_a_forged_lease_stops_the_holder_and_the_standby_says_so(
    redis, daemon_factory, redis_server, tmp_path
):
    """A lease no daemon wrote (no time to live): the active daemon's writes are refused and
    it exits; the standby does not take it, does not spin on it, and says so once."""
    first, second, old = await standby_and_active(redis, daemon_factory)
    standby = next(d for d in (await daemons(redis)).values() if d["role"] == "standby")
    port = int(redis_server.rsplit(":", 1)[1].split("/")[0])
    monitor = Monitor(port, tmp_path / "mon")
    await asyncio.sleep(0.2)
    await redis.set(KEYS.node_lease(old["node"]), "99:forged")
    assert await asyncio.to_thread(first.wait, 15) == EXIT_LEASE_LOST

    async def said_so():
        return any("no time to live" in line.get("message", "") for line in second.logs())

    await eventually(said_so, what="the standby to say the lease looks forged")
    await asyncio.sleep(2)  # let a spinning standby show itself in MONITOR
    commands = monitor.stop()
    standby_beats = [
        args for _, args in commands if args[:3] == ["HSET", KEYS.daemons, standby["instance"]]
    ]
    assert len(standby_beats) < 20, f"the standby spun: {len(standby_beats)} beats"
    said = [line["message"] for line in second.logs()]
    assert sum("no time to live" in m for m in said) == 1
    assert second.proc.poll() is None
    assert len(sandbox_processes(second.workspace)) == 2  # nobody touched them
