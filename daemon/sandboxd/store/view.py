"""The daemon's records kept in memory between passes, so that a pass reads what changed,
not every record.

Every change to a record that others make (a claim, a release, a renewal, an expired
lease, a forced release) and most the daemon makes appends an event naming the sandbox to
the event stream in the same Lua step. A pass reads the stream from where the view is
current and reads again only the records those events name (and those the daemon says it
touched). Anything else — a record edited by hand, a change whose event was trimmed away
before it was read, Redis restarted or reconnected — is caught by a full read: on a slow
timer (at most `budget` of the time spent in full reads, but at least every `resync_max_s`
and at most every `resync_min_s`),
after any Redis error, and whenever fewer entries follow the view's cursor than the stream
was given since (`entries-added` of XINFO STREAM: a trim past an unread change, a deleted
or recreated stream). The stream is
untrusted input like every key: an entry only makes the view read an id again.
"""

import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from sandboxd.store.records import SandboxRecord, SandboxStore, Scan

_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
BATCH = 1000  # stream entries per XREAD
MAX_ENTRIES = 20_000  # more changes than this since the last pass: a full read is cheaper


def _stream_id(value: Any) -> tuple[int, int] | None:
    """`ms-seq` as numbers (None when it is not one)."""
    try:
        ms, _, seq = str(value).partition("-")
        return int(ms), int(seq or 0)
    except ValueError:
        return None


class RecordView:
    def __init__(
        self,
        store: SandboxStore,
        *,
        resync_max_s: Callable[[], float],
        budget: float = 0.001,
        resync_min_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._store = store
        self._redis: Redis = store.redis
        self._stream = store.keys.events
        self._resync_max_s = resync_max_s
        self._budget = budget
        self._resync_min_s = resync_min_s
        self._clock = clock
        self.records: dict[str, SandboxRecord] = {}
        self._cursor: str | None = None  # None: the next read is a full one
        self._touched: set[str] = set()
        self._added = 0  # the stream's entries-added at the cursor
        self._full_due = 0.0
        self.full_reads = 0
        self.partial_reads = 0
        self.version = 0  # goes up whenever `records` may have changed
        # Per pool, its records by state, kept with `records` (what a pass that looks at
        # counts alone needs: work per change, not per record).
        self.counts: dict[str, Counter[str]] = {}
        # The ids the last refresh read again; None after a full read (anything may have
        # changed, records gone included).
        self.changed: set[str] | None = None

    @property
    def changes(self) -> tuple[dict[str, SandboxRecord], set[str]] | None:
        """(every record by id, the ids the last refresh read again); None after a full
        read. What `Restorer.remember` looks at instead of every record."""
        return None if self.changed is None else (self.records, self.changed)

    def invalidate(self) -> None:
        """Read everything at the next refresh (a reconnect, a restore, a new owner rule)."""
        self._cursor = None

    def touch(self, *ids: str) -> None:
        """The daemon changed these records itself: read them again at the next refresh."""
        self._touched.update(ids)

    async def refresh(self) -> Scan:
        """Every usable record this daemon manages (from memory, updated), and the damaged
        ones met in this read (`corrupt`: to quarantine)."""
        if self._cursor is None or self._clock() >= self._full_due:
            return await self.full()
        changed = await self._changed_ids(self._cursor)
        if changed is None:
            return await self.full()
        cursor, ids, added = changed
        ids |= self._touched
        self._touched = set()
        try:
            partial = await self._store.read(sorted(ids))
        except BaseException:
            self.invalidate()
            raise
        self._cursor, self._added = cursor, added
        for sandbox_id in ids:
            gone = self.records.pop(sandbox_id, None)
            if gone is not None:
                self.counts[gone.pool][gone.state] -= 1
        for record in partial.records:
            self.records[record.id] = record
            self.counts.setdefault(record.pool, Counter())[record.state] += 1
        self.partial_reads += 1
        self.version += bool(ids)
        self.changed = ids
        return Scan(records=list(self.records.values()), corrupt=partial.corrupt)

    async def full(self) -> Scan:
        """Read every record; the view is current to the stream as it was before."""
        self._cursor = None
        self._touched = set()
        mark = await self._mark()
        began = self._clock()
        scan = await self._store.scan()
        took = self._clock() - began
        self.records = {r.id: r for r in scan.records}
        self.counts = {}
        for (pool, state), n in Counter((r.pool, r.state) for r in scan.records).items():
            self.counts.setdefault(pool, Counter())[state] = n
        self.version += 1
        self.changed = None
        self._cursor, self._added = mark
        every = max(self._resync_min_s, took / self._budget)
        self._full_due = self._clock() + min(self._resync_max_s(), every)
        self.full_reads += 1
        return scan

    async def _mark(self) -> tuple[str, int]:
        """The stream's last id and how many entries it was ever given (XINFO STREAM):
        ("0-0", 0) when there is no stream."""
        try:
            info = await self._redis.xinfo_stream(self._stream)
        except ResponseError:  # no such key (a stream of another type: the healer's)
            return "0-0", 0
        last = info.get("last-generated-id")
        added = info.get("entries-added")
        if _stream_id(last) is None or not isinstance(added, int):
            return "", -1  # not a Redis 7 stream answer: every read is a full one
        return str(last), added

    async def _changed_ids(self, cursor: str) -> tuple[str, set[str], int] | None:
        """(new cursor, ids named by the entries after `cursor`, entries-added), or None
        when changes may have been lost: fewer entries to read than were added since
        (trimmed or deleted unread, the stream deleted or made anew), or too many to be
        worth reading."""
        last, added = await self._mark()
        mine, end = _stream_id(cursor), _stream_id(last)
        new = added - self._added
        if mine is None or end is None or added < 0 or end < mine or new < 0 or new > MAX_ENTRIES:
            return None
        ids: set[str] = set()
        seen = 0
        while seen < new:
            reply = await self._redis.xread({self._stream: cursor}, count=BATCH)
            entries = [entry for _, batch in reply for entry in batch]
            for entry_id, fields in entries:
                entry = _stream_id(entry_id)
                if entry is None or entry > end:  # added after the mark: the next pass's
                    return (last, ids, added) if seen == new else None
                cursor = str(entry_id)
                seen += 1
                sandbox = fields.get("sandbox") if isinstance(fields, dict) else None
                if isinstance(sandbox, str) and _ID.match(sandbox):
                    ids.add(sandbox)
            if len(entries) < BATCH:
                break
        return (last, ids, added) if seen == new else None
