"""Reading the event stream through a consumer group: at least once, across crashes.

    async for event in client.events("billing", "billing-1", types=["sandbox.*"]):
        await bill(event)          # acknowledged once this returns; dedupe by event.id

An entry is acknowledged (`XACK`) only after the caller's code for it returned: the ones
handled are acknowledged together before the next read (or when the iterator is closed),
so a consumer killed meanwhile has them delivered again (at least once; dedupe by
`event.id`); an exception or a `break` leaves the event being handled pending. Close the
iterator (`contextlib.aclosing`) when leaving the loop early, so the acknowledgements of
what was handled are sent at once. Pending
entries of a consumer that went away (killed, hung) are taken over by the others with
`XAUTOCLAIM` once idle for `claim_idle_s`; a consumer that starts again first reads its own
pending entries (`XREADGROUP ... 0`); a lost connection is retried with jittered backoff
and resumes the same way. Entries that are not events (anyone may `XADD`) and events the
filters leave out are acknowledged without being handed over.
"""

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from sandboxd.store.consumers import check_consumer, check_group, ensure_group
from sandboxd.store.events import Event
from sandboxd.store.eventtail import parse_entry
from sandboxd.store.groupread import TRANSIENT, Filter, GroupReader
from sandboxd.store.keys import Keys

log = logging.getLogger(__name__)
BACKOFF_MAX_S = 5.0


async def read_group(
    redis: Redis,
    keys: Keys,
    group: str,
    consumer: str,
    *,
    types: Iterable[str] | None = None,
    pools: Iterable[str] | None = None,
    count: int = 100,
    block_ms: int = 1000,
    claim_idle_s: float = 30.0,
    start: str = "$",
    create: bool = True,
    limit: int | None = None,
) -> AsyncGenerator[Event, None]:
    """The iterator behind `Client.events` (see the module's docstring); it ends after
    `limit` events handed over and acknowledged, if given."""
    check_group(group)
    check_consumer(consumer)
    stream, wanted = keys.events, Filter(types, pools)
    count, block_ms = max(1, min(int(count), 10_000)), max(1, int(block_ms))
    claim_idle_ms = max(1, int(claim_idle_s * 1000))
    reader = GroupReader(redis, stream, group, consumer, count, block_ms, claim_idle_ms)
    if create:
        await _retrying(lambda: ensure_group(redis, stream, group, start))
    handed = 0
    done: list[str] = []  # handled (the caller's code returned) or skipped: to acknowledge
    try:
        while limit is None or handed < limit:
            if done:  # acknowledged in one XACK before reading on
                await reader.ack(done)
                done = []
            if limit is not None:  # read no more than will be handed over
                reader.count = max(1, min(count, limit - handed))
            try:
                batch = await reader.next_batch()
            except ResponseError as exc:
                if "NOGROUP" not in str(exc) or not create:
                    raise
                # The group (or the whole stream: FLUSHDB) is gone: begin again with what
                # the stream holds now.
                log.warning("consumer group %s is gone from %s: created again", group, stream)
                await ensure_group(redis, stream, group, "0")
                reader.restart()
                continue
            except TRANSIENT as exc:
                await reader.backoff(exc)
                continue
            for entry_id, fields in batch:
                event = parse_entry(entry_id, fields) if fields else None
                if event is None or not wanted(event):
                    done.append(entry_id)
                    continue
                if limit is not None and handed >= limit:
                    break  # not handed over: left pending, read again by this consumer
                yield event
                done.append(entry_id)
                handed += 1
    finally:
        # Left by `break`, `aclose` or an exception of the caller: what was handled is
        # acknowledged; the event being handled is not (it stays pending).
        if done:
            with contextlib.suppress(*TRANSIENT):
                await reader.ack(done)


async def _retrying(make: Callable[[], Awaitable[object]]) -> None:
    delay = 0.1
    while True:
        try:
            await make()
            return
        except TRANSIENT as exc:
            log.warning("event stream unreachable, retrying: %s", exc)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(BACKOFF_MAX_S, delay * 2)
