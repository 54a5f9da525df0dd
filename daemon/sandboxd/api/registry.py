"""What the API server remembers of the sandboxes it handed out, in Redis (so several API
servers can share it): E2B's sandbox id -> the sandboxd sandbox, its claim and the claim's
secret token, the API key holding it, its template and metadata; and per key the set of
E2B ids it holds plus its creates in flight (its quota).

An entry outlives its claim by at most a minute (a TTL of the lease plus 60 s, renewed with
the lease); an entry whose claim has ended (released elsewhere, lease expired, the sandbox
gone) is dropped whenever the key's sandboxes are listed or counted.
"""

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from sandboxd.store.claims import ClaimError, ClaimStore, claim_script
from sandboxd.store.keys import Keys
from sandboxd.store.records import Claimed

GRACE_S = 60

# KEYS: 1 an E2B id's mapping, 2 its key's sandboxes. ARGV: 1 the API keys hash (read only,
# so not declared: the ACL wants write access to declared keys), 2 the key's name, 3 the
# SHA-256 its secret must still have, 4 the mapping's TTL, 5 the E2B id, 6 the reservation
# to drop ('' = none), then the mapping's fields and values. 1 if added, 0 if the key is
# no longer the one issued, what is damaged if the key's set is not a sorted set.
ADD = """
local held = redis.call('TYPE', KEYS[2]).ok
if held ~= 'none' and held ~= 'zset' then return KEYS[2] .. ' holds a ' .. held end
local raw = redis.call('HGET', ARGV[1], ARGV[2])
local ok, key = pcall(cjson.decode, raw or '')
if not ok or type(key) ~= 'table' or key.sha256 ~= ARGV[3] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], 0, ARGV[5])
if ARGV[6] ~= '' then redis.call('ZREM', KEYS[2], ARGV[6]) end
return 1
"""

# KEYS: 1 an E2B id's mapping. ARGV: 1 the claim id it must hold, then a field and a value
# to set, or nothing to delete it. What one claim does to its mapping never lands on the
# next claim's (a local sandbox's E2B id is its own, reused by `reuse: reset`).
IF_CLAIM = """
if redis.call('HGET', KEYS[1], 'claim_id') ~= ARGV[1] then return 0 end
if #ARGV == 1 then redis.call('DEL', KEYS[1]) else redis.call('HSET', KEYS[1], ARGV[2], ARGV[3]) end
return 1
"""

# KEYS: 1 an E2B id's mapping. ARGV: 1 the prefix of sandbox records (read only, not
# declared, as in ADD). The mapping's fields, and the state, claim id and lease end of the
# record it names (one round trip for every envd call and every call on a sandbox).
LOAD = """
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  if fields[i] == 'sandbox' then
    local record = ARGV[1] .. fields[i + 1]
    if redis.call('TYPE', record).ok ~= 'hash' then return {fields, {}} end
    return {fields, redis.call('HMGET', record, 'state', 'claim_id', 'lease_expires_ms')}
  end
end
return {fields, {}}
"""


@dataclass
class Entry:
    e2b_id: str
    sandbox: str
    claim_id: str
    key: str
    pool: str
    template: str
    started_at: str
    envd_version: str
    domain: str
    metadata: dict[str, str] = field(default_factory=dict)
    claim_token: str = field(default="", repr=False)
    provider: str = "e2b"
    # A local sandbox's: the SHA-256 of the claim's envd access token (the token itself is
    # only in the create's answer), and the claim's envVars, which go with every command.
    envd_token_sha256: str = field(default="", repr=False)
    env_vars: dict[str, str] = field(default_factory=dict, repr=False)
    paused: bool = False  # a local sandbox's processes stopped (E2B's pause)
    lease_expires_ms: int = 0  # the record's, read with the entry (not stored here)

    def to_hash(self) -> dict[str, str]:
        return {
            "sandbox": self.sandbox,
            "claim_id": self.claim_id,
            "key": self.key,
            "pool": self.pool,
            "template": self.template,
            "started_at": self.started_at,
            "envd_version": self.envd_version,
            "domain": self.domain,
            "metadata": json.dumps(self.metadata),
            "claim_token": self.claim_token,
            "provider": self.provider,
            "envd_token_sha256": self.envd_token_sha256,
            "env_vars": json.dumps(self.env_vars),
            "paused": "1" if self.paused else "",
        }

    @classmethod
    def from_hash(cls, e2b_id: str, fields: dict[str, Any]) -> "Entry | None":
        try:
            metadata = json.loads(fields.get("metadata") or "{}")
            env_vars = json.loads(fields.get("env_vars") or "{}")
            if not isinstance(metadata, dict) or not isinstance(env_vars, dict):
                return None
            return cls(
                e2b_id=e2b_id,
                sandbox=str(fields["sandbox"]),
                claim_id=str(fields["claim_id"]),
                key=str(fields["key"]),
                pool=str(fields.get("pool", "")),
                template=str(fields.get("template", "")),
                started_at=str(fields.get("started_at", "")),
                envd_version=str(fields.get("envd_version", "")),
                domain=str(fields.get("domain", "")),
                metadata={str(k): str(v) for k, v in metadata.items()},
                claim_token=str(fields.get("claim_token", "")),
                provider=str(fields.get("provider") or "e2b"),
                envd_token_sha256=str(fields.get("envd_token_sha256", "")),
                env_vars={str(k): str(v) for k, v in env_vars.items()},
                paused=fields.get("paused") == "1",
            )
        except (KeyError, ValueError, TypeError):
            return None


