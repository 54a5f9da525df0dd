"""The claim protocol: claim, renew, release and lease expiry, each one atomic Lua script.

Clients run these against Redis directly (no daemon round trip). A client in another
language can implement a claim by loading the same script text (see the README); the
`sandbox.*` events it appends have the shape of `events.Event`.
Times are the Redis server's clock (`TIME`), so client clocks never matter for leases.

A claim is owned: the claimant makes a secret **claim token** and sends the scripts its
SHA-256; the record keeps only the SHA-1 of that (`claim_token_digest`, computed by the
script), so reading a record (which every client may) never gives what renew and release
ask for. Renew, release and attach must show the token again. The token itself never
reaches Redis, an event or a log.

What reaches a sandbox beyond its handle (the record's `secrets`: an E2B sandbox's envd
access token) is handed out on the claim path only: in the claim script's reply, to the
claimant, and by `attach` after the claim token checks out; no event, view or log carries
it. It rests in the record, so whoever may read `<prefix>:sandbox:*` directly (the daemon's
and the client's Redis users of config/redis-acl.conf) can read it too: it is exactly as
secret as the client's Redis password.
"""

import contextlib
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field
from redis.asyncio import Redis

from sandboxd.spec import PoolSpec
from sandboxd.store.events import now_rfc3339
from sandboxd.store.keys import Keys
from sandboxd.store.records import CLAIMED_FIELDS, Claimed, claimed_from_reply

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_EVENT = """
-- `maxlen` is checked but unused: the daemon trims the stream (store/retention.py), never
-- past what a registered consumer group still needs.
local function event(stream, maxlen, id, type, time, pool, sandbox, data)
  return redis.call('XADD', stream, '*', 'id', id, 'type', type,
    'time', time, 'pool', pool, 'sandbox', sandbox, 'data', cjson.encode(data))
end
-- `event`, but a stream that refuses the entry (one whose last id is the largest there is)
-- is an error table returned instead of raised: a script writes its event first, before
-- anything it could not take back.
local function try_event(stream, maxlen, id, type, time, pool, sandbox, data)
  return redis.pcall('XADD', stream, '*', 'id', id, 'type', type,
    'time', time, 'pool', pool, 'sandbox', sandbox, 'data', cjson.encode(data))
end
"""

# The scripts check every argument before they touch anything: a refused call changes
# nothing. They never trust the caller to have checked (any client may run them).
MAX_LEASE_S = 30 * 86400  # the absolute cap of a lease, whatever a pool allows
MAX_WAIT_MS = 86_400_000  # the longest wait a claim may register as demand
MAX_CLAIMANT_BYTES = 200
MAX_STREAM_MAXLEN = 1_000_000_000

