"""The claim protocol: claim, renew, release and lease expiry, each one atomic Lua script.

Clients run these against Redis directly (no daemon round trip). A client in another
language can implement a claim by loading the same script text (see the README); the
`sandbox.*` events it appends have the shape of `events.Event`.
Times are the Redis server's clock (`TIME`), so client clocks never matter for leases.
"""

import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from redis.asyncio import Redis

from sandboxd.events import now_rfc3339
from sandboxd.keys import Keys
from sandboxd.spec import PoolSpec
from sandboxd.state import SandboxRecord

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_EVENT = """
local function event(stream, maxlen, id, type, time, pool, sandbox, data)
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'id', id, 'type', type,
    'time', time, 'pool', pool, 'sandbox', sandbox, 'data', cjson.encode(data))
end
"""

# KEYS: 1 ready list, 2 leases, 3 events, 4 pools hash, 5 waiters, 6 pool members.
# ARGV: 1 key prefix, 2 pool, 3 claimant, 4 claim id, 5 lease_s ('' = pool default),
#       6 event id, 7 event time, 8 stream maxlen, 9 wait_ms (0 = not waiting), 10 nudge channel.
# The daemon is nudged only when it has something to do: a replacement is due (ready below
# min_ready) and allowed (members below max_total), or the pool is empty. Waking it for
# every claim of a full pool cost more CPU than the claims themselves.
# Returns {'ok', HGETALL of the record} | {'empty', on_empty} | {'unknown_pool'}
#       | {'lease_too_long', max_lease_s}.
CLAIM = (
    _NOW_MS
    + _EVENT
    + """
local raw = redis.call('HGET', KEYS[4], ARGV[2])
if not raw then return {'unknown_pool'} end
local pool = cjson.decode(raw)
local lease_s = tonumber(ARGV[5]) or pool.lease_s
if lease_s > pool.max_lease_s then return {'lease_too_long', pool.max_lease_s} end
while true do
  local id = redis.call('LPOP', KEYS[1])
  if not id then
    if pool.on_empty == 'create' and tonumber(ARGV[9]) > 0 then
      redis.call('ZADD', KEYS[5], now + tonumber(ARGV[9]), ARGV[4])
    end
    redis.call('PUBLISH', ARGV[10], ARGV[2])
    return {'empty', pool.on_empty}
  end
  local key = ARGV[1] .. ':sandbox:' .. id
  -- an id whose record is no longer ready is stale: drop it and take the next
  if redis.call('HGET', key, 'state') == 'ready' then
    local expires = now + lease_s * 1000
    redis.call('HSET', key, 'state', 'claimed', 'claimant', ARGV[3], 'claim_id', ARGV[4],
      'claimed_at_ms', now, 'lease_s', lease_s, 'max_lease_s', pool.max_lease_s,
      'lease_expires_ms', expires)
    redis.call('HINCRBY', key, 'uses', 1)
    redis.call('ZADD', KEYS[2], expires, id)
    redis.call('ZREM', KEYS[5], ARGV[4])
    event(KEYS[3], ARGV[8], ARGV[6], 'sandbox.claimed', ARGV[7], ARGV[2], id,
      {claimant = ARGV[3], claim_id = ARGV[4], lease_s = lease_s, lease_expires_ms = expires})
    if redis.call('LLEN', KEYS[1]) < pool.min_ready
        and redis.call('SCARD', KEYS[6]) < pool.max_total then
      redis.call('PUBLISH', ARGV[10], ARGV[2])
    end
    return {'ok', redis.call('HGETALL', key)}
  end
end
"""
)