# What `Entry.to_hash` writes, in its order: a mapping is always all of these.
ENTRY_FIELDS = tuple(Entry("", "", "", "", "", "", "", "", "").to_hash())

# A create of a local pool's sandbox in one round trip, for a key and pool the API server
# has decided a create with before (its fast path): the key and the pool's settings must
# still be exactly what it decided with (else 'stale': it decides again, the full way), then
# the claim (store/claims.py), then the mapping as ADD writes it, under the claimed
# sandbox's id (a local sandbox's E2B id is its own), counted for the key. The key, the
# settings and every key it writes are checked before the claim's first write.
# KEYS: the claim's 4, then 5 the key's sandboxes. ARGV: the claim's 12, then 13 the
# digest -> name hash, 14 the name -> key hash (both read only, not declared, as in ADD),
# 15 the secret's digest, 16 the key's name, 17 the key's JSON and 18 the pool's settings
# JSON as decided with, 19 the prefix of mappings, 20 the mapping's TTL, then its fields
# and values but `sandbox` (ENTRY_FIELDS' order).
CREATE_LOCAL = claim_script(
    keys=5,
    args=20 + 2 * (len(ENTRY_FIELDS) - 1),
    then="""
local function same(hash, field, want)
  local got = redis.pcall('HGET', hash, field)
  return type(got) == 'string' and got == want
end
if not same(ARGV[13], ARGV[15], ARGV[16]) or not same(ARGV[14], ARGV[16], ARGV[17])
    or not same(ARGV[1] .. ':pools', ARGV[2], ARGV[18]) then
  return {'stale'}
end
local held = redis.call('TYPE', KEYS[5]).ok
if held ~= 'none' and held ~= 'zset' then return {'corrupt', KEYS[5] .. ' holds a ' .. held} end
local reply = claim()
if reply[1] ~= 'ok' then return reply end
local mapping = ARGV[19] .. reply[3]
redis.call('DEL', mapping)
redis.call('HSET', mapping, 'sandbox', reply[3], unpack(ARGV, 21))
redis.call('EXPIRE', mapping, ARGV[20])
redis.call('ZADD', KEYS[5], 0, reply[3])
return reply
""",
)


