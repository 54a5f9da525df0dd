"""`sandboxd api` in-process (no daemon): an empty pool is a bounded wait then a clear 503,
never a hang; keys are stored hashed and refused once revoked."""

import json
import time

import httpx

from sandboxd.api.app import Settings, create_app
from sandboxd.store.apikeys import ApiKeyStore
from sandboxd.store.claims import ClaimStore
from tests.support import KEYS, PREFIX

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
