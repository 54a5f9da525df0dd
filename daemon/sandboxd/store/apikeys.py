"""API keys of `sandboxd api` (E2B's REST API): issued, listed and revoked by the CLI
(`sandboxd apikey`), checked by the API server on every request (`X-API-KEY`).

A key is a name (the owner of the claims made with it), the pools it may claim from (none:
all), how many sandboxes it may hold at once and how many creates it may make a second (a
token bucket in Redis, so every API server counts the same creates; bursts of up to one
second's worth). Its secret (`sbk_` and 256 random bits) is
shown once, at `create`; Redis keeps only its SHA-256 (`<prefix>:apikeys`,
`<prefix>:apikeys:sha256`), so reading Redis never gives a working key.
"""

import hashlib
import hmac
import json
import re
import secrets
from datetime import UTC, datetime

from pydantic import BaseModel, Field, PrivateAttr, ValidationError
from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from sandboxd.store.claims import ClaimError, ClaimStore
from sandboxd.store.keys import Keys

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
POOL = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
SECRET_PREFIX = "sbk_"
MAX_CREATES_PER_S = 100_000.0

# ARGV: 1 the digest -> name hash, 2 the name -> key hash, 3 the SHA-256 of a secret. The
# key's name and JSON, or nil: one round trip for every authenticated call. The hashes are not
# declared as KEYS: Redis's ACL wants write access to a script's declared keys, and the API
# server may only read these (config/redis-acl.conf); each HGET is checked as a read.
LOOKUP = """
local name = redis.call('HGET', ARGV[1], ARGV[3])
if not name then return false end
return {name, redis.call('HGET', ARGV[2], name)}
"""

# KEYS: 1 the key's bucket. ARGV: 1 creates per second, 2 burst. Takes one create: '0', or
# the milliseconds until one is allowed. Redis's clock, so every API server agrees.
TAKE_CREATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
if redis.call('TYPE', KEYS[1]).ok ~= 'hash' then redis.call('DEL', KEYS[1]) end
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(b[1]), tonumber(b[2])
if not tokens or not at or tokens ~= tokens or tokens > burst or at > now then
  tokens, at = burst, now
