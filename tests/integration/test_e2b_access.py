"""A claimant reaches its E2B sandbox with what its claim returns (envd's access token for
that one sandbox), never with the account's API key; the token is a secret that nothing but
the claim path hands out, and a sandbox that cannot be reached is a one-line error."""

import json
from pathlib import Path

import pytest
from e2b import AsyncSandbox
from e2b.exceptions import AuthenticationException

from sandboxd.client import Client
from sandboxd.store.records import SandboxStore
from tests.support import E2B_TEST_KEY, KEYS, apply, cli, events_of, wait_event, wait_ready

from .test_e2b import cli_endpoints, client_endpoints, e2b_pool, e2b_settings

pytestmark = pytest.mark.timeout(90)


async def redis_text(redis, *, but_secrets: bool) -> str:
    """Every key and value, as text; `but_secrets`: without the records' `secrets` field."""
    out = []
    for key in await redis.keys("*"):
        kind = await redis.type(key)
        if kind == "hash":
            fields = await redis.hgetall(key)
            if but_secrets and key.startswith(KEYS.sandbox("")):
                fields.pop("secrets", None)
            value: object = fields
        elif kind == "string":
            value = await redis.get(key)
        elif kind == "stream":
            value = await redis.xrange(key)
        elif kind == "list":
            value = await redis.lrange(key, 0, -1)
        elif kind == "set":
            value = await redis.smembers(key)
        else:
            value = await redis.zrange(key, 0, -1, withscores=True)
        out.append(f"{key} {value!r}")
    return "\n".join(out)


async def test_a_claimant_without_an_api_key_runs_commands_with_its_claims_envd_token(
    fake_e2b, redis, redis_server, daemon_factory, monkeypatch
):
    monkeypatch.delenv("E2B_API_KEY", raising=False)
    daemon = daemon_factory(e2b=e2b_settings(fake_e2b), log_level="DEBUG")
    daemon.env["E2B_API_KEY"] = E2B_TEST_KEY  # the daemon's own, nobody else's
    daemon.start()
    await apply(redis, [e2b_pool(min_ready=2, max_total=3)])
    await wait_ready(redis, "cloud", 2)

    # The library: no credentials at all, only where E2B is (the fake on loopback).
    async with (
        Client(redis, endpoints=client_endpoints(fake_e2b)) as client,
        client.claim("cloud", lease_s=60) as sandbox,
    ):
        result = await sandbox.exec("echo $((6*7)) from $E2B_SANDBOX_ID; echo oops >&2")
        e2b_id = sandbox.connection_info["e2b_id"]
        assert (result.exit_code, result.stdout, result.stderr) == (
            0,
            f"42 from {e2b_id}\n".encode(),
            b"oops\n",
        )
        await sandbox.write("notes.txt", "kept")
        assert await sandbox.read("notes.txt") == b"kept"
        assert (await sandbox.exec("cat", stdin=b"piped")).stdout == b"piped"
        token = fake_e2b.world.sandboxes[e2b_id].token
        assert sandbox.access_secrets() == {"envd_access_token": token}  # from the claim
        assert token not in repr(sandbox) and "e2b_api_key" not in str(sandbox.connection_info)

        # What the claim gave opens this sandbox's envd only: not E2B's API, so a claimant
        # can neither list nor kill the account's sandboxes.
        with pytest.raises(AuthenticationException):
            await AsyncSandbox.kill(e2b_id, api_key=token, api_url=fake_e2b.url)
        with pytest.raises(AuthenticationException):
            await AsyncSandbox.list(api_key=token, api_url=fake_e2b.url).next_items()
        other = next(s for s in fake_e2b.ours() if s.id != e2b_id)
        assert token != other.token

        # The CLI: no E2B key in its environment, and a wrong one changes nothing.
        for env in ({}, {"E2B_API_KEY": "e2b_wrong"}):
            done = cli(redis_server, "exec", "cloud", "--", "sh", "-c", "echo hi; exit 3",
                       env={**env, **cli_endpoints(fake_e2b)})  # fmt: skip
            assert (done.returncode, done.stdout) == (3, "hi\n"), done.stderr

        # The token is in its record's `secrets` and nowhere else: no event, view, status,
        # heartbeat, log line, other key or field, or command line run in a sandbox.
        texts = {
            "redis": await redis_text(redis, but_secrets=True),
            "log": daemon.log_path.read_text(),
            "get": cli(redis_server, "get", "sandboxes").stdout,
            "get json": cli(redis_server, "get", "sandboxes", "-o", "json").stdout,
            "status": cli(redis_server, "status").stdout,
            "status json": cli(redis_server, "status", "-o", "json").stdout,
            "events": cli(redis_server, "events", "-n", "1000", "-o", "json").stdout,
            "argv": repr([s.commands for s in fake_e2b.world.sandboxes.values()]),
        }
        assert sandbox.id in texts["get json"] and e2b_id in texts["get"]
        for where, text in texts.items():
            assert token not in text, where
        record = await redis.hgetall(KEYS.sandbox(sandbox.id))
        assert json.loads(record["secrets"]) == {"envd_access_token": token}
        assert token not in record["handle"]
    # E2B's API refused the two tries above; nothing else ever came to it without the key.
    refused = [(method, path) for _, method, path, status in fake_e2b.ledger.requests
               if status == 401]  # fmt: skip
    assert refused == [("DELETE", f"/sandboxes/{e2b_id}"), ("GET", "/v2/sandboxes")]


async def test_an_unreachable_sandbox_is_a_one_line_error(
    fake_e2b, redis, redis_server, embedded_daemon, tmp_path: Path
):
    # The daemon would notice a vanished sandbox within a listing; not within this test.
    await embedded_daemon(e2b=e2b_settings(fake_e2b, api_key=E2B_TEST_KEY, list_interval_s=60))
    await apply(redis, [e2b_pool(min_ready=2, health={"interval_s": 60})])
    await wait_ready(redis, "cloud", 2)
    env = cli_endpoints(fake_e2b)

    def claim() -> tuple[str, Path]:
        done = cli(redis_server, "claim", "cloud", "-o", "json", env=env)
        row = json.loads(done.stdout)
        token_file = tmp_path / row["id"]
        token_file.write_text(row["claim_token"])
        return row["id"], token_file

    def exec_in(sandbox_id: str, token_file: Path):
        return cli(redis_server, "exec", "--sandbox", sandbox_id, "--token-file",
                   str(token_file), "--", "true", env=env)  # fmt: skip

    # Gone on E2B's side.
    gone, token_file = claim()
    record = await SandboxStore(redis, KEYS).get(gone)
    fake_e2b.vanish(record.handle["e2b_id"])
    done = exec_in(gone, token_file)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"error: cannot run in {gone}: sandbox ")
    assert len(done.stderr.strip().splitlines()) == 1

    # A record whose token is not the sandbox's (forged, or from another sandbox).
    forged, token_file = claim()
    await redis.hset(KEYS.sandbox(forged), "secrets", '{"envd_access_token":"not-the-token"}')
    done = exec_in(forged, token_file)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "not-the-token" not in done.stderr
    assert not [e for e in await events_of(redis, "sandbox.terminated") if e["sandbox"] == forged]
    await wait_event(redis, "sandbox.claimed", sandbox=forged)  # still held: nothing burnt

    # A record without a token (made before claimants got one): says so, in one line.
    await redis.hdel(KEYS.sandbox(forged), "secrets")
    done = exec_in(forged, token_file)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "no envd access token" in done.stderr
