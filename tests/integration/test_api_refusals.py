"""`sandboxd api` in-process (no daemon): an empty pool is a bounded wait then a clear 503,
never a hang; keys are stored hashed and refused once revoked."""

import asyncio
import json
import time

import httpx

from sandboxd.api.app import Settings, create_app
from sandboxd.api.registry import Entry, Registry
from sandboxd.store.apikeys import ApiKeyStore
from sandboxd.store.claims import ClaimStore
from sandboxd.store.records import SandboxRecord
from tests.support import KEYS, PREFIX, eventually

POOL = {
    "provider": "e2b",
    "min_ready": 1,
    "max_total": 2,
    "lease_s": 60,
    "max_lease_s": 600,
    "on_empty": "wait",
    "reuse": "never",
}


async def test_an_empty_pool_is_a_bounded_wait_then_a_clear_error(redis):
    await redis.hset(KEYS.pools, "cloud", json.dumps(POOL))
    store = ApiKeyStore(redis, KEYS)
    secret = await store.create("carol", max_sandboxes=3)
    stored = json.dumps(await redis.hgetall(KEYS.apikeys))
    assert secret not in stored and "carol" in stored

    app = create_app(Settings(redis=redis, prefix=PREFIX, wait_s=0.5))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        headers = {"X-API-KEY": secret}
        started = time.monotonic()
        done = await http.post("/v2/sandboxes", json={"templateID": "cloud"}, headers=headers)
        assert 0.4 < time.monotonic() - started < 5
        assert done.status_code == 503 and done.headers["should-retry"] == "false"
        assert "no ready sandbox in pool 'cloud' within 0.5s" in done.json()["message"]
        assert done.json()["code"] == 503
        # The create in flight no longer counts against the key.
        assert await redis.zcard(KEYS.api_key_sandboxes("carol")) == 0

        assert await store.revoke("carol", ClaimStore(redis, KEYS)) == 0
        done = await http.get("/v2/sandboxes", headers=headers)
        assert done.status_code == 401 and done.json()["code"] == 401


async def test_malformed_creates_are_a_400_never_a_500(redis):
    """Found from outside: an env value of another type and JSON nested past what a parser
    follows each made an unhandled exception (a 500 and a traceback in the log)."""
    await redis.hset(KEYS.pools, "cloud", json.dumps(POOL))
    secret = await ApiKeyStore(redis, KEYS).create("dave")
    app = create_app(Settings(redis=redis, prefix=PREFIX, wait_s=0.1))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        headers = {"X-API-KEY": secret, "content-type": "application/json"}
        for body in (
            json.dumps({"templateID": "cloud", "envVars": {"A": 1}}),
            json.dumps({"templateID": "cloud", "envVars": {"A": None}}),
            "[" * 100_000 + "]" * 100_000,
        ):
            done = await http.post("/v2/sandboxes", content=body, headers=headers)
            assert done.status_code == 400, (body[:40], done.status_code, done.text[:200])


async def test_an_e2b_pool_that_resets_for_the_next_claimant_is_not_served(redis):
    """E2B's envd token of a sandbox never changes: with reuse: reset, one tenant's token
    would reach the next tenant's sandbox."""
    await redis.hset(KEYS.pools, "shared", json.dumps(POOL | {"reuse": "reset"}))
    secret = await ApiKeyStore(redis, KEYS).create("erin")
    app = create_app(Settings(redis=redis, prefix=PREFIX, wait_s=0.1))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        done = await http.post(
            "/v2/sandboxes", json={"templateID": "shared"}, headers={"X-API-KEY": secret}
        )
    assert done.status_code == 400 and "reuse: reset" in done.json()["message"]


async def test_a_body_past_the_bound_is_refused_before_it_is_read_whole(redis):
    """A control-plane call's JSON is at most 1 MiB: declared larger, it is refused before
    any of it is read; sent without a length, it is counted and refused once past."""
    await redis.hset(KEYS.pools, "cloud", json.dumps(POOL))
    secret = await ApiKeyStore(redis, KEYS).create("frank")
    app = create_app(Settings(redis=redis, prefix=PREFIX, wait_s=0.1))
    sent = 0

    async def endless():
        nonlocal sent
        while sent < 64 * 1024 * 1024:  # would be 64 MiB; the server stops it at 1 MiB
            sent += 64 * 1024
            yield b" " * (64 * 1024)

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        headers = {"X-API-KEY": secret, "content-type": "application/json"}
        big = b'{"templateID": "cloud", "pad": "' + b"x" * (2 * 1024 * 1024) + b'"}'
        done = await http.post("/v2/sandboxes", content=big, headers=headers)
        assert done.status_code == 413 and "1048576 bytes" in done.json()["message"]
        done = await http.post("/v2/sandboxes", content=endless(), headers=headers)
        assert done.status_code == 413
        assert sent <= 2 * 1024 * 1024  # read up to the bound, not the whole body
        done = await http.post(
            "/v2/sandboxes", content=b"{}", headers=headers | {"content-length": "x"}
        )
        assert done.status_code == 400


