"""When the reconciler's next pass starts: a client's claims and releases are coalesced
for `claim_coalesce_ms`; anything else (a death, a create done, a spec, a claimant waiting
on an empty pool) starts it at once. Time is the event loop's: no sleeps to synchronise."""

import asyncio

import pytest

from sandboxd.control.nudges import Nudges
from sandboxd.daemon import _nudged_pool

pytestmark = pytest.mark.timeout(10)


def nudges(coalesce_s: float = 0.5) -> Nudges:
    n = Nudges(lambda: coalesce_s)
    n.pools_in_force = frozenset({"a", "b"})
    n.take()  # the first pass, whole, is over
    return n


async def yield_a_few() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_claims_are_coalesced_into_one_pass_for_their_pools():
    n = nudges(coalesce_s=0.2)
    waiting = asyncio.create_task(n.wait(30))
    n.add("a", coalesce=True)
    await yield_a_few()
    assert not waiting.done()  # woken, and waiting for more claims
    n.add("b", coalesce=True)  # within the window: the same pass
    await yield_a_few()
    assert not waiting.done()  # a claim does not cut the wait short
    assert await waiting is True  # the window ends by itself (the test's timeout bounds it)
    assert n.take() == (False, {"a", "b"})


@pytest.mark.parametrize("urgent", [("a", False), (None, False), ("not-in-force", True)])
async def test_anything_else_cuts_the_wait_short(urgent):
    n = nudges(coalesce_s=30)  # the test's timeout fails it if the wait is not cut short
    waiting = asyncio.create_task(n.wait(60))
    n.add("a", coalesce=True)
    await yield_a_few()
    assert not waiting.done()  # waiting for more claims
    pool, coalesce = urgent
    n.add(pool, coalesce=coalesce)  # a death in pool a; a spec; an unknown pool's claim
    await yield_a_few()
    assert waiting.done() and waiting.result() is True
    whole, pools = n.take()
    assert whole == (pool != "a") and "a" in pools


async def test_a_pass_due_before_the_wait_starts_at_once_and_zero_turns_coalescing_off():
    n = nudges(coalesce_s=0)
    n.add("a", coalesce=True)
    waiting = asyncio.create_task(n.wait(60))
    await yield_a_few()
    assert waiting.done() and waiting.result() is True
    n.take()
    assert await n.wait(0.01) is False  # nothing asked: the tick


def test_what_a_nudge_message_asks_for():
    assert _nudged_pool("a") == ("a", True)  # a claim or release: may wait for more
    assert _nudged_pool("empty:a") == ("a", False)  # a claimant waits on an empty pool
    assert _nudged_pool("spec:7") == ("spec:7", True)  # no pool of that name: whole, at once
    assert _nudged_pool(b"\xff") == (None, False)
    n = nudges(coalesce_s=30)
    pool, coalesce = _nudged_pool("spec:7")
    n.add(pool, coalesce=coalesce)
    assert n.take() == (True, set())