end
tokens = math.min(burst, tokens + (now - at) * rate / 1000)
if tokens < 1 then return tostring(math.ceil((1 - tokens) * 1000 / rate)) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return '0'
"""


class ApiKeyError(ValueError):
    """A refused `apikey` command: a bad name, a name in use, an unknown key."""


class ApiKey(BaseModel):
    name: str = Field(pattern=NAME.pattern)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", repr=False)
    pools: list[str] = Field(default_factory=list, description="Empty: every pool.")
    max_sandboxes: int | None = Field(default=None, ge=0)
    creates_per_s: float | None = Field(default=None, gt=0, le=MAX_CREATES_PER_S)
    created_at: str = ""

    # The JSON this key was read from, as Redis holds it ('' for a key made here): what a
    # later check compares to see that the key is still the same (sandboxd api's creates).
    _stored: str = PrivateAttr(default="")

    @property
    def stored(self) -> str:
        return self._stored

    def may_use(self, pool: str) -> bool:
        return not self.pools or pool in self.pools


def secret_sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


class ApiKeyStore:
    def __init__(self, redis: Redis, keys: Keys):
        self._redis = redis
        self._keys = keys
        self._take_create = redis.register_script(TAKE_CREATE)
        self._lookup = redis.register_script(LOOKUP)

    async def create(
        self,
        name: str,
        *,
        pools: list[str] | None = None,
        max_sandboxes: int | None = None,
        creates_per_s: float | None = None,
    ) -> str:
        """Issue a key; returns its secret (the only time it exists outside the caller)."""
        if not NAME.match(name):
            raise ApiKeyError(f"key name {name!r}: 1-64 characters of [A-Za-z0-9_.-]")
        bad = [p for p in pools or [] if not POOL.match(p)]
        if bad:
            raise ApiKeyError(f"pool names {bad}: 1-100 characters of [A-Za-z0-9_.:-]")
        if max_sandboxes is not None and max_sandboxes < 0:
            raise ApiKeyError("--max-sandboxes must be 0 or more")
        if creates_per_s is not None and not 0 < creates_per_s <= MAX_CREATES_PER_S:
            raise ApiKeyError(f"--creates-per-s must be above 0, at most {MAX_CREATES_PER_S:g}")
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(
            name=name,
            sha256=secret_sha256(secret),
            pools=sorted(set(pools or [])),
            max_sandboxes=max_sandboxes,
            creates_per_s=creates_per_s,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        if not await self._redis.hsetnx(self._keys.apikeys, name, key.model_dump_json()):
            raise ApiKeyError(f"a key named {name!r} exists (revoke it first)")
        await self._redis.hset(self._keys.apikey_hashes, key.sha256, name)
        return secret

    async def list(self) -> list[ApiKey]:
        found = []
        for raw in (await self._redis.hgetall(self._keys.apikeys)).values():
            key = _parse(raw)
            if key is not None:
                found.append(key)
        return sorted(found, key=lambda k: k.name)

    async def revoke(self, name: str, claims: ClaimStore) -> int:
        """Delete the key, then end the claims made with it (each with its own claim token,
        so a sandbox claimed again since by someone else is not touched); how many ended."""
        raw = await self._redis.hget(self._keys.apikeys, name)
        if raw is None:
            raise ApiKeyError(f"no key named {name!r}")
        key = _parse(raw)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self._keys.apikeys, name)
            if key is not None:
                pipe.hdel(self._keys.apikey_hashes, key.sha256)
            await pipe.execute()
        ended = 0
        held = self._keys.api_key_sandboxes(name)
        for e2b_id in await self._redis.zrange(held, 0, -1):
            entry = self._keys.api_sandbox(e2b_id)
            sandbox, token, owner = await self._redis.hmget(entry, "sandbox", "claim_token", "key")
            if sandbox and token and owner == name:
                try:
                    await claims.release(sandbox, token)
                    ended += 1
                except (ClaimError, ValueError):
                    pass  # over already, or not a claim of this key's: nothing to end
                await self._redis.delete(entry)
        await self._redis.delete(held, self._keys.api_key_creates(name))
        return ended

    async def take_create(self, key: ApiKey) -> float:
        """Count one create against the key's `creates_per_s`: 0 when allowed, else the
        seconds until one is."""
        if key.creates_per_s is None:
            return 0.0
        burst = max(1.0, key.creates_per_s)
        bucket = self._keys.api_key_creates(key.name)
        wait_ms = await self._take_create(keys=[bucket], args=[key.creates_per_s, burst])
        return int(wait_ms) / 1000

    async def authenticate(self, secret: str | None) -> ApiKey | None:
        """The key whose secret this is; None for anything else (no key, a revoked one)."""
        key, _ = await self.authenticate_and_hget(secret, None)
        return key

    async def authenticate_and_hget(
        self, secret: str | None, also: tuple[str, str] | None
    ) -> tuple[ApiKey | None, str | None]:
        """`authenticate`, and the field `also` = (hash, field) read in the same round trip
        (what the caller needs next if the key holds: a create's pool). The field is
        returned whatever the key; the caller shows it to no one the key does not open."""
        if not secret or len(secret) > 200:
            return None, None
        digest = secret_sha256(secret)
        hashes, keys = self._keys.apikey_hashes, self._keys.apikeys
        if also is None:
            raw, field = await self._lookup(keys=[], args=[hashes, keys, digest]), None
        else:
            try:  # EVALSHA itself: a Script in a pipeline costs a SCRIPT EXISTS first
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.evalsha(self._lookup.sha, 0, hashes, keys, digest)
                    pipe.hget(*also)
                    raw, field = await pipe.execute()
            except NoScriptError:  # a Redis that forgot it: loaded by the Script's call
                raw = await self._lookup(keys=[], args=[hashes, keys, digest])
                field = await self._redis.hget(*also)
        # the key stored under the name its digest names, and naming itself so (anyone who
        # may write these hashes could move a key's JSON under another name)
        name, stored = raw if isinstance(raw, list) and len(raw) == 2 else (None, None)
        key = _parse(stored)
        if key is None or key.name != name or not hmac.compare_digest(key.sha256, digest):
            return None, None
        return key, field


def _parse(raw: str | bytes | None) -> ApiKey | None:
    """A stored key, or None when what Redis holds is not one (anyone may write there)."""
    if raw is None:
        return None
    try:
        key = ApiKey.model_validate(json.loads(raw))
    except (ValueError, TypeError, ValidationError):
        return None
    key._stored = raw if isinstance(raw, str) else raw.decode("utf-8", "surrogateescape")
    return key
