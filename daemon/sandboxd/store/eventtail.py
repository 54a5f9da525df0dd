"""Reading the event stream in order, from a cursor: what the metrics counters and the MQTT
bridge consume (the stream is the source of truth, claims by clients included)."""

import asyncio
import logging
from collections.abc import Callable

from redis.asyncio import Redis

from sandboxd.store.events import Event
from sandboxd.store.loops import forever

log = logging.getLogger(__name__)
BATCH = 500
BLOCK_MS = 1000
# After a read that found events (fewer than a batch), the next waits this long: under a
# storm of claims (thousands of events a second) the tail reads them in batches, a few
# reads a second, instead of waking (and waking Redis to serve its blocked read) for every
# event; the first event after a quiet spell is still read at once, and a full batch is
# followed at once (a tail behind by more than a batch catches up at full speed).
PACE_S = 0.05


async def stream_end(redis: Redis, stream: str) -> str:
    """The id of the newest entry ("0-0" for an empty stream): read after it for new ones."""
    newest = await redis.xrevrange(stream, count=1)
    return newest[0][0] if newest else "0-0"


async def read_after(
    redis: Redis, stream: str, cursor: str, *, count: int = BATCH, block_ms: int | None = None
) -> list[tuple[str, Event | None]]:
    """Up to `count` entries after `cursor`, oldest first (waiting up to `block_ms` for one).
    Anyone who may write Redis can append to the stream: an entry that is not an event is
    returned as None (logged), so that readers skip it and still move their cursor past."""
    reply = await redis.xread({stream: cursor}, count=count, block=block_ms)
    return [
        (entry_id, parse_entry(entry_id, fields))
        for _, entries in reply
        for entry_id, fields in entries
    ]


def parse_entry(entry_id: str, fields: dict[str, str]) -> Event | None:
    """The event a stream entry holds; None (logged) for an entry that is not one."""
    try:
        if not isinstance(fields, dict):
            raise TypeError("not a field map")
        return Event.from_fields(fields, str(entry_id))
    except (ValueError, TypeError, RecursionError) as exc:  # pydantic and JSON errors
        log.warning(
            "skipping a stream entry that is not an event",
            extra={"entry": str(entry_id)[:40], "error": str(exc)[:200]},
        )
        return None


class EventTail:
    """Hands every event appended after the daemon started to `sink`, in stream order;
    with `wanted`, only while it is set (from the stream's end each time it is set again):
    the stream is not read for a sink nobody reads (the metrics without their endpoint)."""

    def __init__(
        self,
        redis: Redis,
        stream: str,
        sink: Callable[[Event], None],
        pace_s: float = PACE_S,
        wanted: asyncio.Event | None = None,
    ):
        self._redis = redis
        self._stream = stream
        self._sink = sink
        self._pace_s = pace_s
        self._wanted = wanted
        self._cursor: str | None = None

    async def run(self) -> None:
        await forever(self._step, "event stream not read")

    async def _step(self) -> None:
        if self._wanted is not None and not self._wanted.is_set():
            self._cursor = None  # what is appended meanwhile is for no one
            await self._wanted.wait()
        if self._cursor is None:
            self._cursor = await stream_end(self._redis, self._stream)
        entries = await read_after(self._redis, self._stream, self._cursor, block_ms=BLOCK_MS)
        for entry_id, event in entries:
            self._cursor = entry_id
            if event is not None:
                self._sink(event)
        if not entries and _id(await stream_end(self._redis, self._stream)) < _id(self._cursor):
            self._cursor = "0-0"  # the stream was deleted and started anew: read it all
        if 0 < len(entries) < BATCH and self._pace_s > 0:  # a full batch: more at once
            await asyncio.sleep(self._pace_s)


def _id(entry_id: str) -> tuple[int, int]:
    """A stream id as a comparable pair ((0, 0) for one that does not parse)."""
    try:
        ms, _, seq = str(entry_id).partition("-")
        return int(ms), int(seq or 0)
    except ValueError:
        return 0, 0
