"""Read-only views of the state in Redis, shared by the CLI's `get` and `status`."""

import json
import time
from typing import Any

from redis.asyncio import Redis

from sandboxd.keys import Keys
from sandboxd.spec import SpecDocument
from sandboxd.specstore import SpecStore, stored_revision
from sandboxd.state import STATES, SandboxRecord, SandboxStore


def pool_rows(spec: SpecDocument | None, records: list[SandboxRecord]) -> list[dict[str, Any]]:
    """One row per pool in the spec, plus pools still draining; counts by state."""
    pools = list(spec.pools) if spec else []
    names = [p.name for p in pools]
    names += sorted({r.pool for r in records} - set(names))
    specs = {p.name: p for p in pools}
    rows = []
    for name in names:
        members = [r for r in records if r.pool == name]
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
        row.update({state: sum(1 for r in members if r.state == state) for state in STATES})
        row["total"] = len(members)
        rows.append(row)
    return rows


def sandbox_row(record: SandboxRecord, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    return {
        "id": record.id,
        "pool": record.pool,
        "provider": record.provider,
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


class StateView:
    def __init__(self, redis: Redis, keys: Keys):
        self._redis = redis
        self._keys = keys
        self.specs = SpecStore(redis, keys)
        self.store = SandboxStore(redis, keys)

    async def spec_for_display(self) -> SpecDocument | None:
        """The spec in force; the stored one when no daemon has taken any yet."""
        return await self.specs.active() or await self.specs.history_head()

    async def pools(self) -> list[dict[str, Any]]:
        return pool_rows(await self.spec_for_display(), await self.store.records())

    async def sandboxes(self, pool: str | None = None) -> list[dict[str, Any]]:
        records = await self.store.records()
        return [sandbox_row(r) for r in records if pool is None or r.pool == pool]

    async def daemon(self) -> dict[str, Any] | None:
        raw = await self._redis.get(self._keys.daemon)
        return json.loads(raw) if raw else None

    async def status(self) -> dict[str, Any]:
        daemon = await self.daemon()
        active = await self.specs.active()
        stored = await self.specs.raw()
        return {
            "daemon": {"alive": daemon is not None, **(daemon or {})},
            "revision_in_force": active.revision if active else None,
            "revision_stored": stored_revision(stored) or None,
            "pools": await self.pools(),
        }
