"""Redis losing its data loses nothing that runs: the journal, and writing it back.

The daemon remembers the spec in force and its records (claims included) in memory, from
every reconcile pass (the records as Redis holds them; events are not trusted: any client
may append one), and in its root-only state directory (`localstate.LocalState`) whenever
they change. A marker key (`<prefix>:daemon:marker`, no expiry) tells whether Redis still
holds what the daemon wrote: when it is gone (FLUSHDB, a restart without persistence, a
failover to an empty replica), the spec and every record whose sandbox the provider still
runs are written back, with their ready list, member set and lease entries, before anything
else acts: nothing is drained, reaped or recreated. `state.restored` says what came back.

A claim made after the last pass before the loss comes back as that pass saw it. A record
missing while the marker is still there (a DEL, a restore of an old dump) is put back when
the janitor finds its sandbox without one, instead of reaping it.
"""

import asyncio
import json
import logging
import time
from collections.abc import Collection, Mapping
from typing import Any

from redis.asyncio import Redis

from sandboxd.control.localstate import LocalState, fields_json
from sandboxd.providers import Provider, list_all
from sandboxd.spec import SpecDocument
from sandboxd.store.events import EventPublisher
from sandboxd.store.keys import Keys
from sandboxd.store.records import SandboxRecord

log = logging.getLogger(__name__)

# KEYS: record, id set, pool members, ready list, leases. ARGV: id, state, lease deadline ms,
# then field/value pairs. Writes the record back only if Redis has no record of that id (a
# record written meanwhile, by a client or the daemon, is newer than the journal).
_PUT_BACK = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
if ARGV[2] == 'ready' then
  redis.call('LREM', KEYS[4], 0, ARGV[1])
  redis.call('RPUSH', KEYS[4], ARGV[1])
elseif ARGV[2] == 'claimed' then
  redis.call('ZADD', KEYS[5], ARGV[3], ARGV[1])
