"""Redis high availability with real processes: a primary, a replica and a Sentinel on free
loopback ports; the primary killed with SIGKILL; clients following the failover through a
redis+sentinel:// URL."""

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from sandboxd.store.connection import open_redis
from sandboxd.store.localredis import find_redis_server, wait_until_answering

from conftest import free_port
from helpers import eventually

SERVICE = "sbx"
pytestmark = pytest.mark.skipif(
    shutil.which("redis-sentinel") is None, reason="needs redis-sentinel (apt redis-sentinel)"
)


@dataclass
class Replicated:
    """A primary, one replica and one Sentinel (quorum 1) watching them."""

    directory: Path
    primary: int = field(default_factory=free_port)
    replica: int = field(default_factory=free_port)
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
        replica = Redis(port=self.replica, decode_responses=True)
        try:
            info = await replica.info("replication")
            return info.get("master_link_status") == "up"
        finally:
            await replica.aclose()

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
        assert await client.wait(1, 1000) == 1
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
