"""The claim scripts against a real redis-server, driven by random operation sequences.

A plain-Python model says what each operation must do; after every step Redis must agree:
FIFO claims of ready sandboxes only, one holder per sandbox, release/renew only by the
holder, the ready list and the lease index exactly matching the records, and the daemon
nudged exactly when a claim leaves it something to do.
"""

import asyncio
import itertools
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from sandboxd.spec import PoolSpec
from sandboxd.store.claims import (
    CLAIM,
    FORCE_RELEASE,
    MAX_CLAIMANT_BYTES,
    MAX_LEASE_S,
    MAX_STREAM_MAXLEN,
    MAX_WAIT_MS,
    RELEASE,
    RENEW,
    ClaimError,
    ClaimStore,
    new_claim_token,
    token_digest,
    token_sha256,
)
from sandboxd.store.events import EventPublisher
from sandboxd.store.records import SandboxRecord, SandboxStore
from tests.support import KEYS

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("ready"), st.integers(0, 0)),
        st.tuples(st.just("claim"), st.integers(0, 3)),
        st.tuples(st.just("release"), st.integers(0, 3)),
        st.tuples(st.just("release_foreign"), st.integers(0, 3)),
        st.tuples(st.just("release_empty"), st.integers(0, 3)),
        st.tuples(st.just("renew_foreign"), st.integers(0, 3)),
        st.tuples(st.just("renew"), st.integers(0, 3)),
        st.tuples(st.just("scale_down"), st.integers(0, 0)),
        st.tuples(st.just("reset"), st.integers(0, 0)),
    ),
    max_size=40,
)


class Model:
    def __init__(self) -> None:
        self.ready: list[str] = []  # FIFO
        self.held: dict[int, tuple[str, str, str]] = {}  # client -> (sandbox, claim id, token)
        self.released: list[str] = []
        self.members: set[str] = set()  # every sandbox of the pool, any state
        self.last_claim: str | None = None  # what the last claim published ("": nothing)


MIN_READY, MAX_TOTAL = 2, 4
HASH_FIELD = "claim_token_digest"


async def run(url: str, ops: list[tuple[str, int]]) -> None:
    redis = Redis.from_url(url, decode_responses=True)
    try:
        await redis.flushall()
        store = SandboxStore(redis, KEYS)
        claims = ClaimStore(redis, KEYS)
        events = EventPublisher(redis, KEYS, 1000)
        pool = PoolSpec(name="p", min_ready=MIN_READY, max_total=MAX_TOTAL, max_lease_s=3600)
        await claims.publish_pool_settings([pool])
        model, ids = Model(), itertools.count()
        async with redis.pubsub() as nudges:
            await nudges.subscribe(KEYS.nudge)
            await nudges.get_message(timeout=5)  # the subscribe confirmation
            for op, client in ops:
                await step(op, client, model, store, claims, events, ids)
                await check(redis, model)
                await check_nudges(redis, nudges, model, op)
    finally:
        await redis.aclose()


async def check_nudges(redis: Redis, nudges, model: Model, op: str) -> None:
    """What the step published on the nudge channel: everything before our own marker."""
    await redis.publish(KEYS.nudge, "marker")
    seen = []
    while (message := await nudges.get_message(timeout=5)) and message["data"] != "marker":
        seen.append(message["data"])
    if op == "claim" and model.last_claim is not None:
        assert seen == ([model.last_claim] if model.last_claim else [])
        model.last_claim = None


def nudge_due(model: Model) -> bool:
    """After a claim that got a sandbox: a replacement is due and allowed."""
    return len(model.ready) < MIN_READY and len(model.members) < MAX_TOTAL


