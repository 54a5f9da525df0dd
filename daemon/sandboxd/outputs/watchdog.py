"""The systemd watchdog (WatchdogSec=): WATCHDOG=1 only while the reconcile loop makes
progress, so a hung loop — not just a dead process — gets the daemon restarted."""

import asyncio
import logging
import os
from collections.abc import Callable

from sandboxd.outputs import sdnotify

log = logging.getLogger(__name__)


def watchdog_period_s() -> float | None:
    """systemd's WATCHDOG_USEC, if it is meant for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000


class Watchdog:
    """Pings four times per period while `stuck_for()` (seconds the current reconcile pass
    has been running, 0 between passes) stays under half the period."""

    def __init__(self, stuck_for: Callable[[], float], period_s: float | None = None):
        self._stuck_for = stuck_for
        self.period_s = period_s if period_s is not None else watchdog_period_s()

    async def run(self) -> None:
        if self.period_s is None:
            await asyncio.Event().wait()  # no watchdog asked for: nothing to do, ever
        assert self.period_s is not None
        silent = False
        while True:
            stuck = self._stuck_for()
            if stuck < self.period_s / 2:
                sdnotify.notify("WATCHDOG=1")
                silent = False
            elif not silent:
                silent = True
                log.error(
                    "reconcile pass running for %.1fs: no more watchdog pings",
                    stuck,
                    extra={"watchdog_s": self.period_s},
                )
            await asyncio.sleep(self.period_s / 4)