_CHECKS = (
    f"""
local MAX_LEASE_S, MAX_WAIT_MS = {MAX_LEASE_S}, {MAX_WAIT_MS}
local MAX_CLAIMANT_BYTES, MAX_STREAM_MAXLEN = {MAX_CLAIMANT_BYTES}, {MAX_STREAM_MAXLEN}
"""
    + r"""
local function bad(why) return {'invalid_argument', why} end
-- Every key a script writes must hold its type (or be absent) before the first write: Lua
-- does not roll back. The first key of `kinds` (key -> type) that does not; nil if none.
local function wrong_type(kinds)
  for key, kind in pairs(kinds) do
    local t = redis.call('TYPE', key).ok
    if t ~= 'none' and t ~= kind then return key .. ' holds a ' .. t end
  end
  return nil
end
local BAD_HASH = 'claim token hash must be 64 lowercase hex digits (SHA-256)'
-- ^[0-9]+$ of at most `digits` digits, as a number; nil otherwise (no signs, exponents,
-- fractions, spaces, hex, inf or nan: tonumber alone would take all of those)
local function uint(s, digits)
  if type(s) ~= 'string' or #s == 0 or #s > digits or not s:match('^[0-9]+$') then return nil end
  return tonumber(s)
end
local function ident(s, max)
  return type(s) == 'string' and #s >= 1 and #s <= max and s:match('^[%w_.:%-]+$') ~= nil
end
local function sha256hex(s)
  return type(s) == 'string' and #s == 64 and s:match('^[0-9a-f]+$') ~= nil
end
-- 1..max bytes of valid UTF-8 (no overlong forms, surrogates or code points past U+10FFFF)
-- without control characters (C0, DEL, C1): it is shown in events and tables.
local function text(s, max)
  if type(s) ~= 'string' or #s < 1 or #s > max then return false end
  if not s:find('[^ -~]') then return true end  -- printable ASCII: no need to walk it
  local i, n = 1, #s
  while i <= n do
    local c = s:byte(i)
    local len, low, cp
    if c < 0x80 then
      len, low, cp = 1, 0, c
    elseif c >= 0xc2 and c <= 0xdf then
      len, low, cp = 2, 0x80, c % 0x20
    elseif c >= 0xe0 and c <= 0xef then
      len, low, cp = 3, 0x800, c % 0x10
    elseif c >= 0xf0 and c <= 0xf4 then
      len, low, cp = 4, 0x10000, c % 0x08
    else
      return false
    end
    if i + len - 1 > n then return false end
    for j = i + 1, i + len - 1 do
      local b = s:byte(j)
      if b < 0x80 or b > 0xbf then return false end
      cp = cp * 64 + (b - 0x80)
    end
    if cp < low or cp > 0x10ffff or (cp >= 0xd800 and cp <= 0xdfff) then return false end
    if cp < 0x20 or (cp >= 0x7f and cp <= 0x9f) then return false end
    i = i + len
  end
  return true
end
local function event_args(id, time, maxlen)
  if not ident(id, 64) then return 'event id must be 1-64 characters of [A-Za-z0-9_.:-]' end
  if type(time) ~= 'string' or #time > 40
      or not time:match('^%d%d%d%d%-%d%d%-%d%dT[%d:.]+[Z%d:+%-]*$') then
    return 'event time must be an RFC 3339 time'
  end
  local m = uint(maxlen, 10)
  if not m or m < 1 or m > MAX_STREAM_MAXLEN then
    return 'stream maxlen must be an integer from 1 to ' .. MAX_STREAM_MAXLEN
  end
  return nil
end
local function lease_arg(s)
  if s == '' then return nil, nil end
  local lease = uint(s, 7)
  if not lease or lease < 1 or lease > MAX_LEASE_S then
    return nil, 'lease_s must be a whole number of seconds from 1 to ' .. MAX_LEASE_S
  end
  return lease, nil
end
-- renew and release: KEYS record, leases, events of one prefix, ARGV[1] the sandbox id
local function record_keys()
  if #KEYS ~= 3 then return 'expected 3 keys' end
  if not ident(ARGV[1], 100) then
    return 'sandbox id must be 1-100 characters of [A-Za-z0-9_.:-]'
  end
  local prefix = KEYS[2]:match('^(.+):leases$')
  if not prefix or KEYS[1] ~= prefix .. ':sandbox:' .. ARGV[1]
      or KEYS[3] ~= prefix .. ':events' then
    return 'keys must be <prefix>:sandbox:<id>, <prefix>:leases, <prefix>:events'
  end
  return nil, prefix
end
"""
)

