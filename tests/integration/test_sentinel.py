"""Redis high availability with real processes: a primary, a replica and a Sentinel on free
loopback ports; the primary killed with SIGKILL; clients following the failover through a
redis+sentinel:// URL."""

import asyncio
import collections
import contextlib
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from sandboxd.client import ClaimError, Client
from sandboxd.store.connection import open_redis
from sandboxd.store.localredis import find_redis_server, wait_until_answering
from sandboxd.store.records import SandboxStore
from tests.support import KEYS, apply, eventually, free_port, sandbox_processes, wait_ready

SERVICE = "sbx"
pytestmark = pytest.mark.skipif(
    shutil.which("redis-sentinel") is None, reason="needs redis-sentinel (apt redis-sentinel)"
)


@dataclass
class Replicated:
    """A primary, two replicas and one Sentinel (quorum 1) watching them: after a failover
    one replica is the primary and the other replicates from it."""

    directory: Path
    primary: int = field(default_factory=free_port)
    replica: int = field(default_factory=free_port)
    second_replica: int = field(default_factory=free_port)
    sentinel: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel}/{SERVICE}/0"

    @staticmethod
    def _spawn(argv: list[str], log) -> subprocess.Popen:
        return subprocess.Popen(argv, stdout=log, stderr=log)

    def _server(self, name: str, port: int, *extra: str) -> None:
        work = self.directory / name
        work.mkdir(exist_ok=True)
        with open(work / "log", "ab") as log:  # the server keeps its own copy of the fd
            self.procs[name] = self._spawn(
            [
                find_redis_server() or "redis-server",
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(work),
                *extra,
            ], log)  # fmt: skip
        wait_until_answering("127.0.0.1", port)

    def start(self) -> "Replicated":
        self._server("primary", self.primary)
        self._server("replica", self.replica, "--replicaof", "127.0.0.1", str(self.primary))
        self._server(
            "replica2",
            self.second_replica,
            "--replicaof",
            "127.0.0.1",
            str(self.primary),
            "--replica-priority",
            "200",  # the first replica is the one promoted
        )
        conf = self.directory / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel}\nbind 127.0.0.1\ndir {self.directory}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 5000\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        with open(self.directory / "sentinel.log", "ab") as log:
            self.procs["sentinel"] = self._spawn(["redis-sentinel", str(conf)], log)
        wait_until_answering("127.0.0.1", self.sentinel)
        return self

    async def primary_port(self) -> int | None:
        sentinel = Redis(port=self.sentinel, decode_responses=True)
        try:
            found = await sentinel.execute_command("SENTINEL", "get-master-addr-by-name", SERVICE)
            return int(found[1]) if found else None
        finally:
            await sentinel.aclose()

    async def replicas_in_sync(self) -> bool:
        for port in (self.replica, self.second_replica):
            replica = Redis(port=port, decode_responses=True)
            try:
                info = await replica.info("replication")
            finally:
                await replica.aclose()
            if info.get("master_link_status") != "up":
                return False
        return True

    def kill_primary(self) -> None:
        self.procs["primary"].kill()
        self.procs["primary"].wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def replicated(tmp_path):
    (tmp_path / "ha").mkdir()
    cluster = Replicated(tmp_path / "ha").start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_a_client_of_a_sentinel_url_follows_a_failover(replicated):
    await eventually(replicated.replicas_in_sync, what="the replica to sync")
    client = open_redis(replicated.url, socket_timeout=5)
    try:
        assert await client.set("k", "before")
        assert await client.wait(1, 1000) >= 1
        replicated.kill_primary()
        killed = time.monotonic()

        async def failed_over():
            return await replicated.primary_port() == replicated.replica

        await eventually(failed_over, timeout=30, what="the Sentinel's failover")

        async def writes_again():
            try:
                return await client.set("k", "after")
            except (RedisError, OSError):  # the old primary is gone: retried until it moved
                return False

        await eventually(writes_again, timeout=30, what="a write on the new primary")
        took = time.monotonic() - killed
        assert await client.get("k") == "after"
        assert took < 20, f"the client followed the failover after {took:.1f}s"
    finally:
        await client.aclose()


