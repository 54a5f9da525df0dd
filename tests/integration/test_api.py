"""`sandboxd api`: the unmodified e2b SDK (sync and async) gets warm sandboxes of an e2b pool
from sandboxd, with a key sandboxd issued and no E2B account key anywhere in the client."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from e2b import AsyncSandbox, Sandbox, SandboxQuery
from e2b.exceptions import (
    AuthenticationException,
    NotFoundException,
    RateLimitException,
    SandboxException,
)

from tests.support import E2B_TEST_KEY, KEYS, apply, cli, free_port, wait_event, wait_ready

from .test_e2b import e2b_pool, e2b_settings

pytestmark = pytest.mark.timeout(120)


class ApiServer:
    """`python -m sandboxd api` on a free loopback port, its log in a file."""

    def __init__(self, redis_url: str, log_path: Path, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),  # the tree under test, first
            "SANDBOXD_REDIS_URL": redis_url,
            "SANDBOXD_API_LISTEN": f"127.0.0.1:{self.port}",
            "SANDBOXD_LOG_LEVEL": "DEBUG",
            **env,
        }
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ApiServer":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sandboxd", "api"], env=self.env, stdout=log, stderr=log
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                urllib.request.urlopen(f"{self.url}/sandboxes", timeout=1)
            except urllib.error.HTTPError as exc:
                assert exc.code == 401
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError("sandboxd api did not answer within 20 s")

    def __exit__(self, *exc_info: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def new_key(redis_url: str, name: str, *options: str) -> str:
    done = cli(redis_url, "apikey", "create", name, *options)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def test_the_e2b_sdk_gets_warm_sandboxes_of_an_e2b_pool_through_sandboxd_api(
    fake_e2b, redis, redis_server, daemon_factory, monkeypatch, tmp_path
):
    monkeypatch.delenv("E2B_API_KEY", raising=False)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    daemon = daemon_factory(e2b=e2b_settings(fake_e2b), log_level="DEBUG")
    daemon.env["E2B_API_KEY"] = E2B_TEST_KEY  # the daemon's own, nobody else's
    daemon.start()
    local = {"name": "default", "min_ready": 0, "max_total": 1}
    cloud = e2b_pool(min_ready=3, max_total=5, max_lease_s=600, e2b_alias=["base"])
    await apply(redis, [cloud, local])
    await wait_ready(redis, "cloud", 3)
    alice = new_key(redis_server, "alice")
    bob = new_key(redis_server, "bob", "--pools", "cloud", "--max-sandboxes", "1")
    listed = cli(redis_server, "apikey", "list", "-o", "json")
    assert [k["name"] for k in json.loads(listed.stdout)] == ["alice", "bob"]
    assert alice not in listed.stdout and bob not in listed.stdout

    # This API server cannot reach the local sandboxes' registry (another host, say): a
    # local pool is refused in one clear line (test_api_local.py serves one).
    no_registry = {"SANDBOXD_LOCAL__WORKSPACE_ROOT": str(tmp_path / "no-registry-here")}
    # Where E2B's envd is (its configuration, as the daemon's): a claim's envVars go there.
    envd = {"SANDBOXD_E2B__SANDBOX_URL": fake_e2b.url}
    with ApiServer(redis_server, tmp_path / "api.log", **no_registry, **envd) as api:
        # The program's whole environment: where sandboxd is, where envd is, sandboxd's key.
        monkeypatch.setenv("E2B_API_URL", api.url)
        monkeypatch.setenv("E2B_SANDBOX_URL", fake_e2b.url)
        monkeypatch.setenv("E2B_API_KEY", alice)
        warm = {s.id for s in fake_e2b.ours()}

        sandbox = Sandbox.create("cloud", metadata={"job": "a"}, timeout=120)
        assert sandbox.sandbox_id in warm  # a warm one: the fake E2B's own sandbox
        assert sandbox.commands.run("echo hi from $E2B_SANDBOX_ID").stdout == (
            f"hi from {sandbox.sandbox_id}\n"
        )
        mapping = await redis.hgetall(KEYS.api_sandbox(sandbox.sandbox_id))
        record = await redis.hgetall(KEYS.sandbox(mapping["sandbox"]))
        assert (record["state"], record["claimant"], record["lease_s"]) == (
            "claimed",
            "alice",
            "120",
        )
        tokens = [mapping["claim_token"]]

        # envs at create reach every command of the claim (set in the warm sandbox's envd),
        # under a command's own; the sandbox is this claim's alone.
        secret_env = "s3cr3t-value-of-the-claim"
        with_env = Sandbox.create("cloud", envs={"API_TOKEN": secret_env, "GREETING": "hi"})
        assert with_env.sandbox_id in warm
        assert with_env.commands.run("echo $API_TOKEN $GREETING").stdout == f"{secret_env} hi\n"
        assert with_env.commands.run("echo $GREETING", envs={"GREETING": "own"}).stdout == ("own\n")
        assert fake_e2b.world.init_calls == [(with_env.sandbox_id, ["API_TOKEN", "GREETING"])]
        env_mapping = await redis.hgetall(KEYS.api_sandbox(with_env.sandbox_id))
        assert secret_env not in str(env_mapping)  # E2B's envd holds them, not Redis
        tokens.append(env_mapping["claim_token"])
        with_env.kill()

        sandbox.set_timeout(5000)  # renews, capped at the pool's max_lease_s
        await wait_event(redis, "sandbox.lease_renewed", sandbox=mapping["sandbox"])
        record = await redis.hgetall(KEYS.sandbox(mapping["sandbox"]))
        assert 500_000 < int(record["lease_expires_ms"]) - time.time() * 1000 <= 600_000

        # E2B's default template, `base`, is an alias of the pool: `create()` as it stands.
        other = await AsyncSandbox.create(metadata={"job": "b"})
        assert other.sandbox_id in warm and other.sandbox_id != sandbox.sandbox_id
        assert (await other.commands.run("echo $((6*7))")).stdout == "42\n"
        tokens.append((await redis.hgetall(KEYS.api_sandbox(other.sandbox_id)))["claim_token"])

        only_a = Sandbox.list(query=SandboxQuery(metadata={"job": "a"})).next_items()
        assert [s.sandbox_id for s in only_a] == [sandbox.sandbox_id]
        assert only_a[0].metadata == {"job": "a"}
        both = await AsyncSandbox.list().next_items()
        assert {s.sandbox_id for s in both} == {sandbox.sandbox_id, other.sandbox_id}
        assert Sandbox.get_info(sandbox.sandbox_id).metadata == {"job": "a"}

        # Bob sees none of alice's, reaches none of them, and holds at most one.
        assert Sandbox.list(api_key=bob).next_items() == []
        with pytest.raises(NotFoundException):
            Sandbox.get_info(sandbox.sandbox_id, api_key=bob)
        assert Sandbox.kill(sandbox.sandbox_id, api_key=bob) is False
        bobs = Sandbox.create("cloud", api_key=bob)
        with pytest.raises(RateLimitException, match="maximum of 1"):
            Sandbox.create("cloud", api_key=bob)
        with pytest.raises(SandboxException, match="may not use pool 'default'"):
            Sandbox.create("default", api_key=bob)
        bobs.kill()

        # Carol may create one sandbox every 5 s: a second create at once is a 429.
        carol = new_key(redis_server, "carol", "--creates-per-s", "0.2")
        carols = Sandbox.create("cloud", api_key=carol)
        with pytest.raises(RateLimitException, match=r"0\.2 sandboxes a second"):
            Sandbox.create("cloud", api_key=carol)
        held = (await redis.hgetall(KEYS.api_sandbox(carols.sandbox_id)))["sandbox"]
        # Revoking her key ends the claims made with it, not just the key.
        revoked = cli(redis_server, "apikey", "revoke", "carol")
        assert "ended the 1 claim(s)" in revoked.stdout, revoked.stderr
        await wait_event(redis, "sandbox.released", sandbox=held, claimant="carol", via="api")
        assert not await redis.exists(KEYS.api_sandbox(carols.sandbox_id))  # its token gone
        with pytest.raises(AuthenticationException):
            Sandbox.list(api_key=carol).next_items()

        # Refusals, in E2B's shapes.
        with pytest.raises(SandboxException, match="template 'nope' not found") as unknown:
            Sandbox.create("nope")
        assert unknown.value.status_code == 404
        with pytest.raises(AuthenticationException):
            Sandbox.create("cloud", api_key="sbk_not-a-key")
        with pytest.raises(AuthenticationException):
            Sandbox.list(api_key=E2B_TEST_KEY).next_items()  # E2B's key opens nothing here
        with pytest.raises(SandboxException, match="local pool") as local_pool:
            Sandbox.create("default")
        assert local_pool.value.status_code == 400

        # Kill releases: an ordinary claim's end.
        sandbox.kill()
        # The claim's events say it was made through the API, by the key's name.
        for type_ in ("sandbox.claimed", "sandbox.released"):
            event = await wait_event(redis, type_, sandbox=mapping["sandbox"], via="api")
            assert event["data"]["claimant"] == "alice"
        await other.kill()
        assert await AsyncSandbox.list().next_items() == []
        await wait_ready(redis, "cloud", 3)

    # No claim token and no key secret in a log line, an event or a view.
    texts = {
        "daemon log": daemon.log_path.read_text(),
        "api log": (tmp_path / "api.log").read_text(),
        "events": cli(redis_server, "events", "-n", "1000", "-o", "json").stdout,
        "get": cli(redis_server, "get", "sandboxes", "-o", "json").stdout,
        "status": cli(redis_server, "status", "-o", "json").stdout,
    }
    assert "POST /v2/sandboxes" in texts["api log"]
    for where, text in texts.items():
        for secret in [*tokens, alice, bob, secret_env]:
            assert secret not in text, where
    assert not await redis.keys(KEYS.api_sandbox("*"))  # released: the tokens are gone
