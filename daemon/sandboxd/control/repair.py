"""Redis is input: quarantine what cannot be used, rebuild what is derived from the records.

- **Quarantine** (`Quarantine.handle`, every reconcile pass): a sandbox record that cannot be
  read (a field that is not UTF-8 or of the wrong type, a string where the hash was) is
  reported once (`state.corrupt`: key, field, reason), closed (removed from every set, list
  and the lease index), and its sandbox is terminated through the provider's own registry
  (the handle the provider lists, never the one the broken record names).
- **Wrong types** (`Healer.check_types`, every tick and whenever a command met WRONGTYPE):
  keys the daemon derives or owns (ready lists, member sets, waiters, the lease index, the
  pool settings, the id set, the event stream) holding another type are reported and
  deleted, then rebuilt from the records; the spec key is the operator's, so it is only
  reported (the spec in force stays, see `specsource.py`).
- **Healing** (`Healer.heal`, every tick): ready lists, member sets and the lease index are
  compared with the records in one script per chunk of pools and rebuilt where they
  disagree (`state.repaired`: what, pool, added, removed). The script checks each record's
  state itself, so a claim or release running meanwhile is never undone.
"""

import logging
from collections.abc import Iterable
from typing import Any

from redis.asyncio import Redis

from sandboxd import decode
from sandboxd.providers import Provider, list_all
from sandboxd.store.events import EventPublisher
from sandboxd.store.keys import Keys
from sandboxd.store.records import Corrupt, SandboxRecord

log = logging.getLogger(__name__)
POOLS_PER_SCRIPT = 256  # bounds how long one healing script holds Redis
IDLE_WINDOW = 1000  # pools without sandboxes healed per tick

# ARGV: prefix, then per pool: name, n, n ready ids (oldest first), m, m member ids.
# Per pool: the ready list becomes [its entries whose record is ready in this pool, without
# duplicates] + [the given ready ids whose record is still ready and that were missing];
# the member set gets the given ids that have a record, and loses ids whose record is gone
# or of another pool. Returns {pool, ready_added, ready_removed, members_added,
# members_removed} for each pool where something changed.
_HEAL_POOLS = """
local prefix = ARGV[1]
local function record_of(id, pool, state)
  local key = prefix .. ':sandbox:' .. id
  if redis.call('TYPE', key).ok ~= 'hash' then return false end
  local r = redis.call('HMGET', key, 'state', 'pool')
  return r[2] == pool and (state == nil or r[1] == state)
end
local out = {}
local i = 2
while i <= #ARGV do
  local pool = ARGV[i]
  local n = tonumber(ARGV[i + 1])
  local first_ready, first_member = i + 2, i + 3 + n
  local m = tonumber(ARGV[i + 2 + n])
  i = first_member + m
  local ready_key = prefix .. ':pool:' .. pool .. ':ready'
  local members_key = prefix .. ':pool:' .. pool .. ':members'
  local added, removed, madded, mremoved = 0, 0, 0, 0
  if redis.call('TYPE', ready_key).ok == 'list' or redis.call('EXISTS', ready_key) == 0 then
    local current = redis.call('LRANGE', ready_key, 0, -1)
    local wanted, seen = {}, {}
    for _, id in ipairs(current) do
      if not seen[id] and record_of(id, pool, 'ready') then
        seen[id] = true
        table.insert(wanted, id)
      else
        removed = removed + 1
      end
    end
    for j = first_ready, first_ready + n - 1 do
      local id = ARGV[j]
      if not seen[id] and record_of(id, pool, 'ready') then
        seen[id] = true
        table.insert(wanted, id)
        added = added + 1
      end
    end
    if added > 0 or removed > 0 then
      redis.call('DEL', ready_key)
      for k = 1, #wanted, 1000 do
        redis.call('RPUSH', ready_key, unpack(wanted, k, math.min(k + 999, #wanted)))
      end
    end
  end
  if redis.call('TYPE', members_key).ok == 'set' or redis.call('EXISTS', members_key) == 0 then
    for j = first_member, first_member + m - 1 do
      if record_of(ARGV[j], pool) then
        madded = madded + redis.call('SADD', members_key, ARGV[j])
      end
    end
    for _, id in ipairs(redis.call('SMEMBERS', members_key)) do
      if not record_of(id, pool) then
        mremoved = mremoved + redis.call('SREM', members_key, id)
      end
    end
  end
  if added + removed + madded + mremoved > 0 then
    table.insert(out, {pool, added, removed, madded, mremoved})
  end
end
return out
"""

