"""Claims are owned: only the holder of a claim's token may renew, release or attach to it.

The attacks these pin down (all worked before claim tokens): `release(id)` and
`renew(id, "", lease)` with an empty claim id from any client; `renew(id, "", -100000)`
expiring someone else's sandbox at once; `attach(id)` and so exec in another client's
sandbox; leases of 0, negative, NaN, inf or huge. Most tests need no daemon: the records
a claim finds are written as the daemon writes them.
"""

import asyncio
import json

import pytest
from redis.asyncio import Redis

from sandboxd.client import Client
from sandboxd.spec import PoolSpec
from sandboxd.store.claims import ClaimError, ClaimStore, token_digest, token_sha256
from sandboxd.store.events import EventPublisher
from sandboxd.store.records import SandboxRecord, SandboxStore
from tests.support import KEYS, apply, cli, events_of, wait_event, wait_ready


async def seed(redis: Redis, *ids: str, pool: str = "p", max_lease_s: int = 600) -> None:
    await ClaimStore(redis, KEYS).publish_pool_settings(
        [PoolSpec(name=pool, max_lease_s=max_lease_s, lease_s=60)]
    )
    store, events = SandboxStore(redis, KEYS), EventPublisher(redis, KEYS, 1000)
    for sandbox_id in ids:
        record = SandboxRecord(
            id=sandbox_id, pool=pool, provider="local", state="creating", template="base",
            spec_revision=1, instance="test",
        )  # fmt: skip
        await store.add(record)
        await store.mark_ready(record, {}, events.build("sandbox.ready", pool=pool))


async def everything_in(redis: Redis) -> str:
    """Every key and value in Redis as text, to search for a secret."""
    out = []
    for key in await redis.keys("*"):
        kind = await redis.type(key)
        value = {
            "string": lambda k: redis.get(k),
            "hash": lambda k: redis.hgetall(k),
            "list": lambda k: redis.lrange(k, 0, -1),
            "set": lambda k: redis.smembers(k),
            "zset": lambda k: redis.zrange(k, 0, -1, withscores=True),
            "stream": lambda k: redis.xrange(k),
        }[kind](key)
        out.append(f"{key} {await value!r}")
    return "\n".join(out)


@pytest.fixture
async def clients(redis_server):
    async with (
        Client.from_url(redis_server, owner="holder") as holder,
        Client.from_url(redis_server, owner="intruder") as intruder,
    ):
        yield holder, intruder


async def test_only_the_token_holder_renews_releases_or_attaches(redis, clients):
    holder, intruder = clients
    await seed(redis, "sb-1")
    sandbox = await holder.claim("p", timeout_s=0)
    key = KEYS.sandbox(sandbox.id)
    before = await redis.hgetall(key)
    deadline = await redis.zscore(KEYS.leases, sandbox.id)

    attempts = [
        intruder.release(sandbox.id),
        intruder.release(sandbox.id, ""),
        intruder.release(sandbox.id, "a guess"),
        intruder.release(sandbox.id, sandbox.claim_id),  # the public id is no token
        intruder.release(sandbox.id, token_sha256(sandbox.claim_token)),  # nor is the hash
        intruder.renew(sandbox.id, "", -100000),
        intruder.renew(sandbox.id, "", 60),
        intruder.renew(sandbox.id, "a guess", 60),
        intruder.attach(sandbox.id, ""),
        intruder.attach(sandbox.id, "a guess"),
    ]
    for attempt in attempts:
        with pytest.raises(ClaimError) as refused:
            await attempt
        assert refused.value.reason in ("not_yours", "invalid_argument"), refused.value
    assert await redis.hgetall(key) == before
    assert await redis.zscore(KEYS.leases, sandbox.id) == deadline
    types = [e["type"] for e in await events_of(redis)]
    assert "sandbox.released" not in types and "sandbox.lease_renewed" not in types

    attached = await intruder.attach(sandbox.id, sandbox.claim_token)  # shown the token
    assert attached.claim_id == sandbox.claim_id
    await attached.renew(120)
    await sandbox.release()
    assert await redis.hget(key, "state") == "released"
    assert await redis.hget(key, "claim_token_digest") is None


@pytest.mark.parametrize(
    "lease", [0, -1, -100000, float("nan"), float("inf"), 10**12, 1.5, "60", True]
)
async def test_a_claim_with_a_bad_lease_is_refused_and_claims_nothing(redis, clients, lease):
    holder, _ = clients
    await seed(redis, "sb-1")
    with pytest.raises(ClaimError, match="lease_s must be a whole number") as refused:
        await holder.claim("p", lease_s=lease, timeout_s=0)
    assert refused.value.reason == "invalid_argument"
    assert await redis.lrange(KEYS.pool_ready("p"), 0, -1) == ["sb-1"]
    assert await redis.hget(KEYS.sandbox("sb-1"), "state") == "ready"