async def ready_sandbox(redis, sandbox_id: str, pool: str = "cloud") -> None:
    """A ready record the claim script can take (no daemon here: nothing runs behind it)."""
    record = SandboxRecord(
        id=sandbox_id,
        pool=pool,
        provider="e2b",
        state="ready",
        template="base",
        spec_revision=1,
        instance="test",
        handle={"e2b_id": "i" + sandbox_id, "envd_version": "0.5.2"},
    )
    await redis.hset(KEYS.sandbox(sandbox_id), mapping=record.to_hash())
    await redis.sadd(KEYS.pool_members(pool), sandbox_id)
    await redis.rpush(KEYS.pool_ready(pool), sandbox_id)
    await redis.publish(KEYS.pool_available(pool), sandbox_id)


async def test_a_key_revoked_while_its_create_waits_gets_no_sandbox(redis):
    """Found from outside: revoke ended the claims it found, but a create waiting on an
    empty pool then got a sandbox (and its envd access) for the revoked key."""
    await redis.hset(KEYS.pools, "cloud", json.dumps(POOL))
    store = ApiKeyStore(redis, KEYS)
    secret = await store.create("mallory")
    app = create_app(Settings(redis=redis, prefix=PREFIX, wait_s=10))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        headers = {"X-API-KEY": secret}
        waiting = asyncio.create_task(
            http.post("/v2/sandboxes", json={"templateID": "cloud"}, headers=headers)
        )

        async def waits() -> bool:  # the create listens for the pool's next ready sandbox
            subscribed = await redis.pubsub_numsub(KEYS.pool_available("cloud"))
            return subscribed[0][1] > 0

        await eventually(waits, what="the create to wait on the empty pool")
        assert await store.revoke("mallory", ClaimStore(redis, KEYS)) == 0  # nothing held yet
        await ready_sandbox(redis, "sb-late")
        done = await waiting
    assert done.status_code == 401 and "revoked" in done.json()["message"]
    assert await redis.hget(KEYS.sandbox("sb-late"), "state") == "released"  # given back
    assert not await redis.exists(KEYS.api_sandbox("isb-late"))


async def test_a_claims_mapping_is_changed_only_by_that_claim(redis):
    """Found from outside: a slow connect (or kill) of the last claim of a reused local
    sandbox acted on the mapping of the next claim of the same E2B id."""
    registry = Registry(redis, KEYS)
    old = Entry("sb-1", "sb-1", "claim-old", "alice", "p", "p", "t", "0.5.2", "")
    new = Entry("sb-1", "sb-1", "claim-new", "bob", "p", "p", "t", "0.5.2", "", paused=True)
    bob = await ApiKeyStore(redis, KEYS).authenticate(await ApiKeyStore(redis, KEYS).create("bob"))
    assert await registry.add(new, 60, "", bob.sha256)  # the next claim's, under the same id
    await registry.set_paused(old, False)
    await registry.remove(old)
    fields = await redis.hgetall(KEYS.api_sandbox("sb-1"))
    assert (fields["claim_id"], fields["paused"]) == ("claim-new", "1")
    await registry.remove(new)
    assert not await redis.exists(KEYS.api_sandbox("sb-1"))


async def test_malformed_envd_calls_and_unknown_paths_are_clear_errors(redis, tmp_path):
    """Found from outside: a body that is not the message was a 500 with a traceback in the
    log (and a dropped connection); unknown paths answered plain text."""
    app = create_app(Settings(redis=redis, prefix=PREFIX, local_root=tmp_path))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        json_headers = {"content-type": "application/json"}
        for body in (b"{nope", b'{"path": 123}', b"[1]"):
            done = await http.post(
                "/filesystem.Filesystem/Stat", content=body, headers=json_headers
            )
            assert done.status_code == 400, (body, done.status_code, done.text)
            assert done.json()["code"] == "invalid_argument"
        done = await http.get("/no/such/path")
        assert done.status_code == 404 and done.json()["code"] == 404
        done = await http.put("/v2/sandboxes")
        assert done.status_code == 405 and done.json()["code"] == 405
