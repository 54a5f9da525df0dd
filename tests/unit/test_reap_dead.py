"""The reconciler's liveness walk and what a pass hands the samplers, on a stand-in for the
reconciler (no Redis, no daemon): the cases an outside review found."""

import types
from collections import Counter

import pytest

from sandboxd.control.reconciler import Reconciler
from sandboxd.daemon import Daemon
from sandboxd.store.records import SandboxRecord

pytestmark = pytest.mark.timeout(10)


def record(sandbox_id: str, pool: str, state: str = "ready") -> SandboxRecord:
    return SandboxRecord(
        id=sandbox_id, pool=pool, provider="local", state=state, template="t",
        spec_revision=1, instance="x",
    )  # fmt: skip


class Watched:
    """A provider whose sandboxes are watched (their deaths told): the tick asks 1/8."""

    gone_reason = "died"

    def __init__(self, dead: set[str]):
        self.dead = dead
        self.asked: list[str] = []

    async def is_alive(self, sandbox_id, handle):
        self.asked.append(sandbox_id)
        return sandbox_id not in self.dead


def stand_in(provider: Watched, watching: set[str]) -> types.SimpleNamespace:
    closed: list[str] = []

    async def close(record, reason, *rest, **data):  # a replace or a terminate
        closed.append(record.id)
        return True

    me = types.SimpleNamespace(
        _providers={"local": provider},
        _died=set(),
        _watching=dict.fromkeys(watching),
        _liveness_round=0,
        _stuck=set(),
        creator=types.SimpleNamespace(inflight=set()),
        _handling=lambda sandbox_id: False,
        replace=close,
        terminate=close,
        closed=closed,
    )
    me._verdict = types.MethodType(Reconciler._verdict, me)
    return me


async def test_a_death_told_during_a_pass_of_other_pools_is_judged_by_the_next():
    """Found from outside: a pass of some pools (a claim's) took every told death and
    looked only at its pools' records; a death in another pool then waited for its share of
    the tick's checks (up to 8 ticks)."""
    provider = Watched(dead={"b-1"})
    me = stand_in(provider, watching={"a-1", "b-1"})
    me._died.add("b-1")  # its pidfd said so
    a, b = [record("a-1", "a")], [record("b-1", "b")]
    kept = await Reconciler._reap_dead(me, a, check_liveness=False, whole=False)
    assert [r.id for r in kept] == ["a-1"] and me.closed == []
    assert me._died == {"b-1"}  # still told, for the pass that looks at pool b
    kept = await Reconciler._reap_dead(me, a + b, check_liveness=False, whole=True)
    assert [r.id for r in kept] == ["a-1"] and me.closed == ["b-1"]
    assert me._died == set()


async def test_a_told_death_of_a_record_gone_meanwhile_is_not_kept_forever():
    me = stand_in(Watched(dead=set()), watching=set())
    me._died.add("gone")
    await Reconciler._reap_dead(me, [record("a-1", "a")], check_liveness=False, whole=True)
    assert me._died == set()


def test_the_samplers_get_the_views_counts_only_when_they_are_the_passs_records():
    """Found from outside: the view's counts were read as the pass began, the records after
    it closed some: the cost of a sandbox just closed was priced for another tick."""
    daemon = Daemon.__new__(Daemon)
    observed = []
    view = types.SimpleNamespace(counts={"a": Counter(ready=2, claimed=1)})
    daemon.wings = types.SimpleNamespace(
        reconciler=types.SimpleNamespace(view=view),
        monitor=types.SimpleNamespace(observe=lambda records, specs: observed.append(records)),
    )
    records = [record("a-1", "a"), record("a-2", "a"), record("a-3", "a", "claimed")]
    daemon._observe_pass(records, {})
    assert daemon.last_pass.counts == {"a": Counter(ready=2, claimed=1)}
    view.counts["a"]["claimed"] += 0  # the view unchanged; the pass closed one:
    daemon._observe_pass(records[:2], {})
    assert daemon.last_pass.counts is None and daemon.last_pass.records == records[:2]
    assert len(observed) == 2