async def step(op, client, model, store, claims, events, ids) -> None:
    if op == "ready":
        record = SandboxRecord(
            id=f"sb-{next(ids)}", pool="p", provider="local", state="creating",
            template="base", spec_revision=1, instance="t",
        )  # fmt: skip
        await store.add(record)
        assert await store.mark_ready(record, {}, events.build("sandbox.ready", pool="p"))
        model.ready.append(record.id)
        model.members.add(record.id)
    elif op == "claim" and client not in model.held:
        token = new_claim_token()
        outcome = await claims.try_claim(
            "p", claimant=f"c{client}", claim_id=f"k{next(ids)}", token=token
        )
        was_empty = not model.ready
        if model.ready:
            assert outcome.record is not None and outcome.record.id == model.ready.pop(0)
            assert outcome.record.state == "claimed"
            model.held[client] = (outcome.record.id, outcome.record.claim_id, token)
        else:
            assert outcome.record is None and outcome.on_empty == "wait"
        # An empty pool says so (someone waits: the daemon acts at once); a replacement due
        # and allowed names the pool; nothing else wakes the daemon.
        model.last_claim = "empty:p" if was_empty else "p" if nudge_due(model) else ""
    elif op.startswith(("release", "renew")) and client in model.held:
        sandbox, _, token = model.held[client]
        if op in ("release_foreign", "release_empty", "renew_foreign"):
            other = {"release_empty": ""}.get(op, new_claim_token())
            attempt = claims.renew(sandbox, other, 60) if op == "renew_foreign" else None
            try:
                await (attempt or claims.release(sandbox, other))
                raise AssertionError(f"{op}: a sandbox was taken without its claim token")
            except ClaimError as exc:
                assert exc.reason == "not_yours"
        elif op == "renew":
            assert await claims.renew(sandbox, token, lease_s=60) > 0
        else:
            await claims.release(sandbox, token)
            del model.held[client]
            model.released.append(sandbox)
    elif op == "scale_down" and model.ready:
        oldest = await store.get(model.ready[0])
        assert await store.begin_terminate(oldest, "ready") == "ready"
        await store.remove(oldest)
        model.members.discard(model.ready.pop(0))
    elif op == "reset" and model.released:
        record = await store.get(model.released.pop(0))
        assert await store.transition(record, "resetting", "released") == "released"
        event = events.build("sandbox.reset", pool="p", sandbox=record.id)
        assert await store.mark_ready(record, {}, event, from_state="resetting")
        model.ready.append(record.id)


async def check(redis: Redis, model: Model) -> None:
    assert await redis.lrange(KEYS.pool_ready("p"), 0, -1) == model.ready
    held = {sandbox for sandbox, _, _ in model.held.values()}
    assert set(await redis.zrange(KEYS.leases, 0, -1)) == held
    for sandbox, claim_id, token in model.held.values():
        fields = await redis.hmget(KEYS.sandbox(sandbox), "state", "claim_id", HASH_FIELD)
        assert fields == ["claimed", claim_id, token_digest(token)]
    for sandbox in model.ready:
        assert await redis.hget(KEYS.sandbox(sandbox), "state") == "ready"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
@example(ops=[("ready", 0)] * 3 + [("claim", 0)])  # ready back at min_ready: no nudge
@example(ops=[("ready", 0)] * 4 + [("claim", 0), ("claim", 1), ("claim", 2)])  # at max_total
def test_claim_scripts_agree_with_the_model(redis_server, ops):
    asyncio.run(run(redis_server, ops))


async def test_claim_of_an_unknown_pool_and_too_long_lease_are_refused(redis):
    claims = ClaimStore(redis, KEYS)
    await claims.publish_pool_settings([PoolSpec(name="p", lease_s=10, max_lease_s=20)])
    for pool, lease, reason in (("nope", None, "unknown_pool"), ("p", 21, "lease_too_long")):
        try:
            await claims.try_claim(pool, claimant="c", claim_id="k", token="t", lease_s=lease)
            raise AssertionError("refusal expected")
        except ClaimError as exc:
            assert exc.reason == reason


# --- The scripts check their arguments, whoever calls them -------------------------------
#
# Each script is run directly (EVAL, as any Redis client could), with one argument at a
# time replaced by a bad value; it must refuse with `invalid_argument` and every key must
# be exactly as before (a DUMP of each). The Python client's own checks are bypassed.

POOL_MAX_LEASE = 100
HELD, HELD_TOKEN, READY = "sb-held", "the-holders-token", "sb-ready"