# KEYS: 1 sandbox hash, 2 leases, 3 events.
# ARGV: 1 id, 2 claim id ('' = any), 3 lease_s ('' = the claim's), 4 event id, 5 event time,
#       6 stream maxlen.
# Returns {'ok', lease_expires_ms} | {'not_claimed', state} | {'not_yours'} | {'expired'}
#       | {'lease_too_long', max_lease_s}.
RENEW = (
    _NOW_MS
    + _EVENT
    + """
local r = redis.call('HMGET', KEYS[1], 'state', 'claim_id', 'lease_expires_ms', 'lease_s',
  'max_lease_s', 'pool')
if r[1] ~= 'claimed' then return {'not_claimed', r[1] or 'gone'} end
if ARGV[2] ~= '' and r[2] ~= ARGV[2] then return {'not_yours'} end
if tonumber(r[3]) <= now then return {'expired'} end
local lease_s = tonumber(ARGV[3]) or tonumber(r[4])
if lease_s > tonumber(r[5]) then return {'lease_too_long', tonumber(r[5])} end
local expires = now + lease_s * 1000
redis.call('HSET', KEYS[1], 'lease_expires_ms', expires)
redis.call('ZADD', KEYS[2], expires, ARGV[1])
event(KEYS[3], ARGV[6], ARGV[4], 'sandbox.lease_renewed', ARGV[5], r[6], ARGV[1],
  {claim_id = r[2], lease_s = lease_s, lease_expires_ms = expires})
return {'ok', expires}
"""
)

# KEYS: 1 sandbox hash, 2 leases, 3 events.
# ARGV: 1 id, 2 claim id ('' = any), 3 event id, 4 event time, 5 stream maxlen, 6 nudge channel.
# Returns {'ok'} | {'not_claimed', state} | {'not_yours'}.
RELEASE = (
    _NOW_MS
    + _EVENT
    + """
local r = redis.call('HMGET', KEYS[1], 'state', 'claim_id', 'claimant', 'claimed_at_ms', 'pool')
if r[1] ~= 'claimed' then return {'not_claimed', r[1] or 'gone'} end
if ARGV[2] ~= '' and r[2] ~= ARGV[2] then return {'not_yours'} end
redis.call('HSET', KEYS[1], 'state', 'released')
redis.call('ZREM', KEYS[2], ARGV[1])
event(KEYS[3], ARGV[5], ARGV[3], 'sandbox.released', ARGV[4], r[5], ARGV[1],
  {claimant = r[3], claim_id = r[2], held_ms = now - tonumber(r[4])})
redis.call('PUBLISH', ARGV[6], r[5])
return {'ok'}
"""
)