class Registry:
    def __init__(self, redis: Redis, keys: Keys):
        self._redis = redis
        self._keys = keys
        self._if_claim = redis.register_script(IF_CLAIM)
        self._add = redis.register_script(ADD)
        self._load_script = redis.register_script(LOAD)
        self._create_local = redis.register_script(CREATE_LOCAL)

    async def reserve(self, key: str, limit: int | None, hold_s: float) -> str | None:
        """Count a create in flight against the key's quota; None if that is over `limit`.
        The reservation lapses by itself after `hold_s` (an API server that died)."""
        if limit is None:
            return ""
        await self.live(key)  # drops ended claims and lapsed reservations
        member = f"pending:{uuid.uuid4().hex}"
        zset = self._keys.api_key_sandboxes(key)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zadd(zset, {member: int((time.time() + hold_s) * 1000)})
            pipe.zcard(zset)
            _, count = await pipe.execute()
        if count > limit:  # two racing creates may both be refused: never both let in
            await self._redis.zrem(zset, member)
            return None
        return member

    async def unreserve(self, key: str, reservation: str) -> None:
        if reservation:
            await self._redis.zrem(self._keys.api_key_sandboxes(key), reservation)

    async def add(self, entry: Entry, lease_s: int, reservation: str, key_sha256: str) -> bool:
        """Record the claim under its E2B id and count it for its key, if the key is still
        the one issued (`key_sha256`): False, and nothing written, when it was revoked
        meanwhile. One atomic step, so a revoke either finds the claim to end or makes the
        create give it back."""
        fields = [x for pair in entry.to_hash().items() for x in pair]
        added = await self._add(
            keys=[self._keys.api_sandbox(entry.e2b_id), self._keys.api_key_sandboxes(entry.key)],
            args=[
                self._keys.apikeys,
                entry.key,
                key_sha256,
                lease_s + GRACE_S,
                entry.e2b_id,
                reservation,
                *fields,
            ],
        )
        if isinstance(added, str):  # nothing written: the create gives its claim back
            raise ClaimError(
                "corrupt", f"Redis holds a damaged key ({added}); the sandbox was given back"
            )
        return bool(added)

    async def claim_local(
        self, claims: ClaimStore, entry: Entry, lease_s: int, digest: str, settings: str, key: str
    ) -> Claimed | None:
        """Claim a sandbox of `entry.pool` for `entry` and record it, in one round trip, if
        the key of secret digest `digest` is still stored as `key` and the pool's settings
        as `settings` (their JSON): None if the pool has nothing ready; ClaimError `stale`
        if either changed, else the claim's refusals. `entry` gets the sandbox's ids."""
        fields = entry.to_hash()
        del fields["sandbox"]
        try:
            outcome = await claims.try_claim(
                entry.pool,
                claimant=entry.key,
                claim_id=entry.claim_id,
                token=entry.claim_token,
                lease_s=lease_s,
                via="api",
                script=self._create_local,
                extra_keys=[self._keys.api_key_sandboxes(entry.key)],
                extra_args=[
                    self._keys.apikey_hashes,
                    self._keys.apikeys,
                    digest,
                    entry.key,
                    key,
                    settings,
                    self._keys.api_sandbox(""),
                    lease_s + GRACE_S,
                    *[x for pair in fields.items() for x in pair],
                ],
            )
        except ClaimError as exc:
            if exc.sandbox_id:  # claimed and recorded, then found damaged (and given back)
                entry.sandbox = entry.e2b_id = exc.sandbox_id
                await self.remove(entry)
            raise
        if outcome.record is not None:
            entry.sandbox = entry.e2b_id = outcome.record.id
        return outcome.record

    async def set_paused(self, entry: Entry, paused: bool) -> None:
        """Mark the claim paused or not: its mapping only, never the next claim's."""
        key = self._keys.api_sandbox(entry.e2b_id)
        value = "1" if paused else ""
        await self._if_claim(keys=[key], args=[entry.claim_id, "paused", value])
        entry.paused = paused

    async def extend(self, entry: Entry, lease_s: int) -> None:
        await self._redis.expire(self._keys.api_sandbox(entry.e2b_id), lease_s + GRACE_S)

    async def get(self, e2b_id: str) -> Entry | None:
        """The entry of a claim that still holds; None for anything else."""
        entry, holds = await self._load(e2b_id)
        return entry if holds else None

    async def _load(self, e2b_id: str) -> tuple[Entry | None, bool]:
        """The entry under `e2b_id` (None if none or garbage), and whether its claim holds."""
        if not e2b_id or len(e2b_id) > 200:
            return None, False
        raw, record = await self._load_script(
            keys=[self._keys.api_sandbox(e2b_id)], args=[self._keys.sandbox("")]
        )
        fields = dict(zip(raw[::2], raw[1::2], strict=True))
        entry = Entry.from_hash(e2b_id, fields) if fields else None
        if entry is None or len(record) != 3:
            return entry, False
        state, claim_id, expires = record
        if state != "claimed" or claim_id != entry.claim_id:
            return entry, False
        text = expires or ""
        entry.lease_expires_ms = int(text) if text.isascii() and text.isdigit() else 0
        return entry, True

    async def remove(self, entry: Entry) -> None:
        """Forget the entry, if the mapping is still this claim's: the same E2B id (a local
        sandbox reused after a reset) may map the next claim by now."""
        await self._if_claim(keys=[self._keys.api_sandbox(entry.e2b_id)], args=[entry.claim_id])
        await self._redis.zrem(self._keys.api_key_sandboxes(entry.key), entry.e2b_id)

    async def live(self, key: str) -> list[Entry]:
        """The key's sandboxes whose claims still hold; forgets the others."""
        zset = self._keys.api_key_sandboxes(key)
        await self._redis.zremrangebyscore(zset, 1, int(time.time() * 1000))
        found, gone = [], []
        for member in await self._redis.zrangebyscore(zset, 0, 0):
            entry, holds = await self._load(member)
            if entry is not None and entry.key == key and holds:
                found.append(entry)
                continue
            gone.append(member)
            if entry is not None and entry.key == key:  # this key's claim is over: forget
                await self.remove(entry)  # its mapping (its token opens nothing any more)
        if gone:
            await self._redis.zrem(zset, *gone)
        return found
