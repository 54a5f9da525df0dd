"""What asks the reconciler for its next pass, and when that pass starts.

A nudge names the pool that changed (a claim, a release, a create done, a death), or none
(a new spec, the tick, a repair): the next pass looks at the named pools alone unless a
nudge without a pool asked for the whole. A pass asked for only by clients' claims and
releases (`coalesce`) waits `coalesce_s` more: a burst of them makes one pass, and a
claimant's first calls do not share the CPU with the refill its claim starts (on a small
host that refill, a sandbox's start, takes a core for tens of milliseconds). Any other
nudge cuts that wait short.
"""

import asyncio
from collections.abc import Callable

from sandboxd.store.loops import wait_event


class Nudges:
    def __init__(self, coalesce_s: Callable[[], float]):
        self._coalesce_s = coalesce_s
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()  # a nudge that may not wait
        self._whole = True  # the first pass looks at everything
        self._dirty: set[str] = set()
        self.pools_in_force: frozenset[str] = frozenset()

    def add(self, pool: str | None, *, coalesce: bool = False) -> None:
        """A pass is due: for `pool` (one in force), else for everything."""
        if pool is None or pool not in self.pools_in_force:
            self._whole, coalesce = True, False
        else:
            self._dirty.add(pool)
        if not coalesce:
            self._urgent.set()
        self._wake.set()

    async def wait(self, timeout_s: float) -> bool:
        """Until a pass is due (True) or `timeout_s` passed (False: the tick)."""
        if not await wait_event(self._wake, timeout_s):
            return False
        coalesce_s = self._coalesce_s()
        if coalesce_s > 0 and not self._urgent.is_set():
            await wait_event(self._urgent, coalesce_s)
        return True

    def take(self) -> tuple[bool, set[str]]:
        """What the pass starting now is for (whole, pools); later nudges wake the next."""
        self._wake.clear()
        self._urgent.clear()
        asked = self._whole, self._dirty
        self._whole, self._dirty = False, set()
        return asked