def seed(r: SyncRedis) -> None:
    """A pool with one ready sandbox and one held by a claim whose token is HELD_TOKEN."""
    r.flushall()
    settings = {"provider": "local", "min_ready": 1, "max_total": 4, "lease_s": 10}
    settings |= {"max_lease_s": POOL_MAX_LEASE, "on_empty": "create", "reuse": "never"}
    r.hset(KEYS.pools, "p", json.dumps(settings))
    base = {"pool": "p", "provider": "local", "template": "t", "spec_revision": "1"}
    r.hset(KEYS.sandbox(READY), mapping={"id": READY, "state": "ready", **base})
    far = str(int(time.time() * 1000) + 3_600_000)
    held = {"id": HELD, "state": "claimed", "claimant": "holder", "claim_id": "k-held"}
    held |= {"claimed_at_ms": "1", "lease_s": "10", "max_lease_s": str(POOL_MAX_LEASE)}
    held |= {"lease_expires_ms": far, HASH_FIELD: token_digest(HELD_TOKEN)}
    r.hset(KEYS.sandbox(HELD), mapping={**held, **base})
    r.rpush(KEYS.pool_ready("p"), READY)
    r.sadd(KEYS.sandboxes, READY, HELD)
    r.sadd(KEYS.pool_members("p"), READY, HELD)
    r.zadd(KEYS.leases, {HELD: int(far)})
    r.xadd(KEYS.events, {"type": "seed"})


def snapshot(r: SyncRedis) -> dict[bytes, bytes]:
    return {key: r.dump(key) for key in sorted(r.keys("*"))}


def claim_call(**change: Any) -> tuple[list[Any], list[Any]]:
    keys = [KEYS.pool_ready("p"), KEYS.leases, KEYS.events, KEYS.pool_waiters("p")]
    args = {
        "prefix": KEYS.prefix, "pool": "p", "claimant": "c", "claim_id": "k1", "lease_s": "",
        "event_id": "e1", "time": "2025-01-02T03:04:05.678Z", "maxlen": "1000",
        "wait_ms": "5000", "nudge": KEYS.nudge, "token_sha256": token_sha256("mine"), "via": "",
    }  # fmt: skip
    return keys, list((args | change).values())


def record_call(sandbox: str, *middle: Any, **change: Any) -> tuple[list[Any], list[Any]]:
    """renew (middle: token hash, lease_s) or release (middle: token hash) of `sandbox`."""
    keys = [KEYS.sandbox(sandbox), KEYS.leases, KEYS.events]
    tail = {"event_id": "e1", "time": "2025-01-02T03:04:05.678Z", "maxlen": "1000"}
    return keys, [sandbox, *middle, *(tail | change).values()]


def run_script(r: SyncRedis, script: str, keys: list[Any], args: list[Any]) -> list[Any]:
    reply = r.eval(script, len(keys), *keys, *args)
    return [x.decode() if isinstance(x, bytes) else x for x in reply]


def assert_refused_unchanged(r: SyncRedis, script: str, keys, args, reason="invalid_argument"):
    before = snapshot(r)
    reply = run_script(r, script, keys, args)
    assert reply[0] == reason, (reply, args)
    assert snapshot(r) == before, f"{reply} changed Redis"
    return reply


def not_uint(low: int, high: int) -> st.SearchStrategy[Any]:
    """Strings (and bytes) that are not a plain decimal integer in [low, high]."""
    specials = [
        "", "0", "-1", "-100000", "+5", "nan", "NaN", "-nan", "inf", "-inf", "Infinity",
        "1e3", "1E3", "1.5", "5.0", " 5", "5 ", "0x10", "1_000", "9" * 400, "١٢",
        str(high + 1), str(2**63), str(10**30),
    ]  # fmt: skip
    numbers = st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1)).map(str)
    floats = st.floats(allow_nan=True, allow_infinity=True).map(repr)
    texts = st.text(max_size=30).filter(lambda s: not s.isascii() or not s.isdigit())
    raw = st.binary(max_size=30).filter(lambda b: not b.isdigit())
    values = st.one_of(st.sampled_from(specials), numbers, floats, texts, raw)
    return values.filter(lambda v: not _uint_in(v, low, high))


def _uint_in(value: Any, low: int, high: int) -> bool:
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return text.isascii() and text.isdigit() and low <= int(text) <= high