# KEYS: the lease index. ARGV: prefix, claimed ids. A claimed record missing from the index
# goes back in with its own deadline; an entry whose record is not claimed goes.
_HEAL_LEASES = """
local prefix = ARGV[1]
local function claimed(id)
  local key = prefix .. ':sandbox:' .. id
  if redis.call('TYPE', key).ok ~= 'hash' then return nil end
  local r = redis.call('HMGET', key, 'state', 'lease_expires_ms')
  if r[1] ~= 'claimed' then return nil end
  if type(r[2]) ~= 'string' or not r[2]:match('^[0-9]+$') or #r[2] > 15 then return nil end
  return r[2]
end
if redis.call('TYPE', KEYS[1]).ok ~= 'zset' and redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, 0}
end
local added, removed = 0, 0
for j = 2, #ARGV do
  local deadline = claimed(ARGV[j])
  if deadline and not redis.call('ZSCORE', KEYS[1], ARGV[j]) then
    added = added + redis.call('ZADD', KEYS[1], deadline, ARGV[j])
  end
end
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if not claimed(id) then
    removed = removed + redis.call('ZREM', KEYS[1], id)
  end
end
return {added, removed}
"""

# KEYS: keys to check. ARGV: the type each should have. Returns {key, type} of each one
# holding another type ('none', a missing key, is fine).
_TYPES = """
local out = {}
for i, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key).ok
  if kind ~= 'none' and kind ~= ARGV[i] then table.insert(out, {key, kind}) end
end
return out
"""


class Quarantine:
    """Records that cannot be read: reported once, closed, their sandbox terminated."""

    def __init__(self, redis: Redis, keys: Keys, events: EventPublisher):
        self._redis = redis
        self._keys = keys
        self._events = events
        self._reported: set[tuple[str, str]] = set()

    async def handle(self, corrupt: Iterable[Corrupt], providers: dict[str, Provider]) -> int:
        """Quarantine each; returns how many records were closed."""
        records = [c for c in corrupt if c.sandbox_id]
        if not records:
            return 0
        listing = await list_all(providers)
        for item in records:
            action = await self._terminate(item, listing.sandboxes)
            await self._close(item)
            await self._report(item, action)
        return len(records)

    async def _terminate(self, item: Corrupt, listed: dict[str, Any]) -> str:
        """Through the provider's own registry: only a sandbox it lists under this id."""
        try:
            sandbox_id = decode.text(item.sandbox_id, max_chars=100)
        except decode.BadValue:
            return "record closed (its id names no sandbox)"
        found = listed.get(sandbox_id)
        if found is None:
            return "record closed (no provider holds the sandbox)"
        provider, sandbox = found
        try:
            await provider.terminate(sandbox.id, sandbox.handle)
        except Exception as exc:  # the janitor finds it again (it has no record now)
            log.warning("terminating a quarantined sandbox failed: %s", exc)
            return f"record closed; terminating the sandbox failed: {exc}"
        return f"record closed, sandbox terminated ({provider.name})"

    async def _close(self, item: Corrupt) -> None:
        pool = item.fields.get("pool", "")
        try:
            pools = [decode.text(pool, max_chars=200)] if pool else []
        except decode.BadValue:
            pools = []
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(item.key)
            pipe.srem(self._keys.sandboxes, item.sandbox_id)
            pipe.zrem(self._keys.leases, item.sandbox_id)
            for name in pools:  # other pools' lists and sets are healed by the next tick
                pipe.srem(self._keys.pool_members(name), item.sandbox_id)
                pipe.lrem(self._keys.pool_ready(name), 0, item.sandbox_id)
            await pipe.execute(raise_on_error=False)

    async def _report(self, item: Corrupt, action: str) -> None:
        key, field = decode.printable(item.key), decode.printable(item.field)
        log.error(
            "corrupt record quarantined: %s %s: %s",
            key,
            field,
            item.reason,
            extra={"key": key, "field": field, "reason": item.reason, "action": action},
        )
        if (item.key, item.reason) in self._reported:
            return
        self._reported.add((item.key, item.reason))
        await self._events.publish(
            "state.corrupt",
            sandbox=decode.printable(item.sandbox_id)[:100],
            key=key,
            field=field,
            reason=item.reason,
            key_type=item.kind,
            action=action,
        )