# KEYS: 1 leases. ARGV: 1 key prefix, 2 batch size.
# Claimed sandboxes whose lease ran out become `terminating`; returns their ids.
EXPIRE = (
    _NOW_MS
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local expired = {}
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  local key = ARGV[1] .. ':sandbox:' .. id
  local r = redis.call('HMGET', key, 'state', 'lease_expires_ms')
  if r[1] == 'claimed' and tonumber(r[2]) <= now then
    redis.call('HSET', key, 'state', 'terminating')
    table.insert(expired, id)
  end
end
return expired
"""
)

# KEYS: waiters of each pool. Drops waits past their deadline; returns how many are left.
COUNT_WAITERS = (
    _NOW_MS
    + """
local counts = {}
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  counts[i] = redis.call('ZCARD', key)
end
return counts
"""
)


class PoolSettings(BaseModel):
    """What a claim needs to know of a pool; `<prefix>:pools` holds one per pool in force."""

    provider: str
    min_ready: int
    max_total: int
    lease_s: int
    max_lease_s: int
    on_empty: Literal["wait", "create"]
    reuse: Literal["never", "reset"]

    @classmethod
    def of(cls, pool: PoolSpec) -> "PoolSettings":
        return cls.model_validate(pool.model_dump(include=set(cls.model_fields)))


class ClaimError(RuntimeError):
    """A claim, renew or release was refused; `reason` is machine-readable."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ClaimOutcome:
    record: SandboxRecord | None = None
    on_empty: str = ""  # set when the pool had no ready sandbox


class ClaimStore:
    """The Redis side of claims, for clients (claim/renew/release) and the daemon."""

    def __init__(self, redis: Redis, keys: Keys, *, maxlen: int = 100_000):
        self._redis = redis
        self._keys = keys
        self._maxlen = maxlen
        self._claim = redis.register_script(CLAIM)
        self._renew = redis.register_script(RENEW)
        self._release = redis.register_script(RELEASE)
        self._expire = redis.register_script(EXPIRE)
        self._count_waiters = redis.register_script(COUNT_WAITERS)

    async def try_claim(
        self,
        pool: str,
        *,
        claimant: str,
        claim_id: str,
        lease_s: int | None = None,
        wait_ms: int = 0,
    ) -> ClaimOutcome:
        """One atomic attempt; `wait_ms` > 0 registers a waiter if the pool is empty."""
        keys = [
            self._keys.pool_ready(pool),
            self._keys.leases,
            self._keys.events,
            self._keys.pools,
            self._keys.pool_waiters(pool),
            self._keys.pool_members(pool),
        ]
        args = [self._keys.prefix, pool, claimant, claim_id, _opt(lease_s)]
        args += [*self._event_args(), wait_ms, self._keys.nudge]
        reply = await self._claim(keys=keys, args=args)
        status = _text(reply[0])
        if status == "ok":
            return ClaimOutcome(record=SandboxRecord.from_hash(_pairs(reply[1])))
        if status == "empty":
            return ClaimOutcome(on_empty=_text(reply[1]))
        raise _refusal(status, reply, f"pool {pool!r}")

    async def cancel_wait(self, pool: str, claim_id: str) -> None:
        await self._redis.zrem(self._keys.pool_waiters(pool), claim_id)

    async def renew(self, sandbox_id: str, claim_id: str = "", lease_s: int | None = None) -> int:
        """Extend the lease from now; returns the new deadline (unix ms)."""
        keys = [self._keys.sandbox(sandbox_id), self._keys.leases, self._keys.events]
        args = [sandbox_id, claim_id, _opt(lease_s), *self._event_args()]
        reply = await self._renew(keys=keys, args=args)
        if _text(reply[0]) != "ok":
            raise _refusal(_text(reply[0]), reply, f"sandbox {sandbox_id}")
        return int(reply[1])

    async def release(self, sandbox_id: str, claim_id: str = "") -> None:
        keys = [self._keys.sandbox(sandbox_id), self._keys.leases, self._keys.events]
        args = [sandbox_id, claim_id, *self._event_args(), self._keys.nudge]
        reply = await self._release(keys=keys, args=args)
        if _text(reply[0]) != "ok":
            raise _refusal(_text(reply[0]), reply, f"sandbox {sandbox_id}")

    async def expire_due(self, batch: int = 100) -> list[str]:
        """Daemon: claimed sandboxes whose lease ran out, now `terminating`."""
        reply = await self._expire(keys=[self._keys.leases], args=[self._keys.prefix, batch])
        return [_text(x) for x in reply]

    async def count_waiters(self, pools: list[str]) -> dict[str, int]:
        """Daemon: live waiters per `on_empty: create` pool (expired ones are dropped)."""
        if not pools:
            return {}
        keys = [self._keys.pool_waiters(p) for p in pools]
        counts = await self._count_waiters(keys=keys, args=[])
        return dict(zip(pools, (int(c) for c in counts), strict=True))

    async def publish_pool_settings(self, pools: list[PoolSpec]) -> None:
        """Daemon: make exactly the pools in force claimable, with their settings."""
        mapping = {p.name: PoolSettings.of(p).model_dump_json() for p in pools}
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._keys.pools)
            if mapping:
                pipe.hset(self._keys.pools, mapping=mapping)
            await pipe.execute()

    def _event_args(self) -> list[Any]:
        return [uuid.uuid4().hex, now_rfc3339(), self._maxlen]


def _opt(value: int | None) -> str:
    return "" if value is None else str(int(value))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(flat: list[Any]) -> dict[str, str]:
    items = [_text(x) for x in flat]
    return dict(zip(items[::2], items[1::2], strict=True))


def _refusal(status: str, reply: list[Any], what: str) -> ClaimError:
    detail = _text(reply[1]) if len(reply) > 1 else ""
    messages = {
        "unknown_pool": f"{what} is not in the spec in force (see `sandboxd get pools`)",
        "lease_too_long": f"lease longer than {what}'s max_lease_s ({detail} s)",
        "not_claimed": f"{what} is not claimed (state: {detail})",
        "not_yours": f"{what} is held by another claim",
        "expired": f"{what}: the lease has already expired",
    }
    return ClaimError(status, messages.get(status, f"{what}: {status}"))
