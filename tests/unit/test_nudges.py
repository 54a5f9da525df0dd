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


async def woken_after(n: Nudges, timeout_s: float = 5.0) -> tuple[bool, float]:
    loop = asyncio.get_running_loop()
    began = loop.time()
    due = await n.wait(timeout_s)
    return due, loop.time() - began


async def test_claims_are_coalesced_into_one_pass_for_their_pools():
    n = nudges(coalesce_s=0.2)
    waiting = asyncio.create_task(woken_after(n))
    n.add("a", coalesce=True)
    await asyncio.sleep(0)
    n.add("b", coalesce=True)  # within the window: the same pass
    due, waited = await waiting
    assert due and 0.19 <= waited < 1.0
    assert n.take() == (False, {"a", "b"})


@pytest.mark.parametrize("urgent", [("a", False), (None, False), ("not-in-force", True)])
async def test_anything_else_cuts_the_wait_short(urgent):
    n = nudges(coalesce_s=30)  # the test's timeout fails it if the wait is not cut short
    waiting = asyncio.create_task(woken_after(n))
    n.add("a", coalesce=True)
    for _ in range(3):
        await asyncio.sleep(0)
    assert not waiting.done()  # waiting for more claims
    pool, coalesce = urgent
    n.add(pool, coalesce=coalesce)  # a death in pool a; a spec; an unknown pool's claim
    due, waited = await waiting
    assert due and waited < 1.0
    whole, pools = n.take()
    assert whole == (pool != "a") and "a" in pools


async def test_a_pass_due_before_the_wait_starts_at_once_and_zero_turns_coalescing_off():
    n = nudges(coalesce_s=0)
    n.add("a", coalesce=True)
    due, waited = await woken_after(n)
    assert due and waited < 0.5
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