async def test_a_renew_with_a_bad_lease_leaves_the_lease_alone(redis, clients):
    holder, _ = clients
    await seed(redis, "sb-1")
    sandbox = await holder.claim("p", timeout_s=0)
    deadline = await redis.zscore(KEYS.leases, sandbox.id)
    for lease in (0, -100000, float("nan"), 10**12):
        with pytest.raises(ClaimError, match="lease_s must be a whole number"):
            await sandbox.renew(lease)
    with pytest.raises(ClaimError, match="max_lease_s"):
        await sandbox.renew(601)
    assert await redis.zscore(KEYS.leases, sandbox.id) == deadline
    assert await redis.hget(KEYS.sandbox(sandbox.id), "state") == "claimed"


async def test_bad_claimants_are_refused(redis, clients):
    holder, _ = clients
    await seed(redis, "sb-1")
    for owner, message in (
        ("x" * 201, "at most 200"),
        ("tab\there", "control characters"),
        ("\x1b[2Jclear", "control characters"),
        ("lone \udcff", "not valid UTF-8"),
    ):
        with pytest.raises(ClaimError, match=message):
            await holder.claim("p", timeout_s=0, owner=owner)
    assert await redis.lrange(KEYS.pool_ready("p"), 0, -1) == ["sb-1"]


async def test_cli_release_and_renew_need_the_token(redis, redis_server, tmp_path):
    await seed(redis, "sb-1", "sb-2")
    claimed = await asyncio.to_thread(cli, redis_server, "claim", "p", "--wait", "0", "-o", "json")
    assert claimed.returncode == 0, claimed.stderr
    row = json.loads(claimed.stdout)
    sandbox_id, token = row["id"], row["claim_token"]
    assert len(token) >= 43 and "not shown again" in claimed.stderr

    bare = await asyncio.to_thread(cli, redis_server, "release", sandbox_id)
    assert bare.returncode == 2 and "--token-file" in bare.stderr, bare.stderr
    wrong = await asyncio.to_thread(
        cli, redis_server, "release", sandbox_id, env={"SANDBOXD_CLAIM_TOKEN": "guess"}
    )
    assert wrong.returncode == 1 and "held by another claim" in wrong.stderr
    negative = await asyncio.to_thread(
        cli, redis_server, "renew", sandbox_id, "--lease", "-100000", "--token", token
    )
    assert negative.returncode == 2 and "lease_s must be" in negative.stderr
    assert await redis.hget(KEYS.sandbox(sandbox_id), "state") == "claimed"

    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    renewed = await asyncio.to_thread(
        cli, redis_server, "renew", sandbox_id, "--lease", "300", "--token-file", str(token_file)
    )
    assert renewed.returncode == 0, renewed.stderr
    released = await asyncio.to_thread(
        cli, redis_server, "release", sandbox_id, "--token", "-", stdin=token + "\n"
    )
    assert released.returncode == 0, released.stderr
    assert await redis.hget(KEYS.sandbox(sandbox_id), "state") == "released"

    # An operator forces the release of someone else's claim; the event says so.
    other = await asyncio.to_thread(cli, redis_server, "claim", "p", "--wait", "0", "-o", "json")
    other_id = json.loads(other.stdout)["id"]
    both = await asyncio.to_thread(
        cli, redis_server, "release", other_id, "--force", "--token", "x"
    )
    assert both.returncode == 2
    forced = await asyncio.to_thread(cli, redis_server, "release", other_id, "--force")
    assert forced.returncode == 0 and "forced" in forced.stdout, forced.stderr
    event = await wait_event(redis, "sandbox.released", sandbox=other_id)
    assert event["data"]["forced"] is True and "@" in event["data"]["forced_by"]
    mine = await wait_event(redis, "sandbox.released", sandbox=sandbox_id)
    assert mine["data"]["forced"] is False


async def test_the_token_is_nowhere_but_with_the_claimant(redis, redis_server):
    """Not in Redis (only its SHA-256, in the record), no event, no `get`/`status`/`events`
    output; the claim's reply to the client does not carry the hash either."""
    await seed(redis, "sb-1")
    claimed = await asyncio.to_thread(cli, redis_server, "claim", "p", "--wait", "0", "-o", "json")
    row = json.loads(claimed.stdout)
    token, digest = row["claim_token"], token_digest(row["claim_token"])
    assert "claim_token_digest" not in json.dumps(row) and digest not in claimed.stdout
    assert token_sha256(token) not in claimed.stdout
    env = {"SANDBOXD_CLAIM_TOKEN": token}
    assert (await asyncio.to_thread(cli, redis_server, "renew", row["id"], env=env)).returncode == 0

    stored = await everything_in(redis)
    assert token not in stored
    assert stored.count(digest) == 1  # the record's claim_token_digest only
    assert token_sha256(token) not in stored  # what renew/release need is not in Redis
    for args in (
        ["get", "sandboxes", "-o", "json"],
        ["get", "sandboxes"],
        ["status", "-o", "json"],
        ["events", "-o", "json", "-n", "100"],
    ):
        shown = await asyncio.to_thread(cli, redis_server, *args)
        assert token not in shown.stdout + shown.stderr
        assert digest not in shown.stdout + shown.stderr

    assert (
        await asyncio.to_thread(cli, redis_server, "release", row["id"], env=env)
    ).returncode == 0
    assert token not in await everything_in(redis)
    assert digest not in await everything_in(redis)  # released: the hash is dropped


