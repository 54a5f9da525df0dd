"""Fencing: a daemon writes to Redis only while it holds its leases, checked by Redis itself.

A daemon acts under one or two leases (its node's, and the cloud leader's while it holds
it). Each was taken with a token `<epoch>:<instance>`, the epoch a fresh INCR. `Fence`
holds those (key, token) pairs and the local deadline of each (last renewal + TTL).

`FencedRedis` is the client every component of an active daemon writes through:

- a plain write command is sent as `EVAL <check the tokens; then run the command>`;
- a Lua script registered on it gets a preamble that checks the tokens first (they ride
  along as its last KEYS and ARGV and are removed before the script's own body runs), so
  each of the store's scripts checks the epoch in the same atomic step as its writes;
- reads, blocking reads and connection commands go straight through.

A write whose token no longer matches is refused by Redis (`FENCED`) and raises
`LeaseLost` — deliberately not a `RedisError`, which loops survive by retrying. Before
anything is sent the local deadline is checked too: a daemon that was paused (SIGSTOP, a
VM freeze) past its TTL knows it lost the lease without asking Redis. Either way the
fence calls `on_lost` once, and the daemon stops acting.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

log = logging.getLogger(__name__)

FENCED = "FENCED"  # another daemon holds the lease now: this one lost it
VACANT = "FENCEFREE"  # nobody holds it (Redis lost its data): retried after re-taking it

# Removes the fence's keys and tokens from KEYS and ARGV (the caller appended them: keys
# k1..kn at the end of KEYS, tokens t1..tn and then n at the end of ARGV) and refuses to go
# on unless every key still holds its token.
PREAMBLE = """
local __n = tonumber(table.remove(ARGV))
for __i = 1, __n do
  local __key = table.remove(KEYS)
  local __token = table.remove(ARGV)
  local __held = redis.call('GET', __key)
  if __held ~= __token then
    if __held then
      return redis.error_reply('FENCED ' .. __key .. ' is no longer held by ' .. __token)
    end
    return redis.error_reply('FENCEFREE ' .. __key .. ' is held by nobody')
  end
