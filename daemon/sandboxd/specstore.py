"""Reading and writing the desired state in Redis (`<prefix>:spec` and its history)."""

import json
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import WatchError

from sandboxd.events import now_rfc3339
from sandboxd.keys import SPEC_HISTORY_LEN, Keys
from sandboxd.spec import Spec, SpecDocument, SpecError, parse_document


@dataclass(frozen=True)
class Applied:
    document: SpecDocument
    previous: SpecDocument | None


class SpecStore:
    def __init__(self, redis: Redis, keys: Keys):
        self._redis = redis
        self._keys = keys

    async def apply(self, spec: Spec) -> Applied:
        """Write `spec` as the next revision, keep it in the history, wake the daemon.

        Optimistic (WATCH) so two concurrent applies never get the same revision.
        """
        while True:
            async with self._redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(self._keys.spec)
                    raw = await pipe.get(self._keys.spec)
                    previous = _lenient(raw)
                    revision = stored_revision(raw) + 1
                    doc = SpecDocument(
                        revision=revision, applied_at=now_rfc3339(), pools=list(spec.pools)
                    )
                    body = doc.model_dump_json()
                    pipe.multi()
                    pipe.set(self._keys.spec, body)
                    pipe.lpush(self._keys.spec_history, body)
                    pipe.ltrim(self._keys.spec_history, 0, SPEC_HISTORY_LEN - 1)
                    pipe.publish(self._keys.nudge, f"spec:{revision}")
                    await pipe.execute()
                    return Applied(document=doc, previous=previous)
                except WatchError:
                    continue

    async def raw(self) -> str | None:
        return await self._redis.get(self._keys.spec)

    async def active(self) -> SpecDocument | None:
        """The spec the daemon has in force, if any."""
        return _lenient(await self._redis.get(self._keys.spec_active))

    async def set_active(self, doc: SpecDocument) -> None:
        await self._redis.set(self._keys.spec_active, doc.model_dump_json())

    async def history_head(self) -> SpecDocument | None:
        """The newest valid accepted revision."""
        return _lenient(await self._redis.lindex(self._keys.spec_history, 0))

    async def history(self) -> list[SpecDocument]:
        """Valid accepted revisions, newest first."""
        raws = await self._redis.lrange(self._keys.spec_history, 0, -1)
        return [doc for doc in map(_lenient, raws) if doc is not None]


def _lenient(raw: str | bytes | None) -> SpecDocument | None:
    if raw is None:
        return None
    try:
        return parse_document(raw)
    except SpecError:
        return None


def stored_revision(raw: str | bytes | None) -> int:
    """The stored revision even when the rest is invalid, so revisions never repeat."""
    if raw is None:
        return 0
    try:
        revision = json.loads(raw).get("revision", 0)
    except (ValueError, AttributeError):
        return 0
    return revision if isinstance(revision, int) and revision > 0 else 0