end
return 1
"""


# A change is written at once, unless the last write took SAVE_SLOW_S or more: then the
# next one (a tick's too) waits SAVE_GAP times as long (a journal of thousands of records:
# at most 2% of the time goes to writing it).
SAVE_SLOW_S = 0.01
SAVE_GAP = 50
# Other changes (health, a probe's time, an agent's news) are written at most this often: at
# 10,000 sandboxes some of them change every minute, and a restore that puts back an older
# health is probed again anyway.
TICK_SAVE_S = 300.0


def _shape(record: SandboxRecord) -> tuple[str, str, int]:
    """What of a record is written to the journal at once when it changes."""
    return record.state, record.claim_id, record.lease_expires_ms


class Restorer:
    def __init__(
        self,
        *,
        redis: Redis,
        keys: Keys,
        journal: LocalState,
        events: EventPublisher,
        providers: dict[str, Provider],
        instance: str,
    ):
        self._redis = redis
        self._keys = keys
        self._journal = journal
        self._events = events
        self._providers = providers
        self._instance = instance
        self._put_back = redis.register_script(_PUT_BACK)
        # Each record as the JSON of its hash's fields (what the journal file is made of):
        # one str per record rather than a dict of 28 (10,000 records: 7 MB, not 12). None
        # until needed (a save, a put back) for a record that changed: a record claimed,
        # released and reset between two saves is serialized once, not three times.
        self._records: dict[str, str | None] = {
            sandbox_id: fields_json(fields) for sandbox_id, fields in journal.load_records().items()
        }
        self._parsed: dict[str, dict[str, str]] | None = None  # `known()`, while unchanged
        loaded = journal.load_spec()
        self._spec: tuple[int, str] | None = loaded
        self.restored = 0  # restores done, for tests and status
        self._lock = asyncio.Lock()
        self._reshaped = False  # a sandbox came, went, or changed state, claim or lease
        self._saved_at = -TICK_SAVE_S  # monotonic
        # Each record's hash, kept while the pass hands over the very same record object
        # (the reconciler's view keeps unchanged records): not serialized again each pass.
        self._hashes: dict[str, tuple[SandboxRecord, str | None]] = {}
        # Records `learn` was told of, and when (monotonic): newer than a pass's read.
        self._learned: dict[str, tuple[SandboxRecord, float]] = {}
        self._unsaved = True  # the journal file may differ from what is remembered
        self._whole = True  # the next `remember` looks at every record (not only `changed`)
        self._next_save = 0.0

    @property
    def marker(self) -> str:
        return f"{self._keys.prefix}:daemon:marker"

    # -- remembering -----------------------------------------------------------------------

    async def remember(
        self,
        records: list[SandboxRecord],
        doc: SpecDocument | None,
        *,
        save: bool,
        since: int | None = None,
        read_at: float | None = None,
        now: bool = False,
        changed: tuple[Mapping[str, SandboxRecord], Collection[str]] | None = None,
    ) -> None:
        """The spec in force and the records of a pass: what Redis holds now (this daemon's,
        all of them) — unless Redis lost its data since the pass began (the marker is gone
        again): then the journal is kept for the next check to put back. It is written to
        the state directory when a sandbox came, went, or changed state, claim or lease;
        `save` (a tick): other changes too, at most every TICK_SAVE_S; `now` (a stop):
        whatever changed, at once. `changed`: (every record by id, the ids read again since
        the last call): only those are looked at (the records of a pass under claims)."""
        if not await self._redis.exists(self.marker):
            self._whole = True  # what changed meanwhile is not remembered: all, next time
            return
        if since is not None and since != self.restored:
            self._whole = True
            return  # a restore ran while these records were read: they may predate it
        new_spec = False
        if (
            doc is not None
            and doc.revision > 0
            and (self._spec is None or self._spec[0] != doc.revision)
        ):  # serialized once per revision: a spec of 20,000 pools is megabytes
            self._spec = (doc.revision, doc.model_dump_json())
            new_spec = True
        if changed is not None and not self._whole:  # in place: only what was read again
            hashes, records_json = self._hashes, self._records
            any_change = reshaped = False
            for sandbox_id in changed[1]:
                r = changed[0].get(sandbox_id)
                known = hashes.get(sandbox_id)
                if r is None:
                    if known is not None:
                        del hashes[sandbox_id]
                        records_json.pop(sandbox_id, None)
                        any_change = reshaped = True
                elif known is None or known[0] is not r:
                    reshaped = reshaped or known is None or _shape(known[0]) != _shape(r)
                    hashes[sandbox_id] = (r, None)
                    records_json[sandbox_id] = None
                    any_change = True
        else:
            hashes, records_json = {}, {}
            # came or went; or the journal read at start still holds what no pass saw
            stale = len(self._records) != len(self._hashes)
            any_change = reshaped = stale or len(records) != len(self._hashes)
            for r in records:
                known = self._hashes.get(r.id)
                if known is None or known[0] is not r:
                    reshaped = reshaped or known is None or _shape(known[0]) != _shape(r)
                    known, any_change = (r, None), True
                hashes[r.id] = known
            if any_change:  # else the very same records as before: nothing to rebuild
                records_json = {sandbox_id: text for sandbox_id, (_, text) in hashes.items()}
            else:
                hashes, records_json = self._hashes, self._records
            self._whole = False
        if read_at is not None:  # `records` were read at `read_at` (monotonic)
            for sandbox_id, (learned, at) in list(self._learned.items()):
                if at <= read_at:
                    del self._learned[sandbox_id]  # the read saw it: it is in `records`
                else:  # made ready after the read began: what the read saw may be older
                    seen = hashes.get(sandbox_id)
                    if seen is not None and seen[0].state != "creating":
                        continue  # read after it was made ready (claimed since, say): newer
                    if seen is None or seen[0] is not learned:
                        hashes[sandbox_id] = (learned, None)
                        records_json[sandbox_id] = None
                        any_change = reshaped = True
        if any_change:
            self._hashes, self._records, self._parsed = hashes, records_json, None
        self._unsaved |= any_change
        self._reshaped |= reshaped
        if not (self._unsaved or new_spec):
            return  # the file holds exactly this already
        # A change of state, claim or lease is written at once, unless writing takes long
        # (many records): then at most 2% of the time goes to it (what Redis would need put
        # back is in memory meanwhile; the file is for a restart of the daemon too). Other
        # changes (health, a probe's time) are written by a tick, at most every
        # TICK_SAVE_S: a restore that puts back an older health is probed again anyway.
        began = time.monotonic()
        if new_spec or now:
            due = True
        elif self._reshaped:
            due = began >= self._next_save
        else:
            due = save and began >= max(self._next_save, self._saved_at + TICK_SAVE_S)
        if not due:
            return
        self._reshaped = False
        await self.save()
        took = time.monotonic() - began
        self._saved_at = began
        self._next_save = 0.0 if took < SAVE_SLOW_S else time.monotonic() + took * SAVE_GAP

    def learn(self, record: SandboxRecord) -> None:
        """A record this daemon just wrote (a sandbox it made ready): known before the next
        pass reads it, so Redis losing its data in between does not lose the sandbox (its
        claim, if one came meanwhile, is the next pass's news, as any claim's)."""
        self._hashes[record.id] = (record, None)
        self._records[record.id] = None
        self._parsed = None
        self._learned[record.id] = (record, time.monotonic())
        self._unsaved = True

    def known(self) -> dict[str, dict[str, str]]:
        """The records of the last pass (or of the journal at start), by id, as the fields
        of their hashes (parsed once while they stay the same: a pass during an outage
        asks each time)."""
        if self._parsed is None:
            self._parsed = {
                sandbox_id: json.loads(text) for sandbox_id, text in self._texts().items()
            }
        return dict(self._parsed)

    def forget(self, sandbox_id: str) -> None:
        """A sandbox this daemon stopped while Redis could not be reached: nothing to put
        back, nothing to reap twice."""
        self._records.pop(sandbox_id, None)
        self._parsed = None
        self._hashes.pop(sandbox_id, None)
        self._learned.pop(sandbox_id, None)
        self._unsaved = True

    async def put_back(self, sandbox_id: str) -> bool:
        """Write back one record the journal has and Redis lost (a DEL, a partial loss that
        left the marker), if its sandbox still runs. True if it did: not a leak then."""
        if sandbox_id not in self._records:
            return False
        text = self._texts()[sandbox_id]
        fields = json.loads(text)
        restored, claimed, ready = await self._put_back_records({sandbox_id: fields})
        if restored:
            await self._events.publish(
                "state.restored", spec_revision=0, records=1, claimed=claimed, ready=ready
            )
        return bool(restored)

    async def save(self) -> None:
        """Write the journal to the state directory (only what changed since the last write)."""
        spec, records = self._spec, dict(self._texts())
        try:
            await asyncio.to_thread(self._save, spec, records)
        except OSError as exc:
            log.warning("local state not saved: %s", exc)
            return
        self._unsaved = False

    def _save(self, spec: tuple[int, str] | None, records: dict[str, str]) -> None:
        if spec is not None:
            self._journal.save_spec(*spec)
        self._journal.save_records(records)

    def _texts(self) -> dict[str, str]:
        """Every record's JSON, the ones not serialized since they changed made now."""
        for sandbox_id, text in self._records.items():
            if text is None:
                record = self._hashes[sandbox_id][0]
                text = self._records[sandbox_id] = fields_json(record.to_hash())
                self._hashes[sandbox_id] = (record, text)
        return self._records  # type: ignore[return-value]  # every value is a str now

    def expects_records(self) -> bool:
        """Does the journal know of records (so an absent id set means it was lost)?"""
        return bool(self._records)

    # -- writing back ----------------------------------------------------------------------

    async def mark(self) -> None:
        await self._redis.set(self.marker, self._instance)

    async def check(self) -> bool:
        """Put back what Redis lost, if it lost it (the marker is gone); True if it did."""
        if await self._redis.exists(self.marker):
            return False
        async with self._lock:  # the reconciler and the janitor may both notice
            if await self._redis.exists(self.marker):
                return False
            await self.restore()
            await self.mark()
            return True

    async def restore(self) -> dict[str, Any]:
        spec_revision = await self._restore_spec()
        restored, claimed, ready = await self._restore_records()
        report: dict[str, Any] = {
            "spec_revision": spec_revision,
            "records": restored,
            "claimed": claimed,
            "ready": ready,
        }
        self.restored += 1  # a generation: records read before it may predate it
        if spec_revision or restored:
            log.warning("Redis had lost state; restored from the local journal", extra=report)
            await self._events.publish("state.restored", **dict(report))
        return report

    async def _restore_spec(self) -> int:
        if self._spec is None:
            return 0
        revision, document = self._spec
        wrote = await self._redis.set(self._keys.spec, document, nx=True)
        await self._redis.set(self._keys.spec_active, document, nx=True)
        if wrote:
            await self._redis.lpush(self._keys.spec_history, document)
            await self._redis.publish(self._keys.nudge, f"spec:{revision}")
        return revision if wrote else 0

    async def _restore_records(self) -> tuple[int, int, int]:
        return await self._put_back_records(self.known())

    async def _put_back_records(self, records: dict[str, dict[str, str]]) -> tuple[int, int, int]:
        if not records:
            return 0, 0, 0
        listing = await list_all(self._providers)
        restored = claimed = ready = 0
        for sandbox_id, fields in records.items():
            if sandbox_id not in listing.sandboxes:
                continue  # gone meanwhile: nothing to put back
            state = fields.get("state", "")
            pool = fields.get("pool", "")
            keys = [
                self._keys.sandbox(sandbox_id),
                self._keys.sandboxes,
                self._keys.pool_members(pool),
                self._keys.pool_ready(pool),
                self._keys.leases,
            ]
            flat = [x for pair in fields.items() for x in pair]
            args = [sandbox_id, state, fields.get("lease_expires_ms", "0"), *flat]
            if await self._put_back(keys=keys, args=args):
                restored += 1
                claimed += state == "claimed"
                ready += state == "ready"
        return restored, claimed, ready
