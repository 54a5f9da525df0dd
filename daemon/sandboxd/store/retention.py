"""Retention of the event stream: the daemon trims `<prefix>:events` itself (clients' scripts
do not), to `event_stream_maxlen` entries, but never past the oldest entry a registered
consumer group (or the MQTT bridge's cursor) still needs — up to the hard bound
(`events.max_len`, `events.max_age_s`), beyond which the oldest entries go anyway and
`events.dropped` names the groups that lost entries and how many each lost.

One Lua script decides and trims in one step, so what it counts as lost is exactly what
it removed; it removes at most CHUNK entries per run (it holds Redis meanwhile) and is run
again at once while there is more to remove."""

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from sandboxd.config import Config
from sandboxd.store.consumers import (
    ConsumerRegistry,
    GroupStats,
    format_id,
    parse_id,
    successor,
)
from sandboxd.store.events import EventPublisher
from sandboxd.store.keys import Keys
from sandboxd.store.loops import every

log = logging.getLogger(__name__)
CHUNK = 10_000
MQTT_HOLDER = "mqtt-bridge"

# KEYS: the stream. ARGV: 1 soft length, 2 hard length, 3 max age in ms (0: none),
# 4 floor id ('' none: entries below it are needed by nobody), 5 chunk, then triples of
# holder name, its last delivered id, '1' if it is a consumer group (its pending entries
# count too). Removes a prefix of the stream: entries past the hard bounds, and entries past
# the soft length below the floor. Returns {removed, first id, last id, reason, name, lost,
# ...} (removed 0: nothing to do).
_TRIM = r"""
if redis.call('TYPE', KEYS[1]).ok ~= 'stream' then return {0} end
local function num_lt(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end
local function lt(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if not am or not bm then return false end
  if am ~= bm then return num_lt(am, bm) end
  return num_lt(as, bs)
end
local len = redis.call('XLEN', KEYS[1])
local soft, hard, age_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local floor, chunk = ARGV[4], tonumber(ARGV[5])
local n_soft, n_hard = math.max(0, len - soft), math.max(0, len - hard)
local age_cut = ''
if age_ms > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  age_cut = string.format('%d-0', math.max(0, now - age_ms))
  local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  if #oldest == 0 or not lt(oldest[1][1], age_cut) then age_cut = '' end
end
if n_soft == 0 and age_cut == '' then return {0} end
local want = chunk
if age_cut == '' then want = math.min(n_soft, chunk) end
local last = '+'
if n_hard == 0 and age_cut == '' and floor ~= '' then
  last = '(' .. floor  -- nothing forced: only what nobody needs is looked at
end
local page = redis.call('XRANGE', KEYS[1], '-', last, 'COUNT', want)
local removed, by_len, by_age = 0, false, false
for i, entry in ipairs(page) do
  local id = entry[1]
  local past_len = i <= n_hard
  local too_old = age_cut ~= '' and lt(id, age_cut)
  local spare = i <= n_soft and (floor == '' or lt(id, floor))
  if not (past_len or too_old or spare) then break end
  if not spare then
    by_len = by_len or past_len
    by_age = by_age or (too_old and not past_len)
  end
  removed = i
end
if removed == 0 then return {0} end
local first, last = page[1][1], page[removed][1]
local reason = ''
if by_len then reason = 'events.max_len' elseif by_age then reason = 'events.max_age_s' end
local out = {removed, first, last, reason}
if reason ~= '' then
  for j = 6, #ARGV, 3 do
    local name, delivered, group = ARGV[j], ARGV[j + 1], ARGV[j + 2]
    local lost = 0
    for i = 1, removed do
      if lt(delivered, page[i][1]) then lost = lost + 1 end
    end
    if group == '1' then
      lost = lost + #redis.call('XPENDING', KEYS[1], name, first, last, removed)
    end
    if lost > 0 then
      table.insert(out, name)
      table.insert(out, lost)
    end
  end
end
redis.call('XTRIM', KEYS[1], 'MAXLEN', len - removed)
return out
"""


