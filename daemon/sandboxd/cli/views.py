"""Read-only views of the state in Redis, shared by the CLI's `get` and `status`."""

import json
import time
from typing import Any

from redis.asyncio import Redis

from sandboxd import decode
from sandboxd.spec import SpecDocument
from sandboxd.store.keys import Keys
from sandboxd.store.records import STATES, SandboxRecord, SandboxStore
from sandboxd.store.specs import SpecStore, _lenient, stored_revision


def pool_rows(spec: SpecDocument | None, records: list[SandboxRecord]) -> list[dict[str, Any]]:
    """One row per pool in the spec, plus pools still draining; counts by state."""
    pools = list(spec.pools) if spec else []
    by_pool: dict[str, list[SandboxRecord]] = {}
    for record in records:
        by_pool.setdefault(record.pool, []).append(record)
    specs = {p.name: p for p in pools}
    names = [p.name for p in pools] + sorted(by_pool.keys() - specs.keys())
    rows = []
    for name in names:
        members = by_pool.get(name, [])
        pool = specs.get(name)
        row: dict[str, Any] = {
            "name": name,
            "provider": pool.provider if pool else (members[0].provider if members else ""),
            "template": pool.template if pool else "",
            "min_ready": pool.min_ready if pool else 0,
            "max_total": pool.max_total if pool else 0,
            "desired": pool.min_ready if pool else 0,
            "draining": pool is None,
        }
        counts: dict[str, int] = dict.fromkeys(STATES, 0)
        for member in members:
            counts[member.state] = counts.get(member.state, 0) + 1
        row.update(counts)
        row["total"] = len(members)
        rows.append(row)
    return rows


def sandbox_row(record: SandboxRecord, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    return {
        "id": record.id,
        "pool": record.pool,
        "provider": record.provider,
        "provider_id": provider_id(record),
        "state": record.state,
        "created_at": record.created_at,
        "ready_at": record.ready_at,
        "age_s": round(now - record.created_ts, 1),
        "template": record.template,
        "spec_revision": record.spec_revision,
        "pid": record.handle.get("pid"),
        "isolation": record.handle.get("isolation", ""),
        "health": record.health,
        "health_reason": record.health_reason,
        "replaces": record.replaces,
    }


def provider_id(record: SandboxRecord) -> str:
    """The provider's own id of the sandbox (E2B's sandbox id), "" where it has none of its
    own (a local sandbox is known by sandboxd's id). From Redis: only a string is shown."""
    value = record.handle.get("e2b_id")
    return value if isinstance(value, str) else ""


class StateView:
    def __init__(self, redis: Redis, keys: Keys):
        self._redis = redis
        self._keys = keys
        self.specs = SpecStore(redis, keys)
        self.store = SandboxStore(redis, keys)

    async def spec_for_display(self) -> SpecDocument | None:
        """The spec in force; the stored one when no daemon has taken any yet."""
        return await self.specs.active() or await self.specs.history_head()

    async def pools(self, spec: SpecDocument | None = None) -> list[dict[str, Any]]:
        spec = spec or await self.spec_for_display()
        return pool_rows(spec, await self.store.records())

    async def sandboxes(self, pool: str | None = None) -> list[dict[str, Any]]:
        records = await self.store.records()
        return [sandbox_row(r) for r in records if pool is None or r.pool == pool]

    async def daemon(self) -> dict[str, Any] | None:
        raw = await self._redis.get(self._keys.daemon)
        return json.loads(raw) if raw else None

    async def daemon_pools(self) -> dict[str, dict[str, Any]]:
        """What only the daemon knows of each pool (`<prefix>:daemon:pools`), one HGETALL."""
        fields = await self._redis.hgetall(self._keys.daemon_pools)
        out = {}
        for name, raw in fields.items():
            try:
                facts = json.loads(raw)
            except ValueError:
                continue
            if isinstance(facts, dict):
                out[name] = facts
        return out

    async def daemons(self, now: float | None = None) -> list[dict[str, Any]]:
        """Every daemon that beat in the last minute, active or standby (`<prefix>:daemons`),
        by node, the active one first. Lines that are not what a daemon writes are left out
        (anyone may write into Redis)."""
        now = time.time() if now is None else now
        found = []
        for raw in (await self._redis.hgetall(self._keys.daemons)).values():
            line = _daemon_line(raw, now)
            if line is not None:
                found.append(line)
        return sorted(found, key=lambda d: (d["node"], d["role"] != "active", d["instance"]))

    async def status(self) -> dict[str, Any]:
        """The heartbeat (with its summary of the pools), each pool's facts from
        `<prefix>:daemon:pools` as `daemon.pools`, the spec read and parsed once."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(self._keys.daemon)
            pipe.get(self._keys.spec_active)
            pipe.get(self._keys.spec)
            beat, active_raw, stored = await pipe.execute()
        daemon = json.loads(beat) if beat else None
        if daemon is not None:
            daemon["pools"] = await self.daemon_pools()
        active = _lenient(active_raw)
        if stored is not None and stored == active_raw and active is not None:
            revision_stored: int | None = active.revision  # the same document: parsed once
        else:
            revision_stored = stored_revision(stored) or None
        return {
            "daemon": {"alive": daemon is not None, **(daemon or {})},
            "daemons": await self.daemons(),
            "revision_in_force": active.revision if active else None,
            "revision_stored": revision_stored,
            "pools": await self.pools(active),
        }


_DAEMON_TEXT = ("instance", "node", "role", "host", "version")
_DAEMON_NUMBERS = ("pid", "epoch", "heartbeat_at", "started_at", "active_epoch")


def _daemon_line(raw: str, now: float) -> dict[str, Any] | None:
    try:
        data = json.loads(raw)
    except (ValueError, TypeError):
        return None
    if not isinstance(data, dict):
        return None
    line: dict[str, Any] = {}
    for name in _DAEMON_TEXT:
        value = data.get(name, "")
        line[name] = decode.printable(value)[:100] if isinstance(value, str) else ""
    for name in _DAEMON_NUMBERS:
        value = data.get(name)
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value == value
        line[name] = value if ok else None
    beat = line["heartbeat_at"]
    if not line["instance"] or beat is None or now - beat > 60:
        return None
    line["age_s"] = round(max(0.0, now - beat), 1)
    return line