BAD_HASHES = st.one_of(
    st.sampled_from(["", token_sha256("x").upper(), token_sha256("x")[:63], "g" * 64]),
    st.text(max_size=70).filter(lambda s: not re.fullmatch(r"[0-9a-f]{64}", s)),
    st.binary(max_size=70).filter(lambda b: not re.fullmatch(rb"[0-9a-f]{64}", b)),
)
BAD_IDENTS = st.one_of(
    st.sampled_from(["", "a" * 65, "has space", "semi;colon", "new\nline", "ü"]),
    st.binary(min_size=1, max_size=70).filter(lambda b: not re.fullmatch(rb"[\w.:-]{1,64}", b)),
)
CHECKS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def valid_claimant(raw: bytes) -> bool:
    """The reference the claim script must agree with."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    bad = any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text)
    return 1 <= len(raw) <= MAX_CLAIMANT_BYTES and not bad


@pytest.fixture(scope="module")
def sync_redis(redis_server: str) -> Iterator[SyncRedis]:
    r = SyncRedis.from_url(redis_server)
    yield r
    r.close()


@CHECKS
@given(
    change=st.one_of(
        st.fixed_dictionaries({"lease_s": not_uint(1, MAX_LEASE_S)}).filter(
            lambda c: c["lease_s"] not in ("", b"")  # "": the default
        ),
        st.fixed_dictionaries({"wait_ms": not_uint(0, MAX_WAIT_MS)}),
        st.fixed_dictionaries({"maxlen": not_uint(1, MAX_STREAM_MAXLEN)}),
        st.fixed_dictionaries({"token_sha256": BAD_HASHES}),
        st.fixed_dictionaries({"claim_id": BAD_IDENTS}),
        st.fixed_dictionaries({"event_id": BAD_IDENTS}),
        st.fixed_dictionaries({"via": BAD_IDENTS}).filter(lambda c: c["via"] not in ("", b"")),
        st.fixed_dictionaries({"time": st.one_of(st.just(""), st.text(max_size=50))}).filter(
            lambda c: (
                not re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+[Z\d:+-]*", c["time"])
                or len(c["time"]) > 40
            )
        ),
        st.fixed_dictionaries({"claimant": st.binary(max_size=220)}).filter(
            lambda c: not valid_claimant(c["claimant"])
        ),
        st.fixed_dictionaries({"nudge": st.sampled_from(["other:nudge", "", "sandboxd:x"])}),
        st.fixed_dictionaries({"prefix": st.sampled_from(["other", "", "a b"])}),
    )
)
def test_claim_script_refuses_bad_arguments_and_changes_nothing(sync_redis, change):
    seed(sync_redis)
    keys, args = claim_call(**change)
    assert_refused_unchanged(sync_redis, CLAIM, keys, args)


@CHECKS
@given(
    lease=not_uint(1, MAX_LEASE_S).filter(lambda v: v not in ("", b"")),
    token=st.sampled_from([HELD_TOKEN, "someone else"]),
)
def test_renew_script_refuses_bad_leases_and_changes_nothing(sync_redis, lease, token):
    """The attack that expired another client's sandbox at once: renew(id, "", -100000)."""
    seed(sync_redis)
    keys, args = record_call(HELD, token_sha256(token), lease)
    assert_refused_unchanged(sync_redis, RENEW, keys, args)


@CHECKS
@given(bad_hash=BAD_HASHES, script=st.sampled_from(["renew", "release"]))
def test_renew_and_release_refuse_malformed_token_hashes(sync_redis, bad_hash, script):
    seed(sync_redis)
    if script == "renew":
        keys, args = record_call(HELD, bad_hash, "50")
        assert_refused_unchanged(sync_redis, RENEW, keys, args)
    else:
        keys, args = record_call(HELD, bad_hash, nudge=KEYS.nudge)
        assert_refused_unchanged(sync_redis, RELEASE, keys, args)


@CHECKS
@given(args=st.lists(st.one_of(st.binary(max_size=80), st.text(max_size=40)), max_size=14))
def test_scripts_given_any_arguments_refuse_without_a_trace(sync_redis, args):
    """Arbitrary argument lists (wrong count, wrong everything): no Lua error, no change."""
    seed(sync_redis)
    for script, keys in (
        (CLAIM, claim_call()[0]),
        (RENEW, record_call(HELD)[0]),
        (RELEASE, record_call(HELD)[0]),
        (FORCE_RELEASE, record_call(HELD)[0]),
    ):
        assert_refused_unchanged(sync_redis, script, keys, args)


