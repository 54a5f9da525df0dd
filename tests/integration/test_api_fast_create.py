"""`sandboxd api`'s create in one round trip (in-process, no daemon, a real redis-server):
after a create decided the full way, the next one with the same key and template sends
what it was decided with, and its one script checks the key and the pool's settings are
still exactly those before it claims and records the claim. Anything changed meanwhile
(a revoked or edited key, new pool settings) is decided again the full way."""

import json
from pathlib import Path

import httpx
import pytest

from sandboxd.api.app import Settings, create_app
from sandboxd.api.envd import envd_token, token_digest
from sandboxd.api.registry import ENTRY_FIELDS, Entry
from sandboxd.store.apikeys import ApiKeyStore
from sandboxd.store.claims import ClaimStore
from sandboxd.store.records import SandboxRecord
from tests.support import KEYS, PREFIX

pytestmark = pytest.mark.timeout(60)

POOL = {
    "provider": "local",
    "min_ready": 1,
    "max_total": 9,
    "lease_s": 60,
    "max_lease_s": 600,
    "on_empty": "wait",
    "reuse": "never",
}


async def ready_local(redis, *ids: str, pool: str = "default") -> None:
    """Ready records the claim script can take (nothing runs behind them)."""
    for sandbox_id in ids:
        record = SandboxRecord(
            id=sandbox_id, pool=pool, provider="local", state="ready", template="base",
            spec_revision=1, instance="test", handle={"box": sandbox_id},
        )  # fmt: skip
        await redis.hset(KEYS.sandbox(sandbox_id), mapping=record.to_hash())
        await redis.sadd(KEYS.pool_members(pool), sandbox_id)
        await redis.rpush(KEYS.pool_ready(pool), sandbox_id)


async def seeded(redis, key: str, *ready: str) -> str:
    """The local pool `default` with `ready` sandboxes, and a key named `key`: its secret."""
    await redis.hset(KEYS.pools, "default", json.dumps(POOL))
    await ready_local(redis, *ready)
    return await ApiKeyStore(redis, KEYS).create(key)


DEFAULT = {"templateID": "default"}


async def round_trips(redis, monkeypatch, call):
    """`call`'s result and what it sent Redis, one entry per round trip (a command, or a
    pipeline's commands together)."""
    sent: list[bytes] = []
    kind = type(redis.connection_pool.make_connection())
    original = kind.send_packed_command

    async def counting(self, command, check_health=True):
        sent.append(b"".join(command) if isinstance(command, list) else command)
        return await original(self, command, check_health)

    monkeypatch.setattr(kind, "send_packed_command", counting)
    try:
        return await call(), sent
    finally:
        monkeypatch.setattr(kind, "send_packed_command", original)


def api(redis, tmp_path: Path, **settings) -> httpx.AsyncClient:
    app = create_app(Settings(redis=redis, prefix=PREFIX, local_root=tmp_path, **settings))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")


async def test_the_next_create_is_one_round_trip_and_records_the_same(redis, tmp_path, monkeypatch):
    secret = await seeded(redis, "alice", "sb-1", "sb-2", "sb-3", "sb-4")
    body = {"templateID": "default", "metadata": {"team": "a"}, "envVars": {"X": "1"}}
    async with api(redis, tmp_path) as http:
        headers = {"X-API-KEY": secret}
        first, full = await round_trips(
            redis, monkeypatch, lambda: http.post("/v2/sandboxes", json=body, headers=headers)
        )
        later = body | {"timeout": 30}
        second = await http.post("/v2/sandboxes", json=later, headers=headers)  # loads it
        third, fast = await round_trips(
            redis, monkeypatch, lambda: http.post("/v2/sandboxes", json=body, headers=headers)
        )
        assert first.status_code == second.status_code == third.status_code == 201
        assert len(full) >= 3 and len(fast) == 1 and b"EVALSHA" in fast[0], (full, fast)
        assert third.json()["sandboxID"] == "sb-3"

        answers = [first.json(), second.json()]
        assert [a["sandboxID"] for a in answers] == ["sb-1", "sb-2"]
        mappings = [await redis.hgetall(KEYS.api_sandbox(a["sandboxID"])) for a in answers]
        assert set(mappings[0]) == set(mappings[1])  # the same fields, the same meaning
        for answer, mapping in zip(answers, mappings, strict=True):
            assert mapping["sandbox"] == answer["sandboxID"] and mapping["key"] == "alice"
            assert mapping["provider"] == "local" and mapping["template"] == "default"
            assert json.loads(mapping["metadata"]) == {"team": "a"}
            assert json.loads(mapping["env_vars"]) == {"X": "1"}
            assert mapping["envd_token_sha256"] == token_digest(answer["envdAccessToken"])
            assert answer["envdAccessToken"] == envd_token(mapping["claim_token"])
            record = await redis.hgetall(KEYS.sandbox(answer["sandboxID"]))
            assert (record["state"], record["claimant"], record["claim_via"]) == (
                "claimed", "alice", "api",
            )  # fmt: skip
            assert record["claim_id"] == mapping["claim_id"]
        assert (await redis.hgetall(KEYS.sandbox("sb-2")))["lease_s"] == "30"
        held = await redis.zrange(KEYS.api_key_sandboxes("alice"), 0, -1)
        assert sorted(held) == ["sb-1", "sb-2", "sb-3"]
        assert 30 < await redis.ttl(KEYS.api_sandbox("sb-2")) <= 90  # the lease + 60 s

        listed = await http.get("/v2/sandboxes", headers=headers)
        assert sorted(s["sandboxID"] for s in listed.json()) == ["sb-1", "sb-2", "sb-3"]
        killed = await http.delete("/sandboxes/sb-2", headers=headers)
        assert killed.status_code == 204
        assert (await redis.hgetall(KEYS.sandbox("sb-2")))["state"] == "released"


