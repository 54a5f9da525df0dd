"""config/redis-acl.conf on a real redis-server: the client user claims, renews, releases and
reads, and nothing more; the daemon user runs the real daemon; the default user is off.

Each test starts its own redis-server (the shared one has no ACL) with a copy of the
shipped file whose password hashes are filled in, plus a test-only admin user that reads
`ACL LOG` (every command the ACL refused) and snapshots the keys.
"""

import asyncio
import hashlib
import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis import Redis as SyncRedis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from sandboxd.client import ClaimError, ClaimTimeout, Client
from sandboxd.spec import PoolSpec
from sandboxd.store.claims import ClaimStore
from sandboxd.store.events import EventPublisher
from sandboxd.store.localredis import answers, find_redis_server
from sandboxd.store.records import SandboxRecord, SandboxStore
from tests.support import (
    E2B_TEST_KEY,
    KEYS,
    apply,
    cli,
    events_of,
    free_port,
    wait_event,
    wait_ready,
)

ACL_FILE = Path(__file__).parents[2] / "config" / "redis-acl.conf"


@dataclass
class AclRedis:
    port: int
    daemon_password: str
    client_password: str
    admin_password: str
    api_password: str
    proc: subprocess.Popen

    def url(self, user: str, password: str | None = None) -> str:
        secret = {
            "sandboxd-daemon": self.daemon_password,
            "sandboxd-client": self.client_password,
            "test-admin": self.admin_password,
            "sandboxd-api": self.api_password,
        }[user]
        return f"redis://{user}:{password or secret}@127.0.0.1:{self.port}/0"

    @property
    def daemon_url(self) -> str:
        return self.url("sandboxd-daemon")

    @property
    def client_url(self) -> str:
        return self.url("sandboxd-client")

    def admin(self) -> SyncRedis:
        return SyncRedis.from_url(self.url("test-admin"), decode_responses=True)

    def denials(self) -> list[dict]:
        with self.admin() as admin:
            return admin.acl_log()