@CHECKS
@given(claimant=st.one_of(st.binary(max_size=210), st.text(max_size=210).map(str.encode)))
# the edges of the script's printable-ASCII shortcut (` ` to `~` skip the walk, DEL must not)
@example(claimant=b" ~ printable")
@example(claimant=b"del\x7f")
@example(claimant=b"tab\tx")
@example(claimant=b"\x1f")
@example(claimant=b"caf\xc3\xa9")
def test_claim_script_takes_exactly_the_valid_claimants(sync_redis, claimant):
    """Bytes that are not UTF-8 text would break every reader of the record (the daemon
    decodes replies as UTF-8); the script's verdict must match Python's strict decoder."""
    seed(sync_redis)
    sync_redis.delete(KEYS.pool_ready("p"))  # empty pool: a valid claim changes no key
    keys, args = claim_call(claimant=claimant, wait_ms="0")
    before = snapshot(sync_redis)
    reply = run_script(sync_redis, CLAIM, keys, args)
    assert snapshot(sync_redis) == before
    assert reply[0] == ("empty" if valid_claimant(claimant) else "invalid_argument"), reply


def test_empty_or_wrong_tokens_are_refused_and_the_holder_keeps_the_sandbox(sync_redis):
    """Old code: release(id, "") and renew(id, "", lease) were accepted from anyone."""
    seed(sync_redis)
    for token in ("", "someone else's"):
        keys, args = record_call(HELD, token_sha256(token), nudge=KEYS.nudge)
        assert_refused_unchanged(sync_redis, RELEASE, keys, args, reason="not_yours")
        keys, args = record_call(HELD, token_sha256(token), "50")
        assert_refused_unchanged(sync_redis, RENEW, keys, args, reason="not_yours")
    for empty in ("", b""):  # the old "any claim" wildcard
        keys, args = record_call(HELD, empty, nudge=KEYS.nudge)
        assert_refused_unchanged(sync_redis, RELEASE, keys, args)
    # A claim that predates tokens (no hash stored) cannot be taken with any token either.
    sync_redis.hdel(KEYS.sandbox(HELD), HASH_FIELD)
    keys, args = record_call(HELD, token_sha256(""), nudge=KEYS.nudge)
    assert_refused_unchanged(sync_redis, RELEASE, keys, args, reason="not_yours")
    keys, args = record_call(HELD, token_sha256(HELD_TOKEN), "50")
    assert_refused_unchanged(sync_redis, RENEW, keys, args, reason="not_yours")


def test_the_holder_renews_and_releases_with_its_token(sync_redis):
    seed(sync_redis)
    keys, args = record_call(HELD, token_sha256(HELD_TOKEN), "100")
    assert run_script(sync_redis, RENEW, keys, args)[0] == "ok"
    keys, args = record_call(HELD, token_sha256(HELD_TOKEN), "101")
    assert_refused_unchanged(sync_redis, RENEW, keys, args, reason="lease_too_long")
    keys, args = record_call(HELD, token_sha256(HELD_TOKEN), nudge=KEYS.nudge)
    assert run_script(sync_redis, RELEASE, keys, args) == ["ok"]
    fields = sync_redis.hgetall(KEYS.sandbox(HELD))
    assert fields[b"state"] == b"released" and HASH_FIELD.encode() not in fields
    assert sync_redis.zscore(KEYS.leases, HELD) is None


@pytest.mark.parametrize("lease", ["nan", "NaN", "inf", "-100000", "0", "1e9", "99999999999"])
def test_a_claim_with_a_bad_lease_claims_nothing(sync_redis, lease):
    """Old code: lease 'nan' set state=claimed, then failed at ZADD: a claimed sandbox
    that never expired. Now the ready sandbox stays ready and nothing else moves."""
    seed(sync_redis)
    keys, args = claim_call(lease_s=lease)
    assert_refused_unchanged(sync_redis, CLAIM, keys, args)
    assert sync_redis.hget(KEYS.sandbox(READY), "state") == b"ready"


def test_a_claim_stores_only_the_token_hash_and_replies_without_it(sync_redis):
    seed(sync_redis)
    keys, args = claim_call(lease_s="100")
    reply = run_script(sync_redis, CLAIM, keys, args)
    assert reply[0] == "ok"
    assert HASH_FIELD.encode() not in reply[1] and token_digest("mine").encode() not in reply[1]
    stored = sync_redis.hget(KEYS.sandbox(READY), HASH_FIELD)
    assert stored == token_digest("mine").encode()
    keys, args = claim_call(lease_s=str(POOL_MAX_LEASE + 1))
    assert_refused_unchanged(sync_redis, CLAIM, keys, args, reason="lease_too_long")


