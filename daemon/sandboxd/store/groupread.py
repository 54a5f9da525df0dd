"""Reading the event stream through a consumer group, shared by the client's
`Client.events` and the daemon's webhooks: which entries come next (this consumer's own
pending ones after a start or a reconnect, entries idle at other consumers, new ones),
acknowledgements, and backoff while Redis is away."""

import asyncio
import fnmatch
import logging
import random
from collections.abc import Iterable

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sandboxd.store.events import Event
from sandboxd.store.loops import cancelling

log = logging.getLogger(__name__)
BACKOFF_MAX_S = 5.0
ACK_ATTEMPTS = 5
TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)
Entry = tuple[str, dict[str, str] | None]  # a deleted entry's fields are None


class Filter:
    """Event types (shell patterns: `sandbox.*`) and pools to hand over; empty: all."""

    def __init__(self, types: Iterable[str] | None = None, pools: Iterable[str] | None = None):
        self.types = tuple(types or ())
        self.pools = frozenset(pools or ())

    def __call__(self, event: Event) -> bool:
        if self.pools and event.pool not in self.pools:
            return False
        return not self.types or any(fnmatch.fnmatchcase(event.type, t) for t in self.types)


class GroupReader:
    """Where the next batch comes from: this consumer's own pending entries (after a start or
    a reconnect), entries idle at other consumers (every claim_idle/2), or new ones."""

    def __init__(
        self,
        redis: Redis,
        stream: str,
        group: str,
        consumer: str,
        count: int,
        block_ms: int,
        claim_idle_ms: int,
    ):
        self._redis = redis
        self._stream, self._group, self._consumer = stream, group, consumer
        self.count, self._block_ms, self._claim_idle_ms = count, block_ms, claim_idle_ms
        self._delay = 0.0
        self.restart()

    def restart(self) -> None:
        self._own: str | None = "0"  # re-read our pending entries from here; None: done
        self._claim_cursor = "0-0"
        self._next_claim = 0.0  # loop time of the next XAUTOCLAIM sweep

    async def next_batch(self) -> list[Entry]:
        loop = asyncio.get_running_loop()
        if self._own is not None:
            batch = await self._read(self._own, block=None)
            self._delay = 0.0
            if batch:
                self._own = batch[-1][0]
                return batch
            self._own = None
        if loop.time() >= self._next_claim:
            reply = await self._redis.xautoclaim(
                self._stream,
                self._group,
                self._consumer,
                self._claim_idle_ms,
                start_id=self._claim_cursor,
                count=self.count,
            )
            self._claim_cursor = str(reply[0])
            if self._claim_cursor == "0-0":  # a full sweep done: the next one in a while
                self._next_claim = loop.time() + self._claim_idle_ms / 2000
            claimed = [(i, f) for i, f in reply[1] if i]
            if claimed:
                log.info(
                    "took over %d pending entries from idle consumers",
                    len(claimed),
                    extra={"group": self._group, "consumer": self._consumer},
                )
                return claimed
        block = min(self._block_ms, max(1, int((self._next_claim - loop.time()) * 1000)))
        return await self._read(">", block=block)

    async def _read(self, cursor: str, block: int | None) -> list[Entry]:
        reply = await self._redis.xreadgroup(
            self._group, self._consumer, {self._stream: cursor}, count=self.count, block=block
        )
        if cancelling():  # a cancel the Redis client swallowed while it blocked
            raise asyncio.CancelledError
        return [(i, f) for _, entries in reply or [] for i, f in entries]

    async def ack(self, ids: list[str]) -> None:
        """Acknowledge; a connection lost meanwhile is retried a few times, after which the
        entries stay pending and are delivered again (at least once)."""
        for attempt in range(ACK_ATTEMPTS):
            try:
                await self._redis.xack(self._stream, self._group, *ids)
                return
            except TRANSIENT as exc:
                if attempt == ACK_ATTEMPTS - 1:
                    log.warning("acknowledgement lost (delivered again later): %s", exc)
                    self.restart()
                    return
                await self.backoff(exc)

    async def backoff(self, exc: BaseException) -> None:
        if self._delay == 0.0:
            log.warning("event stream unreachable, retrying: %s", exc)
        self._delay = min(BACKOFF_MAX_S, max(0.1, self._delay * 2))
        await asyncio.sleep(self._delay * random.uniform(0.5, 1.0))
        self.restart()  # what we had read but not acknowledged is ours to read again
