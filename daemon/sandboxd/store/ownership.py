"""Leases with fencing epochs: which daemon acts for a node, and which leads the cloud pools.

A lease is a key holding `<epoch>:<instance>` with a TTL. It is taken only when free (the
epoch a fresh INCR of its counter, in the same script), renewed only by its holder (compare
and set), and given back only by its holder. The token is what `store.fence` checks on every
write of the holder, so a daemon that lost its lease cannot write even a single key late.

    standby ──(key free: take it, epoch = INCR)──▶ active ──(renewed every ttl/3)──┐
       ▲                                               │ ◀────────────────────────────┘
       └──── exits non-zero, systemd restarts it ◀─────┴── renewal refused, or not renewed
                                                          within ttl on this host's clock

A lease found held by nobody while its holder renews in time means Redis lost its data
(FLUSHDB, a restart without persistence): the holder takes it again at once, with a new
epoch and token, unless a standby was quicker (then the holder has lost it).
"""

import re
import time
from dataclasses import dataclass

from redis.asyncio import Redis

_INSTANCE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local epoch = redis.call('INCR', KEYS[2])
local token = epoch .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
return token
"""
_RENEW = """
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if held then return 0 end
return -1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[2] ~= '' then redis.call('PUBLISH', ARGV[2], ARGV[1]) end
return 1
"""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease now (from its token)."""

    epoch: int
    instance: str

    @classmethod
    def parse(cls, token: str | None) -> "Holder | None":
        """None unless `token` is what a daemon writes (it is shown in logs and in systemd's
        STATUS, where a newline would be another field)."""
        epoch, _, instance = (token or "").partition(":")
        if not (epoch.isascii() and epoch.isdigit() and len(epoch) < 20):
            return None
        return cls(int(epoch), instance) if _INSTANCE.fullmatch(instance) else None


@dataclass(frozen=True)
class Seen:
    """One look at a lease: who holds it (None: nobody, or not a daemon's token), whether
    the key exists at all, and its time to live (None: it has none, so it never runs out)."""

    holder: Holder | None
    present: bool
    left_s: float | None


class Lease:
    """One lease (`key`, its epoch counter `epoch_key`) as seen by one daemon instance."""

    def __init__(
        self,
        redis: Redis,
        key: str,
        epoch_key: str,
        instance: str,
        ttl_s: float,
        released: str = "",
    ):
        self.key = key
        self.released = released  # the channel a release is announced on ('' = none)
        self.epoch_key = epoch_key
        self.instance = instance
        self.ttl_s = ttl_s
        self.token: str | None = None
        self.since = 0.0  # time.monotonic() of the acquisition or last renewal's start
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._redis = redis

    @property
    def epoch(self) -> int:
        holder = Holder.parse(self.token)
        return holder.epoch if holder else 0

    async def try_acquire(self) -> bool:
        """Take the lease if it is free: a new epoch. False if someone holds it."""
        started = time.monotonic()
        token = await self._acquire(
            keys=[self.key, self.epoch_key], args=[self.instance, self._ttl_ms()]
        )
        if not token:
            return False
        self.token, self.since = token, started
        return True

    async def renew(self) -> str:
        """Extend the lease if this instance still holds it: `renewed`; `taken` (another
        holds it) or `vacant` (nobody does: Redis lost its data, or it expired)."""
        started = time.monotonic()
        result = await self._renew(keys=[self.key], args=[self.token or "", self._ttl_ms()])
        if result == 1:
            self.since = started
            return "renewed"
        return "taken" if result == 0 else "vacant"

    async def release(self) -> None:
        """Give the lease back at a clean stop, so a standby need not wait out the TTL."""
        if self.token:
            await self._release(keys=[self.key], args=[self.token, self.released])

    async def look(self) -> "Seen":
        """The lease as it is now (anything may be in Redis: a forged value, another type,
        no time to live)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(self.key)
            pipe.pttl(self.key)
            token, left_ms = await pipe.execute(raise_on_error=False)
        if not isinstance(left_ms, int) or left_ms == -2:
            return Seen(None, present=False, left_s=0.0)
        holder = Holder.parse(token) if isinstance(token, str) else None
        return Seen(holder, present=True, left_s=left_ms / 1000 if left_ms >= 0 else None)

    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl_s * 1000))