# KEYS: 1 ready list, 2 leases, 3 events, 4 waiters: what it writes. It only reads the pools
# hash and the pool's member set, so it names those itself (<prefix>:pools,
# <prefix>:pool:<pool>:members): Redis's ACL wants write access to every declared key of a
# script, and a client has none to those (config/redis-acl.conf).
# ARGV: 1 key prefix, 2 pool, 3 claimant, 4 claim id, 5 lease_s ('' = pool default),
#       6 event id, 7 event time, 8 stream maxlen, 9 wait_ms (0 = not waiting), 10 nudge
#       channel, 11 SHA-256 (hex) of the claim token, 12 how the claim is made ('' or e.g.
#       'api': the record's claim_via, named in the claim's events).
# The daemon is nudged only when it has something to do: a replacement is due (ready below
# min_ready) and allowed (members below max_total), or the pool is empty ('empty:<pool>':
# a claimant waits, the daemon acts at once; a replacement may wait `claim_coalesce_ms`).
# Waking it for every claim of a full pool cost more CPU than the claims themselves.
# Returns {'ok', the record's CLAIMED_FIELDS in order (as HMGET would give them after the
#       claim): what the claimant needs, its `secrets` (how to reach the sandbox, e.g.
#       envd's token) for it alone; the id taken}
#       | {'empty', on_empty}
#       | {'unknown_pool'}
#       | {'lease_too_long', max_lease_s} | {'invalid_argument', why}.
# The claimed fields the claim writes (their values in Lua), and those it reads of the record.
_CLAIM_WRITES = {
    "state": "'claimed'",
    "claimant": "ARGV[3]",
    "claim_id": "ARGV[4]",
    "lease_s": "tostring(lease_s)",
    "lease_expires_ms": "tostring(expires)",
}
_CLAIM_READS = [name for name in CLAIMED_FIELDS if name not in _CLAIM_WRITES]
_CLAIM_FUNCTION = """
-- The claim, as a function: `claim_script` composes it with what runs before and after.
local function claim()
local function check()
  if #KEYS ~= CLAIM_KEYS or #ARGV ~= CLAIM_ARGS then
    return 'expected ' .. CLAIM_KEYS .. ' keys and ' .. CLAIM_ARGS .. ' arguments'
  end
  local p, pool = ARGV[1], ARGV[2]
  if not ident(p, 200) then return 'key prefix must be 1-200 characters of [A-Za-z0-9_.:-]' end
  if not ident(pool, 100) then return 'pool must be 1-100 characters of [A-Za-z0-9_.:-]' end
  local base = p .. ':pool:' .. pool
  if KEYS[1] ~= base .. ':ready' or KEYS[2] ~= p .. ':leases' or KEYS[3] ~= p .. ':events'
      or KEYS[4] ~= base .. ':waiters' or ARGV[10] ~= p .. ':nudge' then
    return 'keys and nudge channel must be those of the key prefix and pool'
  end
  if not text(ARGV[3], MAX_CLAIMANT_BYTES) then
    return 'claimant must be 1-' .. MAX_CLAIMANT_BYTES
      .. ' bytes of UTF-8 text without control characters'
  end
  if not ident(ARGV[4], 64) then return 'claim id must be 1-64 characters of [A-Za-z0-9_.:-]' end
  local _, why = lease_arg(ARGV[5])
  if why then return why end
  why = event_args(ARGV[6], ARGV[7], ARGV[8])
  if why then return why end
  local wait = uint(ARGV[9], 9)
  if not wait or wait > MAX_WAIT_MS then
    return 'wait_ms must be an integer from 0 to ' .. MAX_WAIT_MS
  end
  if not sha256hex(ARGV[11]) then return BAD_HASH end
  if ARGV[12] ~= '' and not ident(ARGV[12], 16) then
    return 'via must be empty or 1-16 characters of [A-Za-z0-9_.:-]'
  end
  return nil
end
local why = check()
if why then return bad(why) end
-- Every key the claim writes must be of its type (or absent) before the first write: Lua
-- does not roll back, and a WRONGTYPE half-way would leave a sandbox claimed by nobody.
-- The keys it reads, and the ready list (its LPOP is the first write), are read with pcall
-- instead: a wrong type shows as an error there, before anything was written.
local damaged = wrong_type({[KEYS[2]] = 'zset', [KEYS[3]] = 'stream', [KEYS[4]] = 'zset'})
if damaged then return {'corrupt', damaged} end
local function holds(key) return {'corrupt', key .. ' holds a ' .. redis.call('TYPE', key).ok} end
local pools, members = ARGV[1] .. ':pools', ARGV[1] .. ':pool:' .. ARGV[2] .. ':members'
local raw = redis.pcall('HGET', pools, ARGV[2])
if type(raw) == 'table' then return holds(pools) end
local size = redis.pcall('SCARD', members)  -- the claim changes no member
if type(size) == 'table' then return holds(members) end
if not raw then return {'unknown_pool'} end
local ok_json, pool = pcall(cjson.decode, raw)
local function count(x)  -- a finite, whole, non-negative number
  return type(x) == 'number' and x == x and x >= 0 and x < 1e12 and x == math.floor(x)
end
if not ok_json or type(pool) ~= 'table' or not count(pool.lease_s)
    or not count(pool.max_lease_s) or not count(pool.min_ready)
    or not count(pool.max_total) or type(pool.on_empty) ~= 'string' then
  return {'corrupt', pools .. ' ' .. ARGV[2] .. ' is not pool settings'}
end
local lease_s = lease_arg(ARGV[5]) or pool.lease_s
if lease_s > pool.max_lease_s then return {'lease_too_long', pool.max_lease_s} end
local wait_ms = tonumber(ARGV[9])
while true do
  local id = redis.pcall('LPOP', KEYS[1])
  if type(id) == 'table' then return holds(KEYS[1]) end  -- only the first LPOP can fail
  if not id then
    if pool.on_empty == 'create' and wait_ms > 0 then
      redis.call('ZADD', KEYS[4], now + wait_ms, ARGV[4])
    end
    redis.call('PUBLISH', ARGV[10], 'empty:' .. ARGV[2])
    return {'empty', pool.on_empty}
  end
  local key = ARGV[1] .. ':sandbox:' .. id
  -- One read of what the claim checks and returns. An id whose record is no longer ready
  -- (gone, or not a hash: an error table) is stale: drop it, take the next.
  local r = redis.pcall('HMGET', key, 'state', 'uses', READ_FIELDS)
  if r.err == nil and r[1] == 'ready' then
    local expires = now + lease_s * 1000
    -- the event first: if the stream refuses it, the id goes back and nothing else changed
    local added = try_event(KEYS[3], ARGV[8], ARGV[6], 'sandbox.claimed', ARGV[7], ARGV[2], id,
      {claimant = ARGV[3], claim_id = ARGV[4], lease_s = lease_s, lease_expires_ms = expires,
       via = ARGV[12] ~= '' and ARGV[12] or nil})
    if type(added) == 'table' and added.err then
      redis.call('LPUSH', KEYS[1], id)
      return {'corrupt', KEYS[3] .. ' takes no entry: ' .. tostring(added.err)}
    end
    redis.call('HSET', key, 'state', 'claimed', 'claimant', ARGV[3], 'claim_id', ARGV[4],
      'claim_token_digest', redis.sha1hex(ARGV[11]), 'claimed_at_ms', now, 'lease_s', lease_s,
      'max_lease_s', pool.max_lease_s, 'lease_expires_ms', expires, 'claim_via', ARGV[12],
      'uses', (tonumber(r[2]) or 0) + 1)
    redis.call('ZADD', KEYS[2], expires, id)
    redis.call('ZREM', KEYS[4], ARGV[4])
    if size < pool.max_total and redis.call('LLEN', KEYS[1]) < pool.min_ready then
      redis.call('PUBLISH', ARGV[10], ARGV[2])
    end
    return {'ok', {REPLY}, id}
  end
end
end
""".replace("READ_FIELDS", ", ".join(f"'{name}'" for name in _CLAIM_READS)).replace(
    "REPLY",
    ", ".join(
        _CLAIM_WRITES.get(name) or f"r[{_CLAIM_READS.index(name) + 3}]" for name in CLAIMED_FIELDS
    ),
)


