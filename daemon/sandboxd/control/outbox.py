"""What the node changed while Redis could not be reached, written to Redis when it answers.

The daemon's local actions never wait for Redis: a stop terminates the node's sandboxes from
its local registry, and the sandboxes that die during an outage are stopped and freed from
it (see daemon.py and reconciler.py). What Redis should say about them (the record closed,
a `sandbox.terminated` event, `daemon.stopping`) is kept here meanwhile, in order, in the
root-only state directory (`outbox.json`, so it outlives the daemon: a stop during an outage
is written by the next start), and written when Redis answers again:

- in the order it happened, one entry at a time, each entry removed once written;
- each exactly once: an entry's event id is marked in Redis in the same script that writes
  it (`SandboxStore.write_late`), so an entry written just before a crash, and still in the
  file, is skipped when it is replayed;
- flagged: the event's `data.late` is true, its `time` says when it happened.

The file is the daemon's own; what is read back is validated all the same (an entry that
does not parse is dropped with a warning). Entries only close records of sandboxes this
daemon stopped itself and append events: nothing in them makes the daemon touch a process.
"""

import asyncio
import logging
import re
from typing import Any

from pydantic import ValidationError

from sandboxd.control.localstate import LocalState
from sandboxd.store.events import Event, EventPublisher
from sandboxd.store.records import SandboxStore

log = logging.getLogger(__name__)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
MAX_ENTRIES = 100_000  # a registry holds far fewer sandboxes; a file past this is not ours


class Outbox:
    def __init__(self, journal: LocalState, store: SandboxStore, events: EventPublisher):
        self._journal = journal
        self._store = store
        self._events = events
        self._lock = asyncio.Lock()  # one writer of the file, one flush at a time
        self._entries: list[dict[str, Any]] = _valid(journal.load_outbox())

    @property
    def pending(self) -> int:
        return len(self._entries)

    def late(
        self, type: str, *, pool: str = "", sandbox: str = "", close: bool = False, **data: Any
    ) -> dict[str, Any]:
        """An entry for `keep`: an event flagged `late` (and, with `close`, the closing of
        `sandbox`'s record)."""
        event = self._events.build(type, pool=pool, sandbox=sandbox, late=True, **data)
        return {"event": event.to_fields(), "close": sandbox if close else "", "pool": pool}

    async def keep(self, entries: list[dict[str, Any]]) -> None:
        """Keep `entries` (made by `late`) for Redis, in this order after those kept
        before; they are on disk when this returns (one write for all of them)."""
        if entries:
            async with self._lock:
                self._entries.extend(entries)
                await self._save()

    async def add(
        self, type: str, *, pool: str = "", sandbox: str = "", close: bool = False, **data: Any
    ) -> None:
        """Keep one entry (see `late`)."""
        await self.keep([self.late(type, pool=pool, sandbox=sandbox, close=close, **data)])

    async def flush(self) -> list[Event]:
        """Write what is kept, in order; returns the events written now. A Redis error stops
        the flush where it is (the rest waits for the next one)."""
        if not self._entries:
            return []
        written: list[Event] = []
        async with self._lock:
            try:
                while self._entries:
                    entry = self._entries[0]
                    event = Event.from_fields(entry["event"])
                    if await self._store.write_late(
                        event, close=entry["close"], pool=entry["pool"], maxlen=self._events.maxlen
                    ):
                        written.append(event)
                    self._entries.pop(0)
            finally:
                if written or not self._entries:
                    await self._save()
        if written:
            log.warning(
                "wrote what changed while Redis could not be reached",
                extra={"events": len(written), "types": sorted({e.type for e in written})},
            )
        return written

    async def _save(self) -> None:
        entries = list(self._entries)
        try:
            await asyncio.to_thread(self._journal.save_outbox, entries)
        except OSError as exc:  # kept in memory: written to Redis by this process still
            log.error("the outbox could not be saved: %s", exc)


def _valid(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries of the file that parse; the others are dropped (and said so)."""
    good = []
    for entry in entries[:MAX_ENTRIES]:
        try:
            fields = entry["event"]
            close, pool = entry["close"], entry["pool"]
            if not (isinstance(fields, dict) and isinstance(close, str) and isinstance(pool, str)):
                raise TypeError("wrong types")
            if (close and not NAME.match(close)) or (pool and not NAME.match(pool)):
                raise ValueError("not a sandbox or pool name")
            event = Event.from_fields({str(k): str(v) for k, v in fields.items()})
        except (KeyError, TypeError, ValueError, ValidationError) as exc:
            log.warning("dropping an outbox entry that does not parse: %s", exc)
            continue
        good.append({"event": event.to_fields(), "close": close, "pool": pool})
    return good
