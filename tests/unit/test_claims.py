"""The claim scripts against a real redis-server, driven by random operation sequences.

A plain-Python model says what each operation must do; after every step Redis must agree:
FIFO claims of ready sandboxes only, one holder per sandbox, release/renew only by the
holder, the ready list and the lease index exactly matching the records, and the daemon
nudged exactly when a claim leaves it something to do.
"""

import asyncio
import itertools

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from sandboxd.claims import ClaimError, ClaimStore, new_claim_token, token_sha256
from sandboxd.events import EventPublisher
from sandboxd.spec import PoolSpec
from sandboxd.state import SandboxRecord, SandboxStore

from helpers import KEYS

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
        self.last_claim: bool | None = None  # whether the last claim had to nudge


MIN_READY, MAX_TOTAL = 2, 4
HASH_FIELD = "claim_token_sha256"


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
        assert seen == (["p"] if model.last_claim else [])
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
        model.last_claim = was_empty or nudge_due(model)
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
        assert fields == ["claimed", claim_id, token_sha256(token)]
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
