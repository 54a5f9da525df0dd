"""Reading and writing the desired state in Redis (`<prefix>:spec` and its history)."""

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError, WatchError

from sandboxd import decode
from sandboxd.spec import Spec, SpecDocument, SpecError, parse_document
from sandboxd.store.events import now_rfc3339
from sandboxd.store.keys import SPEC_HISTORY_LEN, Keys


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

        Optimistic (WATCH) so two concurrent applies never get the same revision, and
        past every revision seen (stored, in force, in the history): revisions only move
        forward, even after the stored spec was deleted or overwritten with garbage.
        """
        while True:
            async with self._redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(self._keys.spec)
                    raw = await _get_text(pipe, self._keys.spec)
                    previous = _lenient(raw)
                    active = await _get_text(pipe, self._keys.spec_active)
                    newest = await _get_text(pipe, self._keys.spec_history, head=True)
                    revision = max(map(stored_revision, (raw, active, newest))) + 1
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

    @property
    def key(self) -> str:
        return self._keys.spec

    async def raw_type(self) -> str:
        """The Redis type of `<prefix>:spec` (a string, unless someone wrote another)."""
        return await self._redis.type(self._keys.spec)

    async def active(self) -> SpecDocument | None:
        """The spec the daemon has in force, if any."""
        return _lenient(await self._redis.get(self._keys.spec_active))

    async def has_active(self) -> bool:
        return bool(await self._redis.exists(self._keys.spec_active))

    async def set_active(self, doc: SpecDocument) -> None:
        await self._redis.set(self._keys.spec_active, doc.model_dump_json())

    async def history_head(self) -> SpecDocument | None:
        """The newest valid accepted revision."""
        return _lenient(await self._redis.lindex(self._keys.spec_history, 0))

    async def history(self) -> list[SpecDocument]:
        """Valid accepted revisions, newest first."""
        raws = await self._redis.lrange(self._keys.spec_history, 0, -1)
        return [doc for doc in map(_lenient, raws) if doc is not None]


async def _get_text(pipe: Any, key: str, *, head: bool = False) -> str | None:
    """GET (or LINDEX 0), None where the key holds another type: apply overwrites it."""
    try:
        return await (pipe.lindex(key, 0) if head else pipe.get(key))
    except ResponseError as exc:
        if "WRONGTYPE" in str(exc):
            return None
        raise


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
        data = decode.json_value(raw, max_chars=decode.MAX_SPEC_CHARS)
    except decode.BadValue:
        return 0
    revision = data.get("revision", 0) if isinstance(data, dict) else 0
    return revision if isinstance(revision, int) and revision > 0 else 0