async def test_a_key_revoked_after_its_first_create_gets_nothing_at_once(redis, tmp_path):
    secret = await seeded(redis, "mallory", "sb-1", "sb-2", "sb-3")
    store = ApiKeyStore(redis, KEYS)
    async with api(redis, tmp_path) as http:
        headers = {"X-API-KEY": secret}
        made = await http.post("/v2/sandboxes", json=DEFAULT, headers=headers)
        assert made.status_code == 201
        assert await store.revoke("mallory", ClaimStore(redis, KEYS)) == 1
        again = await http.post("/v2/sandboxes", json=DEFAULT, headers=headers)
        assert again.status_code == 401
        # a body the full path refuses still says the key first
        bad = {"templateID": "default", "timeout": "soon"}
        assert (await http.post("/v2/sandboxes", json=bad, headers=headers)).status_code == 401
    assert await redis.lrange(KEYS.pool_ready("default"), 0, -1) == ["sb-2", "sb-3"]
    assert not await redis.exists(KEYS.api_sandbox("sb-2"))


async def test_a_key_or_pool_changed_since_is_decided_again(redis, tmp_path):
    """The script compares the key's and the pool's JSON with what the create was decided
    with: an operator's edit of either sends the create the full way, which applies it."""
    await redis.hset(KEYS.pools, "other", json.dumps(POOL))
    secret = await seeded(redis, "bob", "sb-1", "sb-2", "sb-3")
    async with api(redis, tmp_path) as http:
        headers = {"X-API-KEY": secret}
        create = {"templateID": "default", "timeout": 500}
        assert (await http.post("/v2/sandboxes", json=create, headers=headers)).status_code == 201

        await redis.hset(KEYS.pools, "default", json.dumps(POOL | {"max_lease_s": 100}))
        made = await http.post("/v2/sandboxes", json=create, headers=headers)
        assert made.status_code == 201
        assert (await redis.hgetall(KEYS.sandbox(made.json()["sandboxID"])))["lease_s"] == "100"

        key = json.loads(await redis.hget(KEYS.apikeys, "bob"))
        await redis.hset(KEYS.apikeys, "bob", json.dumps(key | {"pools": ["other"]}))
        refused = await http.post("/v2/sandboxes", json=create, headers=headers)
        assert refused.status_code == 403
    assert await redis.lrange(KEYS.pool_ready("default"), 0, -1) == ["sb-3"]


async def test_an_empty_pool_on_the_fast_path_is_the_full_paths_bounded_wait(redis, tmp_path):
    secret = await seeded(redis, "carol", "sb-1")
    async with api(redis, tmp_path, wait_s=0.3) as http:
        headers = {"X-API-KEY": secret}
        made = await http.post("/v2/sandboxes", json=DEFAULT, headers=headers)
        assert made.status_code == 201
        empty = await http.post("/v2/sandboxes", json=DEFAULT, headers=headers)
        assert empty.status_code == 503 and "within 0.3s" in empty.json()["message"]
    assert await redis.zrange(KEYS.api_key_sandboxes("carol"), 0, -1) == ["sb-1"]