@dataclass
class TrimResult:
    removed: int = 0
    first_id: str = ""
    last_id: str = ""
    reason: str = ""  # the hard bound that forced entries out ("": none did)
    lost: dict[str, int] = field(default_factory=dict)


class Retention:
    """The daemon's trimmer of the event stream, and the groups' progress for metrics."""

    def __init__(
        self,
        *,
        redis: Redis,
        keys: Keys,
        config: Config,
        events: EventPublisher,
        mqtt_cursor: Callable[[], Awaitable[str | None]] | None = None,
    ):
        self._redis = redis
        self._keys = keys
        self._config = config
        self._events = events
        self._mqtt_cursor = mqtt_cursor
        self._trim = redis.register_script(_TRIM)
        self.registry = ConsumerRegistry(redis, keys)
        self.groups: list[GroupStats] = []
        self.lost: dict[str, int] = {}  # entries each holder lost to the hard bound, in total
        self.length = 0

    async def run(self) -> None:
        await every(
            lambda: self._config.events.trim_interval_s, self.step, "event stream not trimmed"
        )

    async def step(self) -> list[TrimResult]:
        """One pass: sample the registered groups, trim what may go, announce losses."""
        self.groups = await self.registry.stats(everything=False)
        holders: list[tuple[str, str, tuple[int, int], bool]] = [
            (g.name, g.last_delivered, parse_id(g.needs) or (0, 0), True)
            for g in self.groups
            if g.exists
        ]
        if self._mqtt_cursor is not None:
            cursor = parse_id(await self._mqtt_cursor())
            if cursor is not None:
                holders.append((MQTT_HOLDER, format_id(cursor), successor(cursor), False))
        floor = min((needs for _, _, needs, _ in holders), default=None)
        results = []
        while True:
            result = await self._trim_once(holders, floor)
            if result.removed == 0:
                break
            results.append(result)
            if result.lost:
                await self._announce(result)
            if result.removed < CHUNK:
                break
        self.length = int(await self._redis.xlen(self._keys.events) or 0)
        return results

    async def _trim_once(
        self, holders: list[tuple[str, str, tuple[int, int], bool]], floor: tuple[int, int] | None
    ) -> TrimResult:
        soft = self._config.event_stream_maxlen
        bounds = self._config.events
        age_ms = int(bounds.max_age_s * 1000) if bounds.max_age_s else 0
        args: list[Any] = [
            soft,
            bounds.hard_len(soft),
            age_ms,
            format_id(floor) if floor is not None else "",
            CHUNK,
        ]
        for name, delivered, _, group in holders:
            args += [name, delivered, "1" if group else "0"]
        reply = await self._trim(keys=[self._keys.events], args=args)
        if not reply or int(reply[0]) == 0:
            return TrimResult()
        lost = {str(reply[i]): int(reply[i + 1]) for i in range(4, len(reply) - 1, 2)}
        return TrimResult(int(reply[0]), str(reply[1]), str(reply[2]), str(reply[3]), lost)

    async def _announce(self, result: TrimResult) -> None:
        for name, n in result.lost.items():
            self.lost[name] = self.lost.get(name, 0) + n
        log.warning(
            "event stream over its hard bound: entries consumers had not read were trimmed",
            extra={"reason": result.reason, "lost": result.lost, "removed": result.removed},
        )
        await self._events.publish(
            "events.dropped",
            groups=result.lost,
            removed=result.removed,
            first_id=result.first_id,
            last_id=result.last_id,
            reason=result.reason,
        )

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per registered group: lag, pending, lost (metrics, status)."""
        return {
            g.name: {
                "lag": g.lag,
                "pending": g.pending,
                "exists": g.exists,
                "lost": self.lost.get(g.name, 0),
            }
            for g in self.groups
        }