def claim_script(*, keys: int = 4, args: int = 12, then: str = "return claim()\n") -> str:
    """The claim script, or a script that runs it as `claim()` within `then` (Lua): with
    `keys` KEYS and `args` ARGV in all, the claim's 4 and 12 first. `sandboxd api`'s create
    records its mapping in the same script (api/registry.py)."""
    return (
        _NOW_MS
        + _EVENT
        + _CHECKS
        + f"local CLAIM_KEYS, CLAIM_ARGS = {int(keys)}, {int(args)}\n"
        + _CLAIM_FUNCTION
        + then
    )


CLAIM = claim_script()

# KEYS: 1 sandbox hash, 2 leases, 3 events (all of one prefix).
# ARGV: 1 id, 2 SHA-256 (hex) of the claim token, 3 lease_s ('' = the claim's), 4 event id,
#       5 event time, 6 stream maxlen.
# Returns {'ok', lease_expires_ms} | {'not_claimed', state} | {'not_yours'} | {'expired'}
#       | {'lease_too_long', max_lease_s} | {'invalid_argument', why}.
RENEW = (
    _NOW_MS
    + _EVENT
    + _CHECKS
    + """
local function check()
  if #ARGV ~= 6 then return 'expected 3 keys and 6 arguments' end
  local why = record_keys()
  if why then return why end
  if not sha256hex(ARGV[2]) then return BAD_HASH end
  local _, lease_why = lease_arg(ARGV[3])
  if lease_why then return lease_why end
  return event_args(ARGV[4], ARGV[5], ARGV[6])
end
local why = check()
if why then return bad(why) end
local damaged = wrong_type({[KEYS[1]] = 'hash', [KEYS[2]] = 'zset', [KEYS[3]] = 'stream'})
if damaged then return {'corrupt', damaged} end
local r = redis.call('HMGET', KEYS[1], 'state', 'claim_id', 'lease_expires_ms', 'lease_s',
  'max_lease_s', 'pool', 'claim_token_digest')
if r[1] ~= 'claimed' then return {'not_claimed', r[1] or 'gone'} end
if r[7] ~= redis.sha1hex(ARGV[2]) then return {'not_yours'} end
if tonumber(r[3]) <= now then return {'expired'} end
local lease_s = lease_arg(ARGV[3]) or tonumber(r[4])
if lease_s > tonumber(r[5]) then return {'lease_too_long', tonumber(r[5])} end
local expires = now + lease_s * 1000
redis.call('HSET', KEYS[1], 'lease_expires_ms', expires)
redis.call('ZADD', KEYS[2], expires, ARGV[1])
event(KEYS[3], ARGV[6], ARGV[4], 'sandbox.lease_renewed', ARGV[5], r[6], ARGV[1],
  {claim_id = r[2], lease_s = lease_s, lease_expires_ms = expires})
return {'ok', expires}
"""
)