async def test_exec_in_a_held_sandbox_needs_its_token(
    redis, redis_server, daemon_factory, tmp_path
):
    daemon = daemon_factory().start()
    await apply(redis, [{"name": "default", "min_ready": 1}])
    await wait_ready(redis, "default", 1)
    claimed = await asyncio.to_thread(cli, redis_server, "claim", "default", "-o", "json")
    assert claimed.returncode == 0, claimed.stderr
    sandbox_id, token = (json.loads(claimed.stdout)[k] for k in ("id", "claim_token"))

    async def run(*extra: str, env: dict | None = None, stdin: str | None = None):
        argv = ["exec", "--sandbox", sandbox_id, *extra, "--", "echo", "inside"]
        return await asyncio.to_thread(cli, redis_server, *argv, env=env, stdin=stdin)

    bare = await run()
    assert bare.returncode == 2 and "needs the claim's token" in bare.stderr
    guessed = await run(env={"SANDBOXD_CLAIM_TOKEN": "guess"})
    assert guessed.returncode == 1 and "held by another claim" in guessed.stderr
    assert "inside" not in bare.stdout + guessed.stdout
    both_stdin = await run("-i", "--token", "-", stdin=token)
    assert both_stdin.returncode == 2

    token_file = tmp_path / "token"
    token_file.write_text(token)
    for ok in (
        await run(env={"SANDBOXD_CLAIM_TOKEN": token}),
        await run("--token-file", str(token_file)),
        await run("--token", "-", stdin=token + "\n"),
    ):
        assert (ok.returncode, ok.stdout) == (0, "inside\n"), ok.stderr
    assert await redis.hget(KEYS.sandbox(sandbox_id), "state") == "claimed"

    # `exec POOL` claims and releases with a token of its own, never shown.
    pooled = await asyncio.to_thread(cli, redis_server, "exec", "default", "--", "echo", "hi")
    assert pooled.returncode == 0, pooled.stderr
    released = await asyncio.to_thread(
        cli, redis_server, "release", sandbox_id, env={"SANDBOXD_CLAIM_TOKEN": token}
    )
    assert released.returncode == 0
    await wait_event(redis, "sandbox.terminated", sandbox=sandbox_id, reason="released")
    daemon.stop()
    assert token not in daemon.log_path.read_text(errors="replace")
    assert token not in await everything_in(redis)


async def test_what_a_record_holds_is_not_enough_to_release_it(redis):
    """Every client may read records: running the release script by hand with the record's
    digest (instead of the token's SHA-256, which only the claimant can make) is refused."""
    await seed(redis, "sb-1")
    async with Client(redis, owner="holder") as holder:
        sandbox = await holder.claim("p", timeout_s=0)
        key = KEYS.sandbox(sandbox.id)
        digest = await redis.hget(key, "claim_token_digest")
        assert digest and digest != token_sha256(sandbox.claim_token)
        store = ClaimStore(redis, KEYS)
        with pytest.raises(ClaimError) as refused:
            await store._run_release(store._release, sandbox.id, digest.ljust(64, "0"))
        assert refused.value.reason == "not_yours"
        assert await redis.hget(key, "state") == "claimed"
        await sandbox.release()


@pytest.mark.parametrize(
    "settings",
    [
        '{"provider":"local","min_ready":"x","max_total":5,"lease_s":300,"max_lease_s":3600,'
        '"on_empty":"wait","reuse":"never"}',
        '{"provider":"local","min_ready":1,"max_total":5,"lease_s":1e400,"max_lease_s":1e401,'
        '"on_empty":"wait","reuse":"never"}',
        "not json",
    ],
)
async def test_damaged_pool_settings_refuse_a_claim_before_any_write(redis, settings):
    """A claim never leaves a sandbox claimed by nobody: settings that are not numbers
    (or not finite) are refused before the first write."""
    await seed(redis, "sb-1")
    await redis.hset(KEYS.pools, "p", settings)
    before = await redis.hgetall(KEYS.sandbox("sb-1"))
    async with Client(redis, owner="someone") as client:
        with pytest.raises(ClaimError) as refused:
            await client.claim("p", timeout_s=0)
    assert refused.value.reason == "corrupt"
    assert await redis.hgetall(KEYS.sandbox("sb-1")) == before
    assert await redis.lrange(KEYS.pool_ready("p"), 0, -1) == ["sb-1"]


