import fakeredis

from sandboxd.spec import PoolSpec, Spec, parse_document
from sandboxd.store.keys import SPEC_HISTORY_LEN, Keys
from sandboxd.store.specs import SpecStore


async def test_apply_bumps_revision_and_keeps_history():
    redis = fakeredis.FakeAsyncRedis(decode_responses=True)
    store = SpecStore(redis, Keys("t"))
    pubsub = redis.pubsub()
    await pubsub.subscribe("t:nudge")
    for size in range(1, SPEC_HISTORY_LEN + 6):
        applied = await store.apply(Spec(pools=[PoolSpec(name="a", min_ready=size % 3)]))
        assert applied.document.revision == size
    doc = parse_document(await redis.get("t:spec"))
    assert doc.revision == SPEC_HISTORY_LEN + 5
    history = await store.history()
    assert len(history) == SPEC_HISTORY_LEN
    assert [h.revision for h in history[:2]] == [doc.revision, doc.revision - 1]
    assert applied.previous.revision == doc.revision - 1
    await pubsub.aclose()


async def test_revision_continues_after_an_invalid_spec_was_written():
    redis = fakeredis.FakeAsyncRedis(decode_responses=True)
    await redis.set("t:spec", '{"revision": 7, "pools": [{"name": "BAD"}]}')
    applied = await SpecStore(redis, Keys("t")).apply(Spec())
    assert applied.document.revision == 8 and applied.previous is None