_RELEASE = """
local function check()
  if #ARGV ~= 6 then return 'expected 3 keys and 6 arguments' end
  local why, prefix = record_keys()
  if why then return why end
  if ARGV[6] ~= prefix .. ':nudge' then return 'nudge channel must be <prefix>:nudge' end
  if FORCED then
    if not text(ARGV[2], MAX_CLAIMANT_BYTES) then
      return 'operator must be 1-' .. MAX_CLAIMANT_BYTES
        .. ' bytes of UTF-8 text without control characters'
    end
  elseif not sha256hex(ARGV[2]) then
    return BAD_HASH
  end
  return event_args(ARGV[3], ARGV[4], ARGV[5])
end
local why = check()
if why then return bad(why) end
local damaged = wrong_type({[KEYS[1]] = 'hash', [KEYS[2]] = 'zset', [KEYS[3]] = 'stream'})
if damaged then return {'corrupt', damaged} end
local r = redis.call('HMGET', KEYS[1], 'state', 'claim_id', 'claimant', 'claimed_at_ms', 'pool',
  'claim_token_digest', 'claim_via')
if r[1] ~= 'claimed' then return {'not_claimed', r[1] or 'gone'} end
if not FORCED and r[6] ~= redis.sha1hex(ARGV[2]) then return {'not_yours'} end
redis.call('HSET', KEYS[1], 'state', 'released')
redis.call('HDEL', KEYS[1], 'claim_token_digest')
redis.call('ZREM', KEYS[2], ARGV[1])
local data = {claimant = r[3], claim_id = r[2], held_ms = now - tonumber(r[4]), forced = FORCED}
if FORCED then data.forced_by = ARGV[2] end
if r[7] and r[7] ~= '' then data.via = r[7] end
event(KEYS[3], ARGV[5], ARGV[3], 'sandbox.released', ARGV[4], r[5], ARGV[1], data)
redis.call('PUBLISH', ARGV[6], r[5])
return {'ok'}
"""

# KEYS: 1 sandbox hash, 2 leases, 3 events (all of one prefix).
# ARGV: 1 id, 2 SHA-256 (hex) of the claim token, 3 event id, 4 event time, 5 stream maxlen,
#       6 nudge channel.
# Returns {'ok'} | {'not_claimed', state} | {'not_yours'} | {'invalid_argument', why}.
RELEASE = _NOW_MS + _EVENT + _CHECKS + "local FORCED = false\n" + _RELEASE

# An operator's release of a sandbox whatever claim holds it (`sandboxd release --force`).
# The same as RELEASE but ARGV 2 is who forces it (shown in the event as `forced_by`).
FORCE_RELEASE = _NOW_MS + _EVENT + _CHECKS + "local FORCED = true\n" + _RELEASE