async def test_a_wrong_typed_key_set_refuses_before_the_claim(redis, tmp_path):
    """The key's set of sandboxes (written after the claim) holding another type: a clear
    error and nothing claimed, as every key the script writes is checked first."""
    secret = await seeded(redis, "dave", "sb-1", "sb-2")
    async with api(redis, tmp_path) as http:
        headers = {"X-API-KEY": secret}
        made = await http.post("/v2/sandboxes", json=DEFAULT, headers=headers)
        assert made.status_code == 201
        await redis.delete(KEYS.api_key_sandboxes("dave"))
        await redis.set(KEYS.api_key_sandboxes("dave"), "junk")
        done = await http.post("/v2/sandboxes", json=DEFAULT, headers=headers)
        assert done.status_code == 500 and "holds a string" in done.json()["message"]
    assert await redis.lrange(KEYS.pool_ready("default"), 0, -1) == ["sb-2"]


def test_the_script_is_sized_for_every_field_of_a_mapping():
    """CREATE_LOCAL's argument count comes from ENTRY_FIELDS: they must be to_hash's."""
    entry = Entry("sb", "sb", "claim", "key", "pool", "pool", "now", "0.5.2", "")
    assert tuple(entry.to_hash()) == ENTRY_FIELDS


async def test_a_damaged_record_taken_on_the_fast_path_leaves_no_mapping(redis, tmp_path):
    """Found from outside: the script records the mapping before the record's fields are
    checked; a damaged one is given back, and now its mapping goes with it (as on the full
    path, which records nothing for it)."""
    secret = await seeded(redis, "erin", "sb-1", "sb-2")
    await redis.hset(KEYS.sandbox("sb-2"), "handle", "not json")
    async with api(redis, tmp_path) as http:
        headers = {"X-API-KEY": secret}
        made = await http.post("/v2/sandboxes", json=DEFAULT, headers=headers)
        assert made.status_code == 201
        damaged = await http.post("/v2/sandboxes", json=DEFAULT, headers=headers)
        assert damaged.status_code == 500 and "damaged record" in damaged.json()["message"]
    assert (await redis.hgetall(KEYS.sandbox("sb-2")))["state"] == "released"
    assert not await redis.exists(KEYS.api_sandbox("sb-2"))
    assert await redis.zrange(KEYS.api_key_sandboxes("erin"), 0, -1) == ["sb-1"]


async def test_a_keys_json_moved_under_another_name_is_decided_again(redis, tmp_path):
    """Found from outside: the script compared the JSON found under whatever name the
    digest now names; the same bytes under another name passed, and the claim was recorded
    for a key that no longer exists (a revoke of the new name then ended nothing)."""
    secret = await seeded(redis, "alice", "sb-1", "sb-2")
    store = ApiKeyStore(redis, KEYS)
    async with api(redis, tmp_path) as http:
        headers = {"X-API-KEY": secret}
        made = await http.post("/v2/sandboxes", json=DEFAULT, headers=headers)
        assert made.status_code == 201
        raw = await redis.hget(KEYS.apikeys, "alice")
        await store.revoke("alice", ClaimStore(redis, KEYS))
        await redis.hset(KEYS.apikeys, "bob", raw)
        await redis.hset(KEYS.apikey_hashes, json.loads(raw)["sha256"], "bob")
        again = await http.post("/v2/sandboxes", json=DEFAULT, headers=headers)
        assert again.status_code == 401
    assert await redis.lrange(KEYS.pool_ready("default"), 0, -1) == ["sb-2"]


async def test_a_wrong_typed_key_set_on_the_full_path_is_a_clear_error(redis, tmp_path):
    """Found from outside: the full path answered 'cannot reach Redis'; now it says which
    key is damaged, and the sandbox it took goes back."""
    secret = await seeded(redis, "frank", "sb-1")
    await redis.set(KEYS.api_key_sandboxes("frank"), "junk")
    async with api(redis, tmp_path) as http:
        headers = {"X-API-KEY": secret}
        done = await http.post("/v2/sandboxes", json=DEFAULT, headers=headers)
    assert done.status_code == 500 and "holds a string" in done.json()["message"]
    assert (await redis.hgetall(KEYS.sandbox("sb-1")))["state"] == "released"
    assert not await redis.exists(KEYS.api_sandbox("sb-1"))


async def test_a_template_redis_cannot_take_is_a_404(redis, tmp_path):
    """Found from outside: a lone surrogate in `templateID` (valid JSON) made the Redis
    client raise, a 500 with a traceback."""
    secret = await seeded(redis, "gina")
    async with api(redis, tmp_path) as http:
        headers = {"X-API-KEY": secret, "content-type": "application/json"}
        body = b'{"templateID": "\\ud800"}'
        done = await http.post("/v2/sandboxes", content=body, headers=headers)
    assert done.status_code == 404 and "not found" in done.json()["message"]
