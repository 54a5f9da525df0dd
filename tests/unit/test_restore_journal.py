"""The restore journal kept from what changed equals the journal kept from every record."""

import asyncio
import tempfile
from pathlib import Path

import fakeredis
from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxd.control.localstate import LocalState
from sandboxd.control.restore import Restorer
from sandboxd.store.events import EventPublisher
from sandboxd.store.keys import Keys
from sandboxd.store.records import SandboxRecord
from tests.support import a_record

KEYS = Keys("t")
IDS = [f"sb-{i}" for i in range(6)]
STATES = ["creating", "ready", "claimed", "released"]

# One step: for some ids, a new version of the record (a state), or its removal (None);
# and whether the view read everything (a full read: it names no ids, records may be gone).
steps = st.lists(
    st.tuples(
        st.dictionaries(st.sampled_from(IDS), st.none() | st.sampled_from(STATES), max_size=4),
        st.booleans(),
    ),
    max_size=12,
)


def record(sandbox_id: str, state: str, version: int) -> SandboxRecord:
    return a_record(sandbox_id, state=state, claim_id=f"c{version}" if state == "claimed" else "")


def restorer(redis, root: Path) -> Restorer:
    return Restorer(
        redis=redis,
        keys=KEYS,
        journal=LocalState(root),
        events=EventPublisher(redis, KEYS, 1000),
        providers={},
        instance="i",
    )


@settings(max_examples=60, deadline=None)
@given(steps)
def test_remembering_what_changed_keeps_what_remembering_everything_keeps(changes):
    async def run() -> None:
        redis = fakeredis.FakeAsyncRedis(decode_responses=True)
        with tempfile.TemporaryDirectory() as tmp:
            every, some = restorer(redis, Path(tmp) / "a"), restorer(redis, Path(tmp) / "b")
            await every.mark()
            view: dict[str, SandboxRecord] = {}
            for n, (step, full) in enumerate(changes):
                for sandbox_id, state in step.items():
                    if state is None:
                        view.pop(sandbox_id, None)
                    else:
                        view[sandbox_id] = record(sandbox_id, state, n)
                records = list(view.values())
                await every.remember(records, None, save=False)
                changed = None if full else (view, set(step))
                await some.remember(records, None, save=False, changed=changed)
                assert some.known() == every.known()

    asyncio.run(run())


def test_what_the_journal_held_at_start_goes_once_a_pass_saw_other_records(tmp_path):
    """A journal from the last run lists sandboxes since gone; the first pass (even one that
    sees no record at all) replaces it, and later passes remember from their changes."""

    async def run() -> None:
        redis = fakeredis.FakeAsyncRedis(decode_responses=True)
        old = restorer(redis, tmp_path)
        await old.mark()
        await old.remember([record("sb-0", "ready", 0)], None, save=False, now=True)
        new = restorer(redis, tmp_path)  # a restart: the journal is read
        assert set(new.known()) == {"sb-0"}
        await new.remember([], None, save=False)
        view = {"sb-1": record("sb-1", "creating", 1)}
        await new.remember(list(view.values()), None, save=False, changed=(view, {"sb-1"}))
        assert set(new.known()) == {"sb-1"}

    asyncio.run(run())


def test_a_record_is_serialized_once_between_saves_and_saved_as_it_last_was(tmp_path, monkeypatch):
    """Claimed, released, reset between two saves (the passes of a claim storm): one JSON
    of it, made when the journal is written, of the version it holds then."""
    from sandboxd.control import restore

    made = []

    def counting(fields):
        made.append(fields["id"])
        return real(fields)

    real = restore.fields_json
    monkeypatch.setattr(restore, "fields_json", counting)

    async def run() -> None:
        redis = fakeredis.FakeAsyncRedis(decode_responses=True)
        journal = restorer(redis, tmp_path)
        await journal.mark()
        journal._next_save = float("inf")  # the last write took long: the next one waits
        view: dict[str, SandboxRecord] = {}
        for version, state in enumerate(["ready", "claimed", "released", "ready"]):
            view["sb-0"] = record("sb-0", state, version)
            await journal.remember(list(view.values()), None, save=False, changed=(view, {"sb-0"}))
        assert made == []  # nothing written yet: nothing serialized
        await journal.remember(list(view.values()), None, save=False, now=True)
        assert made == ["sb-0"]
        saved = LocalState(tmp_path).load_records()
        assert SandboxRecord.from_hash(saved["sb-0"]) == view["sb-0"]  # the last version

    asyncio.run(run())