# KEYS: 1 leases. ARGV: 1 key prefix, 2 batch size, 3 the caller's node, 4 the providers
# it manages and 5 the cloud providers among them (comma-separated; 4 empty: every record).
# Claimed sandboxes whose lease ran out become `terminating`; returns their ids. Leases of
# sandboxes another daemon manages are left for it (looked past, up to 10 batches).
EXPIRE = (
    _NOW_MS
    + """
local limit = tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit * 10)
local managed, cloud = {}, {}
for name in string.gmatch(ARGV[4], '[^,]+') do managed[name] = true end
for name in string.gmatch(ARGV[5], '[^,]+') do cloud[name] = true end
local everything = ARGV[4] == ''
local expired = {}
for _, id in ipairs(due) do
  if #expired >= limit then break end
  local key = ARGV[1] .. ':sandbox:' .. id
  local r = redis.call('HMGET', key, 'state', 'lease_expires_ms', 'provider', 'node')
  local mine = everything or (managed[r[3]] and (cloud[r[3]] or not r[4] or r[4] == ''
    or r[4] == ARGV[3]))
  if mine or not r[1] then
    redis.call('ZREM', KEYS[1], id)
    if r[1] == 'claimed' and tonumber(r[2]) <= now then
      redis.call('HSET', key, 'state', 'terminating')
      table.insert(expired, id)
    end
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
    e2b_alias: list[str] = Field(default_factory=list)  # sandboxd api's template names

    @classmethod
    def of(cls, pool: PoolSpec) -> "PoolSettings":
        return cls.model_validate(pool.model_dump(include=set(cls.model_fields)))


class ClaimError(RuntimeError):
    """A claim, renew or release was refused; `reason` is machine-readable. `sandbox_id`:
    the sandbox a claim took and gave back at once (its record damaged), else ''."""

    def __init__(self, reason: str, message: str, sandbox_id: str = ""):
        super().__init__(message)
        self.reason = reason
        self.sandbox_id = sandbox_id


@dataclass(frozen=True)
class ClaimOutcome:
    record: Claimed | None = None
    on_empty: str = ""  # set when the pool had no ready sandbox


def new_claim_token() -> str:
    """A fresh claim token: `sbt_` and 256 random bits as URL-safe text. The prefix makes it
    recognisable to secret scanners and keeps it from starting with `-` (which a command
    line would take for an option)."""
    return "sbt_" + secrets.token_urlsafe(32)


def token_sha256(token: str) -> str:
    """What a client sends the scripts for its claim token."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_digest(token: str) -> str:
    """What the record keeps (`claim_token_digest`): SHA-1 of what is sent, as the scripts
    compute it (`redis.sha1hex`). Knowing it does not give what renew and release need."""
    return hashlib.sha1(token_sha256(token).encode()).hexdigest()


def token_matches(token: str, stored_digest: str) -> bool:
    return bool(token) and hmac.compare_digest(token_digest(token), stored_digest or "")


def check_lease(lease_s: int | None) -> None:
    """The client's own check, for a clear error before any round trip (the scripts check
    again: they never rely on this)."""
    if lease_s is None:
        return
    if isinstance(lease_s, bool) or not isinstance(lease_s, int) or not 1 <= lease_s <= MAX_LEASE_S:
        raise ClaimError(
            "invalid_argument",
            f"lease_s must be a whole number of seconds from 1 to {MAX_LEASE_S}, got {lease_s!r}",
        )


def check_claimant(claimant: str, what: str = "claimant") -> None:
    """1-200 bytes of UTF-8 text without control characters, as the scripts require."""
    problem = ""
    if not isinstance(claimant, str):
        problem = "is not a string"
    elif not claimant:
        problem = "is empty"
    elif any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in claimant):
        problem = "contains control characters"
    else:
        try:
            size = len(claimant.encode("utf-8"))
        except UnicodeEncodeError:
            problem = "is not valid UTF-8 (lone surrogates)"
        else:
            if size > MAX_CLAIMANT_BYTES:
                problem = f"is {size} bytes long (at most {MAX_CLAIMANT_BYTES})"
    if problem:
        raise ClaimError("invalid_argument", f"{what} {problem}")