@pytest.mark.timeout(180)
async def test_a_claim_storm_goes_on_through_a_failover_and_no_sandbox_is_held_twice(
    replicated, daemon_factory
):
    """The daemon, and clients claiming with claim_durability = replicated, all through the
    Sentinel URL; the primary is SIGKILLed in the middle of the storm."""
    await eventually(replicated.replicas_in_sync, what="the replica to sync")
    # A lease longer than a failover (~2.5 s here): the daemon rides it out instead of
    # restarting (which systemd would do, and it would adopt its sandboxes again).
    # 20 s: on a loaded machine a failover and the reconnect after it took longer than 8.
    daemon = daemon_factory(redis_url=replicated.url, lease_ttl_s=20).start()
    # Short leases: a release the old primary took but never replicated leaves its sandbox
    # claimed on the new one until its lease runs out (docs/ha.md).
    pool = {"name": "storm", "min_ready": 4, "max_total": 10, "lease_s": 5}
    admin = open_redis(replicated.url, socket_timeout=5)
    await apply(admin, [pool])
    await wait_ready(admin, "storm", 4, timeout=60)
    held: dict[str, str] = {}  # sandbox id -> the claim holding it now
    doubles: list[str] = []
    outcomes: list[tuple[float, str]] = []
    failed_over = asyncio.Event()
    stop = asyncio.Event()

    async def claimant(n: int) -> None:
        client = Client.from_url(
            replicated.url, claim_durability="replicated", replication_timeout_ms=500
        )
        try:
            while not stop.is_set():
                try:
                    sandbox = await client.claim("storm", lease_s=5, timeout_s=1)
                except (ClaimError, RedisError, OSError) as exc:
                    outcomes.append((time.monotonic(), type(exc).__name__))
                    await asyncio.sleep(0.05)
                    continue
                if sandbox.id in held:
                    doubles.append(sandbox.id)
                held[sandbox.id] = sandbox.claim_id
                outcomes.append((time.monotonic(), "claimed"))
                await asyncio.sleep(0.05)
                del held[sandbox.id]
                with contextlib.suppress(ClaimError, RedisError, OSError):
                    await sandbox.release()
        finally:
            await client.aclose()

    async def killer() -> None:
        await asyncio.sleep(1.5)
        replicated.kill_primary()

        async def promoted():
            return await replicated.primary_port() == replicated.replica

        await eventually(promoted, timeout=30, what="the Sentinel's failover")
        failed_over.set()
        since = time.monotonic()

        async def claims_again():  # the storm goes on against the new primary
            assert daemon.proc.poll() is None, f"the daemon exited: {daemon.proc.returncode}"
            return sum(1 for at, what in outcomes if what == "claimed" and at > since) >= 20

        try:
            await eventually(claims_again, timeout=60, what="20 claims after the failover")
        except AssertionError as exc:  # say what the claims met meanwhile
            met = collections.Counter(what for at, what in outcomes if at > since)
            raise AssertionError(f"{exc}; since the failover: {dict(met)}") from None
        finally:
            stop.set()

    try:
        async with asyncio.TaskGroup() as group:
            for n in range(6):
                group.create_task(claimant(n))
            group.create_task(killer())
        assert doubles == []

        seen: list[str] = []  # the last look, for the failure's message

        async def converged():
            try:
                records = await SandboxStore(admin, KEYS).records()
                ready = await admin.lrange(KEYS.pool_ready("storm"), 0, -1)
            except (RedisError, OSError) as exc:  # the Sentinel may still be settling
                seen[:] = [f"Redis: {type(exc).__name__}"]
                return False
            live = {p.pid for p in sandbox_processes(daemon.workspace)}
            pids = {int(r.handle.get("pid", 0)) for r in records}
            states = sorted(r.state for r in records)
            seen[:] = [f"ready {len(ready)}, records {states}, pids {pids}, live {live}"]
            return len(ready) == 4 and pids == live and len(records) == len(ready)

        try:
            await eventually(converged, timeout=60, what="the pool back at min_ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last seen: {seen}, daemon {daemon.proc.poll()}") from None
        assert daemon.proc.poll() is None
    finally:
        await admin.aclose()