async def test_a_sandboxs_secrets_are_kept_apart_and_only_the_claim_path_returns_them(redis):
    """A handle's `secrets` go to the record's own field (never into the handle, a view or
    an event); a reset keeps them; the claim reply and attach give them to the holder."""
    from sandboxd.cli.views import sandbox_row
    from sandboxd.client import Client

    claims, store = ClaimStore(redis, KEYS), SandboxStore(redis, KEYS)
    events = EventPublisher(redis, KEYS, 1000)
    await claims.publish_pool_settings([PoolSpec(name="p", provider="e2b", reuse="reset")])
    record = SandboxRecord(
        id="sb-1", pool="p", provider="e2b", state="creating", template="base",
        spec_revision=1, instance="i",
    )  # fmt: skip
    await store.add(record)
    secret = "envd-token-0123456789"
    handle = {"e2b_id": "iabc", "secrets": {"envd_access_token": secret}}
    assert await store.mark_ready(record, handle, events.build("sandbox.ready", pool="p"))
    assert handle["secrets"]  # the caller's dict is left alone
    fields = await redis.hgetall(KEYS.sandbox("sb-1"))
    assert json.loads(fields["handle"]) == {"e2b_id": "iabc"}
    assert json.loads(fields["secrets"]) == {"envd_access_token": secret}
    stored = await store.get("sb-1")
    assert stored is not None and secret not in repr(stored)
    assert secret not in json.dumps(sandbox_row(stored))

    # A reset sandbox made ready again without secrets keeps those it has.
    await redis.hset(KEYS.sandbox("sb-1"), "state", "resetting")
    await redis.lrem(KEYS.pool_ready("p"), 0, "sb-1")
    assert await store.mark_ready(
        stored, {"e2b_id": "iabc"}, events.build("sandbox.reset", pool="p"), from_state="resetting"
    )
    assert json.loads(await redis.hget(KEYS.sandbox("sb-1"), "secrets")) == {
        "envd_access_token": secret
    }

    async with Client(redis, prefix=KEYS.prefix) as client:
        sandbox = await client.claim("p", timeout_s=0)
        assert sandbox.access_secrets() == {"envd_access_token": secret}
        assert secret not in repr(sandbox) and "secrets" not in sandbox.connection_info
        attached = await client.attach(sandbox.id, sandbox.claim_token)
        assert attached.access_secrets() == {"envd_access_token": secret}
        with pytest.raises(ClaimError):
            await client.attach(sandbox.id, "sbt_not-the-token")
        await client.renew(sandbox.id, sandbox.claim_token, 30)
        await sandbox.release()
    assert secret not in str(await redis.xrange(KEYS.events))


async def test_the_client_checks_before_sending(redis):
    """Clear errors without a round trip; the scripts check again regardless."""
    claims = ClaimStore(redis, KEYS)
    await claims.publish_pool_settings([PoolSpec(name="p")])
    cases = [
        ({"lease_s": 0}, "lease_s must be a whole number"),
        ({"lease_s": -5}, "lease_s must be a whole number"),
        ({"lease_s": float("nan")}, "lease_s must be a whole number"),
        ({"lease_s": True}, "lease_s must be a whole number"),
        ({"lease_s": MAX_LEASE_S + 1}, "lease_s must be a whole number"),
        ({"claimant": ""}, "claimant is empty"),
        ({"claimant": "x" * 201}, "at most 200"),
        ({"claimant": "bell\x07"}, "control characters"),
        ({"claimant": "half \udc80 surrogate"}, "not valid UTF-8"),
    ]
    for change, message in cases:
        call = {"claimant": "c", "claim_id": "k", "token": "t"} | change
        with pytest.raises(ClaimError, match=message) as refused:
            await claims.try_claim("p", **call)
        assert refused.value.reason == "invalid_argument"
    with pytest.raises(ClaimError, match="no claim token given") as refused:
        await claims.release("sb-x", "")
    assert refused.value.reason == "not_yours"
    with pytest.raises(ClaimError, match="no claim token given"):
        await claims.renew("sb-x", "", 10)


def test_what_a_claim_returns_is_typed_as_the_record_is():
    from sandboxd.store.records import CLAIMED_FIELDS, Claimed, SandboxRecord

    assert CLAIMED_FIELDS and "claim_token_digest" not in CLAIMED_FIELDS
    for name, field in Claimed.model_fields.items():
        assert field.annotation == SandboxRecord.model_fields[name].annotation, name