def _need_token(token: str, sandbox_id: str) -> None:
    if not isinstance(token, str) or not token:
        raise ClaimError(
            "not_yours",
            f"sandbox {sandbox_id}: no claim token given (the token `claim` returned is "
            "needed; an operator may release with force)",
        )


class ClaimStore:
    """The Redis side of claims, for clients (claim/renew/release) and the daemon."""

    def __init__(self, redis: Redis, keys: Keys, *, maxlen: int = 100_000):
        self._redis = redis
        self._keys = keys
        self._maxlen = maxlen
        self._claim = redis.register_script(CLAIM)
        self._renew = redis.register_script(RENEW)
        self._release = redis.register_script(RELEASE)
        self._force_release = redis.register_script(FORCE_RELEASE)
        self._expire = redis.register_script(EXPIRE)
        self._count_waiters = redis.register_script(COUNT_WAITERS)
        self._published: dict[str, str] | None = None  # daemon: what `<prefix>:pools` holds
        self._settings: dict[str, tuple[PoolSpec, str]] = {}  # daemon: JSON per pool object

    async def try_claim(
        self,
        pool: str,
        *,
        claimant: str,
        claim_id: str,
        token: str,
        lease_s: int | None = None,
        wait_ms: int = 0,
        via: str = "",
        script: Any = None,
        extra_keys: Sequence[str] = (),
        extra_args: Sequence[Any] = (),
    ) -> ClaimOutcome:
        """One atomic attempt; `wait_ms` > 0 registers a waiter if the pool is empty.
        `token` is the claim's secret (see `new_claim_token`); only its hash is sent.
        `script`: a registered `claim_script(...)` to run instead of the claim alone, given
        `extra_keys` and `extra_args` after the claim's (a refusal of its own is a
        ClaimError of that reason)."""
        check_lease(lease_s)
        check_claimant(claimant)
        _need_token(token, f"claim of pool {pool!r}")
        keys = [
            self._keys.pool_ready(pool),
            self._keys.leases,
            self._keys.events,
            self._keys.pool_waiters(pool),
        ]
        wait_ms = min(max(0, int(wait_ms)), MAX_WAIT_MS)
        args: list[Any] = [self._keys.prefix, pool, claimant, claim_id, _opt(lease_s)]
        args += [*self._event_args(), wait_ms, self._keys.nudge, token_sha256(token), via]
        if script is None:
            reply = await self._claim(keys=keys, args=args)
        else:
            reply = await script(keys=[*keys, *extra_keys], args=[*args, *extra_args])
        status = _text(reply[0])
        if status == "ok":
            sandbox_id = _text(reply[2])  # the ready list's entry: the record's key
            try:
                return ClaimOutcome(record=claimed_from_reply(reply[1], sandbox_id))
            except ValueError as exc:  # a damaged record (decode.BadValue, pydantic)
                # Claimed, but unusable: give it back at once (the daemon quarantines it),
                # so no sandbox stays claimed by nobody.
                with contextlib.suppress(ClaimError, ValueError):
                    await self.release(sandbox_id, token)
                raise ClaimError(
                    "corrupt",
                    f"pool {pool!r}: the sandbox taken has a damaged record ({exc})",
                    sandbox_id,
                ) from None
        if status == "empty":
            return ClaimOutcome(on_empty=_text(reply[1]))
        raise _refusal(status, reply, f"pool {pool!r}")

    async def cancel_wait(self, pool: str, claim_id: str) -> None:
        await self._redis.zrem(self._keys.pool_waiters(pool), claim_id)

    async def renew(self, sandbox_id: str, token: str, lease_s: int | None = None) -> int:
        """Extend the lease from now; returns the new deadline (unix ms)."""
        _need_token(token, sandbox_id)
        check_lease(lease_s)
        keys = [self._keys.sandbox(sandbox_id), self._keys.leases, self._keys.events]
        args = [sandbox_id, token_sha256(token), _opt(lease_s), *self._event_args()]
        reply = await self._renew(keys=keys, args=args)
        if _text(reply[0]) != "ok":
            raise _refusal(_text(reply[0]), reply, f"sandbox {sandbox_id}")
        return int(reply[1])

    async def release(self, sandbox_id: str, token: str) -> None:
        """Give back a sandbox held by the claim whose token this is."""
        _need_token(token, sandbox_id)
        await self._run_release(self._release, sandbox_id, token_sha256(token))

    async def force_release(self, sandbox_id: str, operator: str) -> None:
        """An operator's release, whoever holds it; the event says `forced_by: operator`."""
        check_claimant(operator, "operator")
        await self._run_release(self._force_release, sandbox_id, operator)

    async def _run_release(self, script: Any, sandbox_id: str, proof: str) -> None:
        keys = [self._keys.sandbox(sandbox_id), self._keys.leases, self._keys.events]
        args = [sandbox_id, proof, *self._event_args(), self._keys.nudge]
        reply = await script(keys=keys, args=args)
        if _text(reply[0]) != "ok":
            raise _refusal(_text(reply[0]), reply, f"sandbox {sandbox_id}")

    async def expire_due(
        self,
        batch: int = 100,
        *,
        node: str = "",
        managed: Iterable[str] = (),
        cloud: Iterable[str] = (),
    ) -> list[str]:
        """Daemon: claimed sandboxes whose lease ran out, now `terminating`; only those of
        `node` and of the `managed` providers (`cloud` ones whatever their node), if given."""
        scope = [node, ",".join(sorted(managed)), ",".join(sorted(cloud))]
        reply = await self._expire(
            keys=[self._keys.leases], args=[self._keys.prefix, batch, *scope]
        )
        return [_text(x) for x in reply]

    async def count_waiters(self, pools: list[str]) -> dict[str, int]:
        """Daemon: live waiters per `on_empty: create` pool (expired ones are dropped)."""
        if not pools:
            return {}
        keys = [self._keys.pool_waiters(p) for p in pools]
        counts = await self._count_waiters(keys=keys, args=[])
        return dict(zip(pools, (int(c) for c in counts), strict=True))

    async def publish_pool_settings(self, pools: list[PoolSpec]) -> None:
        """Daemon: make exactly the pools in force claimable, with their settings. Writes
        only the pools that changed since the last call; rewrites the hash whole the first
        time and whenever its length shows it was lost (FLUSHDB, a DEL)."""
        mapping = {p.name: self._settings_json(p) for p in pools}
        if len(self._settings) > len(mapping):  # pools gone from the spec
            self._settings = {name: self._settings[name] for name in mapping}
        key, published = self._keys.pools, self._published
        if published is not None and await self._redis.hlen(key) != len(published):
            published = None
        if published is not None:
            changed = {name: v for name, v in mapping.items() if published.get(name) != v}
            gone = [name for name in published if name not in mapping]
            if not changed and not gone:
                return
        self._published = None  # unknown until the write is done
        async with self._redis.pipeline(transaction=True) as pipe:
            if published is None:
                pipe.delete(key)
                changed, gone = mapping, []
            if gone:
                pipe.hdel(key, *gone)
            if changed:
                pipe.hset(key, mapping=changed)
            await pipe.execute()
        self._published = mapping

    def _settings_json(self, pool: PoolSpec) -> str:
        cached = self._settings.get(pool.name)
        if cached is None or cached[0] is not pool:
            cached = self._settings[pool.name] = (pool, PoolSettings.of(pool).model_dump_json())
        return cached[1]

    def _event_args(self) -> list[Any]:
        return [secrets.token_hex(16), now_rfc3339(), self._maxlen]  # uuid4().hex: 4x the time


def _opt(value: int | None) -> str:
    return "" if value is None else str(int(value))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _refusal(status: str, reply: list[Any], what: str) -> ClaimError:
    detail = _text(reply[1]) if len(reply) > 1 else ""
    messages = {
        "unknown_pool": f"{what} is not in the spec in force (see `sandboxd get pools`)",
        "lease_too_long": f"lease longer than {what}'s max_lease_s ({detail} s)",
        "not_claimed": f"{what} is not claimed (state: {detail})",
        "not_yours": f"{what} is held by another claim (wrong claim token)",
        "expired": f"{what}: the lease has already expired",
        "invalid_argument": f"{what}: refused: {detail}",
        "corrupt": f"{what}: Redis holds a damaged key ({detail}); nothing was changed, the "
        "daemon repairs it within a tick",
    }
    return ClaimError(status, messages.get(status, f"{what}: {status}"))