@pytest.mark.parametrize(
    "name",
    ["ready", "leases", "events", "waiters", "members", "pools"],
)
async def test_a_wrong_typed_key_refuses_a_claim_before_any_write(redis, name):
    """Every key the claim script reads or writes, holding another type (anyone with write
    access may put anything there): a clear `corrupt` naming the key, nothing changed."""
    await seed(redis, "sb-1")
    key = {
        "ready": KEYS.pool_ready("p"),
        "leases": KEYS.leases,
        "events": KEYS.events,
        "waiters": KEYS.pool_waiters("p"),
        "members": KEYS.pool_members("p"),
        "pools": KEYS.pools,
    }[name]
    await redis.delete(key)
    await redis.set(key, "not what it should be")
    before = {k: await redis.type(k) for k in await redis.keys("*")}
    record = await redis.hgetall(KEYS.sandbox("sb-1"))
    async with Client(redis, owner="someone") as client:
        with pytest.raises(ClaimError) as refused:
            await client.claim("p", timeout_s=0)
    assert refused.value.reason == "corrupt" and f"{key} holds a string" in str(refused.value)
    assert await redis.hgetall(KEYS.sandbox("sb-1")) == record
    assert {k: await redis.type(k) for k in await redis.keys("*")} == before
    if name != "ready":
        assert await redis.lrange(KEYS.pool_ready("p"), 0, -1) == ["sb-1"]


async def test_a_ready_id_whose_record_is_not_a_hash_is_skipped(redis):
    """A ready entry naming a key of another type (or none) is stale: dropped, and the next
    ready sandbox claimed, with every field the claimant needs."""
    await seed(redis, "sb-1", "sb-2")
    await redis.delete(KEYS.sandbox("sb-1"))
    await redis.set(KEYS.sandbox("sb-1"), "junk")
    await redis.lpush(KEYS.pool_ready("p"), "sb-gone")
    async with Client(redis, owner="someone") as client:
        sandbox = await client.claim("p", timeout_s=0, lease_s=30)
    assert (sandbox.id, sandbox.pool, sandbox.provider, sandbox.claimant) == (
        "sb-2", "p", "local", "someone",
    )  # fmt: skip
    record = await redis.hgetall(KEYS.sandbox("sb-2"))
    assert record["state"] == "claimed" and record["uses"] == "1"
    assert sandbox.lease_s == 30 and sandbox.lease_expires_ms == int(record["lease_expires_ms"])
    assert sandbox.claim_id == record["claim_id"]
    assert await redis.lrange(KEYS.pool_ready("p"), 0, -1) == []
    assert await redis.get(KEYS.sandbox("sb-1")) == "junk"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("handle", "{not json"),
        ("secrets", '{"token": 5}'),
        ("handle", "[]"),
        ("id", "sb-2"),
        ("pool", b"p\xff"),
        ("id", "sb-1\x00"),
    ],
)
async def test_a_claimed_record_the_claimant_cannot_use_is_given_back(
    redis, redis_server, field, value
):
    """The claim reply carries only the fields a claimant needs; one of them damaged (by
    whoever may write records) is a clear `corrupt`, and the sandbox is released at once
    rather than held by nobody until its lease ends."""
    await seed(redis, "sb-1")
    await redis.hset(KEYS.sandbox("sb-1"), field, value)
    async with Client.from_url(redis_server, owner="someone") as client:
        with pytest.raises(ClaimError) as refused:
            await client.claim("p", timeout_s=0)
    assert refused.value.reason == "corrupt" and field in str(refused.value)
    assert await redis.hget(KEYS.sandbox("sb-1"), "state") == "released"


async def test_an_events_stream_that_takes_no_entry_refuses_the_claim_unchanged(redis):
    """Found from outside: a stream whose last id is the largest there is refuses every
    XADD; the claim wrote its record and lease first, then failed, and the sandbox stayed
    claimed by nobody. The event is now written first: refused, nothing changes."""
    await seed(redis, "sb-1")
    await redis.xadd(KEYS.events, {"a": "b"}, id="18446744073709551615-18446744073709551615")
    record = await redis.hgetall(KEYS.sandbox("sb-1"))
    async with Client(redis, owner="someone") as client:
        with pytest.raises(ClaimError) as refused:
            await client.claim("p", timeout_s=0)
    assert refused.value.reason == "corrupt" and KEYS.events in str(refused.value)
    assert await redis.hgetall(KEYS.sandbox("sb-1")) == record
    assert await redis.lrange(KEYS.pool_ready("p"), 0, -1) == ["sb-1"]
    assert await redis.zcard(KEYS.leases) == 0
