"""Consumer groups of the event stream: names, the registry of groups that hold retention
(`sandboxd consumers add|list|remove`), and what each group has read.

A group name reaches Redis from whoever may write it (`XGROUP CREATE`, an `HSET` of the
registry), so it is input: a name that is not 1-64 characters of `[A-Za-z0-9_.:-]` is
refused when given and skipped (logged) when read.
"""

import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from sandboxd.decode import BadValue, json_value
from sandboxd.store.keys import Keys

log = logging.getLogger(__name__)
GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
CONSUMER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
STREAM_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")
MAX_REGISTERED = 256  # groups that may hold retention: bounds the trimmer's work per pass
_warned: set[str] = set()


class ConsumerError(ValueError):
    """A bad group or consumer name, or a registry that is full."""


def check_group(name: str) -> str:
    if not isinstance(name, str) or not GROUP_NAME.match(name):
        raise ConsumerError(
            f"consumer group {str(name)[:80]!r}: 1-64 characters of A-Z a-z 0-9 _ . : - "
            "(starting with a letter or digit)"
        )
    return name


def check_consumer(name: str) -> str:
    if not isinstance(name, str) or not CONSUMER_NAME.match(name):
        raise ConsumerError(
            f"consumer {str(name)[:80]!r}: 1-128 characters of A-Z a-z 0-9 _ . : @ - "
            "(starting with a letter or digit)"
        )
    return name


def parse_id(entry_id: Any) -> tuple[int, int] | None:
    """A stream id as a comparable pair; None for anything that is not one."""
    if not isinstance(entry_id, str) or not STREAM_ID.match(entry_id):
        return None
    ms, seq = entry_id.split("-")
    pair = int(ms), int(seq)
    return pair if max(pair) < 2**64 else None


def format_id(pair: tuple[int, int]) -> str:
    return f"{pair[0]}-{pair[1]}"


def successor(pair: tuple[int, int]) -> tuple[int, int]:
    """The smallest id after `pair`."""
    return (pair[0], pair[1] + 1) if pair[1] < 2**64 - 1 else (pair[0] + 1, 0)


async def ensure_group(redis: Redis, stream: str, group: str, start: str = "$") -> bool:
    """Create `group` on `stream` (and the stream, if need be) reading from `start`; False
    when it exists already (its position is kept)."""
    try:
        await redis.xgroup_create(stream, check_group(group), id=start, mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise
    return True


@dataclass
class GroupStats:
    """What `sandboxd consumers list` shows of one group, and what retention needs."""

    name: str
    registered: bool
    exists: bool
    consumers: int = 0
    pending: int = 0
    lag: int | None = None  # entries not yet delivered to the group (None: unknown)
    idle_s: float | None = None  # since the most recently active consumer last acted
    last_delivered: str = ""
    oldest_pending: str = ""
    needs: str = ""  # the oldest entry the group still needs ("" for a missing group)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ConsumerRegistry:
    """The registered groups (`<prefix>:events:consumers`) and every group's progress."""

    def __init__(self, redis: Redis, keys: Keys):
        self._redis = redis
        self._keys = keys

    async def add(self, group: str, *, start: str = "$", by: str = "") -> bool:
        """Register `group` (created at `start` when it does not exist yet: `$` for new
        events, `0` for all the stream holds). False when it was registered already."""
        check_group(group)
        if start not in ("$", "0") and parse_id(start) is None:
            raise ConsumerError(f"start {start[:40]!r}: $, 0 or a stream id (ms-seq)")
        registered = await self.registered()
        if group not in registered and len(registered) >= MAX_REGISTERED:
            raise ConsumerError(f"at most {MAX_REGISTERED} groups may be registered")
        await ensure_group(self._redis, self._keys.events, group, start)
        value = json.dumps({"added_at": time.time(), "by": by[:200]})
        return bool(await self._redis.hsetnx(self._keys.event_consumers, group, value))

    async def remove(self, group: str, *, destroy: bool = False) -> bool:
        """Unregister `group` (it no longer holds retention); `destroy` also deletes the
        group and its pending entries from the stream. False if it was not registered."""
        check_group(group)
        removed = bool(await self._redis.hdel(self._keys.event_consumers, group))
        if destroy and await self._redis.type(self._keys.events) == "stream":
            removed = bool(await self._redis.xgroup_destroy(self._keys.events, group)) or removed
        return removed

    async def registered(self) -> list[str]:
        """Registered group names, valid ones only (a bad name is logged once and skipped)."""
        key = self._keys.event_consumers
        if await self._redis.type(key) not in ("hash", "none"):
            _warn_once(key, f"{key} is not a hash: no group holds retention until it is one")
            return []
        names = []
        for name in await self._redis.hkeys(key):
            if isinstance(name, str) and GROUP_NAME.match(name):
                names.append(name)
            else:
                _warn_once(f"{key}:{name!r}", f"{key}: skipping the bad group name {name!r:.80}")
        return sorted(names)[:MAX_REGISTERED]

    async def meta(self, group: str) -> dict[str, Any]:
        raw = await self._redis.hget(self._keys.event_consumers, group)
        try:
            value = json_value(raw) if raw else {}
        except BadValue:
            return {}
        return value if isinstance(value, dict) else {}

    async def stats(self, *, everything: bool = True) -> list[GroupStats]:
        """Every registered group, and (`everything`) every other group of the stream."""
        registered = set(await self.registered())
        stream = self._keys.events
        infos: list[dict[str, Any]] = []
        first = "-"
        if await self._redis.type(stream) == "stream":
            infos = await self._redis.xinfo_groups(stream)
            oldest = await self._redis.xrange(stream, count=1)
            first = oldest[0][0] if oldest else "-"
        found: dict[str, GroupStats] = {}
        for info in infos:
            name = info.get("name")
            if not isinstance(name, str) or not GROUP_NAME.match(name):
                continue  # someone's group with a name we would not print
            if name not in registered and not everything:
                continue
            found[name] = await self._group(stream, name, info, name in registered, first)
        for name in registered - set(found):
            found[name] = GroupStats(name=name, registered=True, exists=False)
        return [found[name] for name in sorted(found)]

    async def _group(
        self, stream: str, name: str, info: dict[str, Any], registered: bool, first: str
    ) -> GroupStats:
        last = str(info.get("last-delivered-id") or "0-0")
        lag = info.get("lag")
        stats = GroupStats(
            name=name,
            registered=registered,
            exists=True,
            consumers=_int(info.get("consumers")),
            pending=_int(info.get("pending")),
            lag=int(lag) if isinstance(lag, int) else None,
            last_delivered=last,
        )
        if stats.consumers:
            idle = [_int(c.get("idle")) for c in await self._redis.xinfo_consumers(stream, name)]
            stats.idle_s = min(idle) / 1000 if idle else None
        needs = successor(parse_id(last) or (0, 0))
        if stats.pending:
            # The oldest pending entry the stream still holds (older ones were trimmed: a
            # consumer's XAUTOCLAIM clears them, they hold nothing back).
            page = await self._redis.xpending_range(stream, name, first, "+", 1)
            oldest = parse_id(page[0].get("message_id") if page else None)
            if oldest is not None:
                stats.oldest_pending = format_id(oldest)
                needs = min(needs, oldest)
        stats.needs = format_id(needs)
        return stats


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _warn_once(key: str, message: str) -> None:
    if key not in _warned and len(_warned) < 1000:
        _warned.add(key)
        log.warning(message)