class Healer:
    """Derived structures rebuilt from the records; keys of the wrong type replaced."""

    def __init__(self, redis: Redis, keys: Keys, events: EventPublisher):
        self._redis = redis
        self._keys = keys
        self._events = events
        # Pools without sandboxes are checked a window at a time, so that a tick's cost
        # follows the sandboxes, not the number of pools (20,000 idle pools).
        self._idle_cursor = {"heal": 0, "types": 0}
        self._heal_pools = redis.register_script(_HEAL_POOLS)
        self._heal_leases = redis.register_script(_HEAL_LEASES)
        self._types = redis.register_script(_TYPES)

    def _window(self, what: str, pools: Iterable[str], busy: set[str]) -> list[str]:
        """Every pool with sandboxes, plus the next IDLE_WINDOW of the others."""
        idle = sorted(set(pools) - busy)
        if len(idle) > IDLE_WINDOW:
            start = self._idle_cursor[what] % len(idle)
            self._idle_cursor[what] = start + IDLE_WINDOW
            idle = (idle[start:] + idle[:start])[:IDLE_WINDOW]
        return sorted(busy) + idle

    async def heal(self, records: list[SandboxRecord], pools: Iterable[str]) -> None:
        """Ready lists, member sets and the lease index agree with `records` afterwards
        (pools without sandboxes: a window of them per call)."""
        pools = self._window("heal", pools, {r.pool for r in records})
        ready: dict[str, list[SandboxRecord]] = {name: [] for name in pools}
        members: dict[str, list[str]] = {name: [] for name in ready}
        for record in records:
            members.setdefault(record.pool, []).append(record.id)
            ready.setdefault(record.pool, [])
            if record.state == "ready":
                ready[record.pool].append(record)
        names = list(members)
        for start in range(0, len(names), POOLS_PER_SCRIPT):
            args: list[Any] = [self._keys.prefix]
            for name in names[start : start + POOLS_PER_SCRIPT]:
                ids = [r.id for r in sorted(ready[name], key=lambda r: (r.ready_at, r.id))]
                args += [name, len(ids), *ids, len(members[name]), *members[name]]
            for pool, *counts in await self._heal_pools(args=args):
                await self._repaired(pool, counts)
        claimed = [r.id for r in records if r.state == "claimed"]
        added, removed = await self._heal_leases(
            keys=[self._keys.leases], args=[self._keys.prefix, *claimed]
        )
        if added or removed:
            await self._publish("leases", "", added, removed)

    async def _repaired(self, pool: str, counts: list[Any]) -> None:
        ready_added, ready_removed, members_added, members_removed = map(int, counts)
        if ready_added or ready_removed:
            await self._publish("ready_list", pool, ready_added, ready_removed)
        if members_added or members_removed:
            await self._publish("members", pool, members_added, members_removed)

    async def _publish(self, what: str, pool: str, added: int, removed: int) -> None:
        log.warning(
            "repaired %s from the records",
            what,
            extra={"pool": pool, "added": added, "removed": removed},
        )
        await self._events.publish(
            "state.repaired", pool=pool, what=what, added=added, removed=removed
        )

    async def check_types(self, pools: Iterable[str], busy: set[str] | None = None) -> int:
        """Keys of ours holding the wrong type: reported, deleted (they are rebuilt from
        the records), and the id set rebuilt at once. Returns how many were replaced.
        `busy`: pools with sandboxes, always checked; the others a window per call (all of
        them when `busy` is None)."""
        if busy is not None:
            pools = self._window("types", pools, busy)
        expected = {
            self._keys.sandboxes: "set",
            self._keys.leases: "zset",
            self._keys.pools: "hash",
            self._keys.events: "stream",
        }
        for name in pools:
            expected[self._keys.pool_ready(name)] = "list"
            expected[self._keys.pool_members(name)] = "set"
            expected[self._keys.pool_waiters(name)] = "zset"
        keys, kinds = list(expected), list(expected.values())
        wrong: list[tuple[str, str]] = []
        for start in range(0, len(keys), 1000):
            reply = await self._types(
                keys=keys[start : start + 1000], args=kinds[start : start + 1000]
            )
            wrong += [(str(key), str(kind)) for key, kind in reply]
        for key, kind in wrong:
            await self._replace(key, kind, expected[key])
        return len(wrong)

    async def _replace(self, key: str, kind: str, wanted: str) -> None:
        reason = f"holds a {kind}, not a {wanted}"
        action = "deleted; rebuilt from the records"
        log.error("%s %s: %s", key, reason, action, extra={"key": key, "type": kind})
        await self._redis.delete(key)
        if key == self._keys.sandboxes:
            found = await self.rebuild_ids()
            action = f"deleted; {found} ids found again from the records"
        await self._events.publish(
            "state.corrupt", key=key, field="", reason=reason, key_type=kind, action=action
        )

    async def rebuild_ids(self) -> int:
        """`<prefix>:sandboxes` from the record keys themselves (SCAN). Keys of any type:
        one that is not a hash goes into the set too, so that the next pass reads it as
        corrupt and quarantines it, instead of it lingering where nothing ever looks."""
        head = self._keys.sandbox("")
        ids = []
        async for key in self._redis.scan_iter(match=f"{head}*", count=1000):
            sandbox_id = key[len(head) :]
            if sandbox_id and ":" not in sandbox_id:
                ids.append(sandbox_id)
        if ids:
            await self._redis.sadd(self._keys.sandboxes, *ids)
            await self._publish("sandboxes", "", len(ids), 0)
        return len(ids)