end
"""
_WRITE = PREAMBLE + "return redis.call(unpack(ARGV))\n"

# Commands that never change data (or cannot run inside a script): sent as they are.
PASS_THROUGH = frozenset(
    """
    GET MGET GETRANGE STRLEN EXISTS TYPE TTL PTTL EXPIRETIME OBJECT DUMP RANDOMKEY
    HGET HGETALL HMGET HKEYS HVALS HLEN HEXISTS HSTRLEN HSCAN HRANDFIELD
    SMEMBERS SISMEMBER SMISMEMBER SCARD SSCAN SRANDMEMBER SINTER SUNION SDIFF
    LRANGE LLEN LINDEX LPOS
    ZRANGE ZRANGEBYSCORE ZREVRANGE ZREVRANGEBYSCORE ZRANK ZREVRANK ZSCORE ZMSCORE ZCARD
    ZCOUNT ZSCAN ZRANGEBYLEX ZLEXCOUNT
    XRANGE XREVRANGE XLEN XREAD XINFO XPENDING
    SCAN KEYS DBSIZE PING ECHO INFO TIME ROLE CLIENT SCRIPT HELLO AUTH SELECT COMMAND
    MEMORY CONFIG WAIT WATCH UNWATCH MULTI EXEC DISCARD SUBSCRIBE PSUBSCRIBE
    UNSUBSCRIBE PUNSUBSCRIBE READONLY READWRITE QUIT RESET
    EVALSHA_RO EVAL_RO
    """.split()
)
MAX_ARGS = 7000  # Lua's unpack() fails past ~8000 values: bigger writes are chunked by callers


class LeaseVacant(RedisConnectionError):
    """A write found the lease held by nobody: Redis lost its data (FLUSHDB, a restart
    without persistence) while this daemon was renewing in time. An outage as far as the
    loops are concerned (they retry); the lease keeper takes the lease again at once."""


class LeaseLapsed(RedisConnectionError):
    """The lease ran out on this host's clock while Redis could not be reached (every
    renewal since the last one failed to connect or timed out, none was refused): nobody
    can have taken it through a Redis this daemon cannot reach, but nothing proves that
    either. Writes wait (an outage as far as the loops are concerned); the lease keeper
    takes the lease again when Redis answers and it is vacant, and loses it if it is held
    by another daemon. Local sandboxes stay in this daemon's custody meanwhile (see
    `daemon.py`, `Custody`)."""


class LeaseLost(Exception):
    """This daemon no longer holds a lease it acts under: it must stop acting at once.
    Not a RedisError on purpose (loops that outlive Redis errors must not retry it)."""


@dataclass
class Held:
    key: str
    token: str
    ttl_s: float
    valid_until: float  # time.monotonic(): the last renewal's start + ttl_s


class Fence:
    """The leases a daemon acts under, and what happens when one is lost."""

    def __init__(
        self,
        on_lost: Callable[[str], None] = lambda reason: None,
        on_vacant: Callable[[str], None] = lambda key: None,
    ):
        self.held: dict[str, Held] = {}
        self.lost: str | None = None
        # Every renewal since the last good one failed to reach Redis (none was refused):
        # a lease past its deadline then lapses instead of being lost.
        self.cut_off = False
        self._on_lost = on_lost
        self._on_vacant = on_vacant

    def hold(self, key: str, token: str, ttl_s: float, since: float) -> None:
        self.held[key] = Held(key, token, ttl_s, since + ttl_s)

    def renewed(self, key: str, since: float) -> None:
        held = self.held.get(key)
        if held is not None:
            held.valid_until = since + held.ttl_s

    def check(self) -> None:
        """Raise LeaseLost if a lease is lost or past its deadline on this host's clock;
        LeaseLapsed if it is past its deadline because Redis could not be reached."""
        if self.lost is None:
            now = time.monotonic()
            for held in self.held.values():
                if now >= held.valid_until:
                    if self.cut_off:
                        raise LeaseLapsed(
                            f"{held.key} lapsed here: not renewed within {held.ttl_s}s, "
                            "Redis unreachable"
                        )
                    self.lose(f"{held.key} expired here (not renewed within {held.ttl_s}s)")
                    break
        if self.lost is not None:
            raise LeaseLost(self.lost)

    def lapsed(self) -> bool:
        """Is a lease past its deadline while Redis cannot be reached (see LeaseLapsed)?"""
        try:
            self.check()
        except LeaseLapsed:
            return True
        except LeaseLost:
            return False
        return False

    def lose(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
            log.critical("lease lost: %s; no more writes, no more actions", reason)
            self._on_lost(reason)

    def tail(self) -> tuple[list[str], list[str]]:
        """The keys and the ARGV tail (tokens, then their count) a fenced call carries."""
        held = list(self.held.values())
        return [h.key for h in held], [*(h.token for h in held), str(len(held))]

    def refused(self, exc: BaseException) -> BaseException | None:
        """What a refused write raises (None: `exc` is no refusal)."""
        text = str(exc)
        if isinstance(exc, ResponseError) and text.startswith(VACANT):
            self._on_vacant(text)
            return LeaseVacant(text)
        if isinstance(exc, ResponseError) and text.startswith(FENCED):
            self.lose(text)
            return LeaseLost(text)
        return None


def _name(args: tuple[Any, ...]) -> str:
    """The command as redis-py names it (its response callbacks' key), e.g. `SCRIPT LOAD`."""
    first = args[0]
    return (first.decode() if isinstance(first, bytes) else str(first)).upper()


def _fenced_args(fence: Fence, args: tuple[Any, ...]) -> tuple[tuple[Any, ...], bool]:
    """The command to send instead of `args`, and whether it was wrapped."""
    name = _name(args)
    if name.split(" ", 1)[0] in PASS_THROUGH or not fence.held:
        return args, False
    fence.check()
    keys, tail = fence.tail()
    if name in ("EVALSHA", "EVAL"):  # one of our scripts: its preamble checks the tail
        numkeys = int(args[2])
        own_keys, own_args = args[3 : 3 + numkeys], args[3 + numkeys :]
        return (args[0], args[1], numkeys + len(keys), *own_keys, *keys, *own_args, *tail), False
    if len(args) > MAX_ARGS:
        raise ValueError(f"{name} with {len(args)} arguments: write it in chunks")
    return ("EVAL", _WRITE, len(keys), *keys, *args, *tail), True


class FencedPipeline(Pipeline):
    """A pipeline whose queued writes go through the fence."""

    fence: Fence
    _names: list[str | None]

    def pipeline_execute_command(self, *args: Any, **options: Any) -> Any:
        sent, wrapped = _fenced_args(self.fence, args)
        self._fenced_as().append(_name(args) if wrapped else None)
        return super().pipeline_execute_command(*sent, **options)

    def _fenced_as(self) -> list[str | None]:
        """What each queued command stood for (None: sent as it was), by position."""
        names: list[str | None] | None = getattr(self, "_names", None)
        if names is None or len(names) > len(self.command_stack):
            names = []  # the stack was reset since
            self._names = names
        return names

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        names = list(self._fenced_as())
        stack = list(self.command_stack)
        try:
            results = await super().execute(raise_on_error=raise_on_error)
        except ResponseError as exc:
            raise _refusal(self.fence, exc) or exc from None
        finally:
            self._names = []
        for result in results:
            if isinstance(result, ResponseError) and (refusal := _refusal(self.fence, result)):
                raise refusal
        if len(names) != len(results):
            return list(results)
        return [
            _parsed(self, name, result, options)
            for name, result, (_, options) in zip(names, results, stack, strict=True)
        ]


def _refusal(fence: Fence, exc: ResponseError) -> BaseException | None:
    """A pipeline annotates its errors ("Command # 2 (...) of pipeline caused error: ..."):
    find the refusal in the message."""
    text = str(exc)
    for marker in (VACANT, FENCED):
        at = text.find(marker)
        if at >= 0:
            return fence.refused(ResponseError(text[at:].rstrip("',)")))
    return None


def _parsed(client: Any, name: str | None, result: Any, options: dict[str, Any]) -> Any:
    """Apply the response callback of the command a fenced EVAL stood for."""
    if name is None or isinstance(result, Exception):
        return result
    callback = client.response_callbacks.get(name)
    if callback is None:
        return result
    return callback(result, **{k: v for k, v in options.items() if k != "keys"})


class FencedRedis(Redis):
    """A client whose writes go through the fence (see the module's docstring)."""

    fence: Fence

    @classmethod
    def over(cls, client: Redis, fence: Fence) -> "FencedRedis":
        """A fenced client sharing `client`'s connection pool."""
        fenced = cls(connection_pool=client.connection_pool)
        fenced.fence = fence
        return fenced

    def register_script(self, script: Any) -> Any:
        text = script.decode() if isinstance(script, bytes) else script
        return super().register_script(PREAMBLE + text)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = FencedPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint
        )
        pipe.fence = self.fence
        return pipe

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        sent, wrapped = _fenced_args(self.fence, args)
        try:
            result = await super().execute_command(*sent, **options)
        except ResponseError as exc:
            raise _refusal(self.fence, exc) or exc from None
        return _parsed(self, _name(args) if wrapped else None, result, options)
