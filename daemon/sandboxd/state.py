"""Runtime state in Redis: one hash per sandbox, a set of all ids, a ready list per pool.

Every state change that touches more than one key is a Lua script, so a client that claims
from a ready list and the daemon that terminates never see half a change.
"""

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field
from redis.asyncio import Redis

from sandboxd.events import now_rfc3339
from sandboxd.keys import Keys

SandboxState = Literal["creating", "ready", "claimed", "terminating"]

_MARK_READY = """
if redis.call('HGET', KEYS[1], 'state') ~= 'creating' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'ready', 'ready_at', ARGV[2], 'handle', ARGV[3])
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
"""

# Returns the state the sandbox was in if it was one of ARGV[2..], else false.
_BEGIN_TERMINATE = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
for i = 2, #ARGV do
  if state == ARGV[i] then
    redis.call('LREM', KEYS[2], 0, ARGV[1])
    redis.call('HSET', KEYS[1], 'state', 'terminating')
    return state
  end
end
return false
"""


class SandboxRecord(BaseModel):
    """`<prefix>:sandbox:<id>` — what sandboxd knows about one sandbox."""

    id: str
    pool: str
    provider: str
    state: SandboxState
    created_at: str = Field(default_factory=now_rfc3339)
    ready_at: str = ""
    template: str
    spec_revision: int
    instance: str = Field(description="The daemon instance that created it.")
    handle: dict[str, Any] = Field(default_factory=dict, description="Provider-specific.")

    def to_hash(self) -> dict[str, str]:
        fields = self.model_dump()
        fields["handle"] = json.dumps(self.handle, separators=(",", ":"))
        fields["spec_revision"] = str(self.spec_revision)
        return fields

    @classmethod
    def from_hash(cls, fields: dict[str, str]) -> "SandboxRecord":
        return cls.model_validate({**fields, "handle": json.loads(fields.get("handle") or "{}")})

    @property
    def created_ts(self) -> float:
        return datetime.fromisoformat(self.created_at).timestamp()


class SandboxStore:
    def __init__(self, redis: Redis, keys: Keys):
        self._redis = redis
        self._keys = keys
        self._mark_ready = redis.register_script(_MARK_READY)
        self._begin_terminate = redis.register_script(_BEGIN_TERMINATE)

    async def records(self) -> list[SandboxRecord]:
        ids = sorted(await self._redis.smembers(self._keys.sandboxes))
        async with self._redis.pipeline(transaction=False) as pipe:
            for sandbox_id in ids:
                pipe.hgetall(self._keys.sandbox(sandbox_id))
            hashes = await pipe.execute()
        return [SandboxRecord.from_hash(h) for h in hashes if h]

    async def get(self, sandbox_id: str) -> SandboxRecord | None:
        fields = await self._redis.hgetall(self._keys.sandbox(sandbox_id))
        return SandboxRecord.from_hash(fields) if fields else None

    async def add(self, record: SandboxRecord) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._keys.sandbox(record.id), mapping=record.to_hash())
            pipe.sadd(self._keys.sandboxes, record.id)
            await pipe.execute()

    async def mark_ready(self, record: SandboxRecord, handle: dict[str, Any]) -> bool:
        """creating -> ready and onto the pool's ready list; False if the record went away."""
        keys = [self._keys.sandbox(record.id), self._keys.pool_ready(record.pool)]
        args = [record.id, now_rfc3339(), json.dumps(handle, separators=(",", ":"))]
        return bool(await self._mark_ready(keys=keys, args=args))

    async def begin_terminate(self, record: SandboxRecord, *states: SandboxState) -> str | None:
        """Take the sandbox out of circulation if it is in one of `states`; its old state."""
        keys = [self._keys.sandbox(record.id), self._keys.pool_ready(record.pool)]
        previous = await self._begin_terminate(keys=keys, args=[record.id, *states])
        return previous or None

    async def remove(self, record: SandboxRecord) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._keys.sandbox(record.id))
            pipe.srem(self._keys.sandboxes, record.id)
            pipe.lrem(self._keys.pool_ready(record.pool), 0, record.id)
            await pipe.execute()