def acl_text(daemon_password: str, client_password: str, api_password: str) -> str:
    """The shipped file with the two password hashes filled in, as an operator does, and the
    API server's user (shipped off) turned on with its own."""
    text = ACL_FILE.read_text()
    api_hash = hashlib.sha256(api_password.encode()).hexdigest()
    assert "user sandboxd-api off " in text
    text = text.replace("user sandboxd-api off ", f"user sandboxd-api on #{api_hash} ")
    for placeholder, password in (
        ("#DAEMON_PASSWORD_SHA256", daemon_password),
        ("#CLIENT_PASSWORD_SHA256", client_password),
    ):
        assert placeholder in text
        text = text.replace(placeholder, "#" + hashlib.sha256(password.encode()).hexdigest())
    return text


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[AclRedis]:
    binary = find_redis_server()
    if binary is None:
        pytest.fail("no redis-server: install the redis-server package")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    if " v=6." in version or " v=5." in version:
        pytest.skip(f"the ACL file needs Redis 7 (selectors, %R~/%W~): {version}")
    passwords = [secrets.token_hex(16) for _ in range(4)]
    directory = tmp_path / "acl-redis"
    directory.mkdir()
    aclfile = directory / "users.acl"
    admin = f"user test-admin on #{hashlib.sha256(passwords[2].encode()).hexdigest()} ~* &* +@all"
    aclfile.write_text(acl_text(passwords[0], passwords[1], passwords[3]) + admin + "\n")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    argv += ["no", "--dir", str(directory), "--logfile", str(directory / "redis.log")]
    argv += ["--aclfile", str(aclfile)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not answers("127.0.0.1", port):  # poll with a deadline until it listens
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (directory / "redis.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"redis-server with the ACL file did not start:\n{log}")
            time.sleep(0.02)
        yield AclRedis(port, *passwords, proc=proc)
    finally:
        proc.terminate()
        proc.wait(10)


def snapshot(acl_redis: AclRedis) -> dict[bytes, bytes]:
    """Every key and its DUMP, read by the test's admin user."""
    with SyncRedis.from_url(acl_redis.url("test-admin")) as raw:
        return {key: raw.dump(key) for key in sorted(raw.keys("*"))}


async def seed_ready(url: str, pools: list[PoolSpec], *ids: str) -> None:
    """What the daemon does for a claim to find: pool settings, ready records (of the
    first pool)."""
    pool = pools[0]
    async with Client.from_url(url) as client:
        redis = client._redis
        await ClaimStore(redis, KEYS).publish_pool_settings(pools)
        store, events = SandboxStore(redis, KEYS), EventPublisher(redis, KEYS, 1000)
        for sandbox_id in ids:
            record = SandboxRecord(
                id=sandbox_id, pool=pool.name, provider="local", state="creating",
                template="base", spec_revision=1, instance="test",
            )  # fmt: skip
            await store.add(record)
            await store.mark_ready(record, {}, events.build("sandbox.ready", pool=pool.name))


async def test_the_default_user_is_off(acl_redis):
    for url in (f"redis://127.0.0.1:{acl_redis.port}/0", acl_redis.url("sandboxd-client", "no")):
        with SyncRedis.from_url(url) as anonymous, pytest.raises(AuthenticationError):
            anonymous.ping()


async def test_the_client_user_claims_renews_releases_and_reads(acl_redis):
    pools = [PoolSpec(name="p", max_lease_s=600), PoolSpec(name="lazy", on_empty="create")]
    await seed_ready(acl_redis.daemon_url, pools, "sb-1", "sb-2")
    async with Client.from_url(acl_redis.client_url, owner="acl-test") as client:
        sandbox = await client.claim("p", lease_s=60, timeout_s=0)
        before = sandbox.lease_expires_ms
        await sandbox.renew(500)
        assert sandbox.lease_expires_ms > before
        attached = await client.attach(sandbox.id, sandbox.claim_token)
        assert attached.claim_id == sandbox.claim_id
        await sandbox.release()
        async with client.claim("p", timeout_s=0) as second:
            assert second.id == "sb-2"
        # A wait on an empty on_empty: create pool registers demand and subscribes.
        with pytest.raises(ClaimTimeout):
            await client.claim("lazy", timeout_s=0.2)
        with pytest.raises(ClaimError, match=r"held by another claim|not claimed"):
            await client.release(sandbox.id, "not the token")
    types = [e["type"] for e in await _events(acl_redis)]
    assert types.count("sandbox.claimed") == 2 and types.count("sandbox.released") == 2
    assert acl_redis.denials() == []

    # The read-only commands of the CLI work for the client user; no password is shown.
    for args in (["get", "sandboxes", "-o", "json"], ["get", "pools"], ["events", "-n", "5"]):
        done = await asyncio.to_thread(cli, acl_redis.client_url, *args)
        assert done.returncode == 0, done.stderr
        assert acl_redis.client_password not in done.stdout + done.stderr
    status = await asyncio.to_thread(cli, acl_redis.client_url, "status", "-o", "json")
    assert status.returncode == 3  # no daemon heartbeat, but readable
    assert acl_redis.denials() == []


async def _events(acl_redis: AclRedis) -> list[dict]:
    async with Client.from_url(acl_redis.client_url) as client:
        return await events_of(client._redis)


@pytest.mark.parametrize(
    "command",
    [
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("CONFIG", "GET", "*"),
        ("CONFIG", "SET", "appendonly", "yes"),
        ("KEYS", "*"),
        ("SCAN", "0"),
        ("SHUTDOWN", "NOSAVE"),
        ("ACL", "LIST"),
        ("SET", "sandboxd:spec", "{}"),
        ("LPUSH", "sandboxd:spec:history", "{}"),
        ("HSET", "sandboxd:pools", "p", "{}"),
        ("DEL", "sandboxd:sandbox:sb-1"),
        ("UNLINK", "sandboxd:sandbox:sb-1"),
        ("SREM", "sandboxd:sandboxes", "sb-1"),
        ("RPUSH", "sandboxd:pool:p:ready", "sb-9"),
        ("SET", "sandboxd:node:vm:lease", "9:forged"),  # would make the active daemon step down
        ("DEL", "sandboxd:node:vm:lease"),
        ("INCR", "sandboxd:node:vm:epoch"),
        ("SET", "sandboxd:leader", "9:forged"),
        ("HSET", "sandboxd:daemons", "forged", "{}"),
        ("PUBLISH", "sandboxd:node:vm:released", "x"),
        ("HGETALL", "other:secret"),
        ("GET", "elsewhere"),
        ("HSET", "elsewhere", "a", "b"),
        ("PUBLISH", "other-channel", "x"),
        ("SUBSCRIBE", "other-channel"),
        ("SELECT", "1"),
    ],
)
async def test_the_client_user_cannot_do_operator_things(acl_redis, command):
    await seed_ready(acl_redis.daemon_url, [PoolSpec(name="p")], "sb-1")
    with acl_redis.admin() as admin:
        admin.set("other:secret", "x")
    before = snapshot(acl_redis)
    with SyncRedis.from_url(acl_redis.client_url) as client:
        with pytest.raises(NoPermissionError):
            client.execute_command(*command)
        # Nor from inside a script: the same ACL applies to its redis.call()s.
        script = "return redis.call(" + ", ".join(f"'{part}'" for part in command) + ")"
        with pytest.raises(
            ResponseError, match=r"(?i)permission|not allowed|can.t (run|access|publish)"
        ):
            client.eval(script, 0)
    assert snapshot(acl_redis) == before


async def test_the_daemon_user_runs_the_real_daemon(acl_redis, daemon_factory, tmp_path):
    """The daemon, configured with the daemon user (password in redis_url), fills a pool;
    a client with the client user claims, runs a command and releases; ACL LOG stays
    empty (nothing either of them did was refused) and no password is logged or shown."""
    daemon = daemon_factory(redis_url=acl_redis.daemon_url, lease_check_interval_s=0.2).start()
    async with Client.from_url(acl_redis.daemon_url) as operator:
        await apply(operator._redis, [{"name": "default", "min_ready": 1, "max_total": 2}])
        await wait_ready(operator._redis, "default", 1, timeout=60)
        async with Client.from_url(acl_redis.client_url, owner="acl") as client:
            async with client.claim("default", timeout_s=20) as sandbox:
                result = await sandbox.exec(["sh", "-c", "echo $((6*7))"], timeout=20)
                assert (result.exit_code, result.stdout) == (0, b"42\n"), result
            await wait_event(operator._redis, "sandbox.terminated", sandbox=sandbox.id)
            await wait_ready(operator._redis, "default", 1, timeout=60)
            short = await client.claim("default", lease_s=1, timeout_s=20)  # left to expire
        await wait_event(operator._redis, "sandbox.lease_expired", sandbox=short.id)
    assert acl_redis.denials() == [], acl_redis.denials()

    status = await asyncio.to_thread(cli, acl_redis.client_url, "status", "-o", "json")
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown["daemon"]["alive"]
    assert daemon.proc.poll() is None
    daemon.stop()
    log = daemon.log_path.read_text(errors="replace")
    assert "starting" in log
    for secret in (acl_redis.daemon_password, acl_redis.client_password):
        assert secret not in log and secret not in status.stdout
    events = json.dumps(await _events(acl_redis))
    assert acl_redis.daemon_password not in events


async def test_the_cli_with_a_user_in_the_url_and_the_password_in_a_file(acl_redis, tmp_path):
    """redis_url names the user; redis_password_file holds the password (never shown)."""
    await seed_ready(acl_redis.daemon_url, [PoolSpec(name="p")], "sb-1")
    secret = tmp_path / "redis-password"
    secret.write_text(acl_redis.client_password + "\n")
    secret.chmod(0o600)
    url = f"redis://sandboxd-client@127.0.0.1:{acl_redis.port}/0"
    env = {"SANDBOXD_REDIS_PASSWORD_FILE": str(secret)}
    claimed = await asyncio.to_thread(cli, url, "claim", "p", "--wait", "0", "-o", "json", env=env)
    assert claimed.returncode == 0, claimed.stderr
    token = json.loads(claimed.stdout)["claim_token"]
    released = await asyncio.to_thread(
        cli, url, "release", "sb-1", env={**env, "SANDBOXD_CLAIM_TOKEN": token}
    )
    assert released.returncode == 0, released.stderr
    wrong = await asyncio.to_thread(
        cli, acl_redis.url("sandboxd-client", "wrong-pw"), "get", "pools"
    )
    assert wrong.returncode != 0 and "wrong-pw" not in wrong.stderr + wrong.stdout


async def test_sandboxd_api_on_its_own_user_creates_runs_and_kills(
    acl_redis, daemon_factory, fake_e2b, monkeypatch, tmp_path
):
    """`sandboxd api` with the `sandboxd-api` user: the e2b SDK creates a sandbox of an e2b
    pool (a claim, the registry entry, the key's quota), runs a command, lists, and kills
    it; ACL LOG stays empty, and the user cannot touch the keys or the spec."""
    from e2b import Sandbox

    from tests.integration.test_api import ApiServer, new_key
    from tests.integration.test_e2b import e2b_pool, e2b_settings

    daemon = daemon_factory(redis_url=acl_redis.daemon_url, e2b=e2b_settings(fake_e2b))
    daemon.env["E2B_API_KEY"] = E2B_TEST_KEY
    daemon.start()
    async with Client.from_url(acl_redis.daemon_url) as operator:
        await apply(operator._redis, [e2b_pool(min_ready=1, max_total=3)])
        await wait_ready(operator._redis, "cloud", 1, timeout=60)
        key = await asyncio.to_thread(
            new_key, acl_redis.daemon_url, "acl", "--max-sandboxes", "2"
        )  # the operator's CLI issues keys
        with ApiServer(acl_redis.url("sandboxd-api"), tmp_path / "api.log") as api:
            for name in ("E2B_API_KEY", "E2B_DOMAIN"):
                monkeypatch.delenv(name, raising=False)
            opts = {"api_key": key, "api_url": api.url, "sandbox_url": fake_e2b.url}
            sandbox = await asyncio.to_thread(Sandbox.create, "cloud", **opts)
            done = await asyncio.to_thread(sandbox.commands.run, "echo $((6*7))")
            assert done.stdout == "42\n"
            listed = await asyncio.to_thread(lambda: Sandbox.list(**opts).next_items())
            assert [s.sandbox_id for s in listed] == [sandbox.sandbox_id]
            await asyncio.to_thread(sandbox.kill)
            assert await asyncio.to_thread(lambda: Sandbox.list(**opts).next_items()) == []
        await wait_event(operator._redis, "sandbox.released")
    assert acl_redis.denials() == [], acl_redis.denials()
    assert acl_redis.api_password not in (tmp_path / "api.log").read_text()

    with SyncRedis.from_url(acl_redis.url("sandboxd-api")) as api_user:
        for command in (
            ("HSET", "sandboxd:apikeys", "forged", "{}"),
            ("HSET", "sandboxd:apikeys:sha256", "0" * 64, "acl"),
            ("DEL", "sandboxd:apikeys"),
            ("SET", "sandboxd:spec", "{}"),
            ("HSET", "sandboxd:pools", "p", "{}"),
            ("FLUSHDB",),
        ):
            with pytest.raises(NoPermissionError):
                api_user.execute_command(*command)
