"""Repairs that need a real Redis (SCAN, Lua) but no daemon."""

from sandboxd.control.repair import Healer, Quarantine
from sandboxd.store.events import EventPublisher
from sandboxd.store.keys import Keys
from sandboxd.store.records import SandboxStore

KEYS = Keys("repair")


async def test_a_record_key_of_another_type_is_found_when_the_id_set_is_rebuilt(redis):
    """The id set deleted while a record was overwritten as a string: the rebuilt set holds
    that id too, so the next pass reads it as corrupt and quarantines it (before, a SCAN for
    hashes only left the string behind, where no pass ever looked)."""
    events = EventPublisher(redis, KEYS, 1000)
    await redis.hset(KEYS.sandbox("sb-good"), mapping={"id": "sb-good", "pool": "p"})
    await redis.set(KEYS.sandbox("sb-string"), "not a record")
    await redis.rpush(KEYS.sandbox("sb-good") + ":logs", "a sub-key, not a record")
    await redis.delete(KEYS.sandboxes)

    assert await Healer(redis, KEYS, events).rebuild_ids() == 2
    assert await redis.smembers(KEYS.sandboxes) == {"sb-good", "sb-string"}

    scan = await SandboxStore(redis, KEYS).scan()
    assert [(c.sandbox_id, c.reason) for c in scan.corrupt if c.sandbox_id == "sb-string"] == [
        ("sb-string", "holds a string, not a hash")
    ]
    assert await Quarantine(redis, KEYS, events).handle(scan.corrupt, {}) == len(scan.corrupt)
    assert not await redis.exists(KEYS.sandbox("sb-string"))
    assert "sb-string" not in await redis.smembers(KEYS.sandboxes)
