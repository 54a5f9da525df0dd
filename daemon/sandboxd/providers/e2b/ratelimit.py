"""Pacing a cloud provider's creates: a token bucket at the plan's rate, and a growing pause
after the provider says it is overloaded (429, 503), so the daemon never storms it."""

import asyncio
import time

from aiolimiter import AsyncLimiter

MIN_PAUSE_S = 1.0
MAX_PAUSE_S = 60.0


class CreateLimiter:
    def __init__(self, per_s: float, burst: int):
        # aiolimiter's leaky bucket is a token bucket: `burst` at once, then `per_s`.
        self._bucket = AsyncLimiter(burst, burst / per_s)
        self._paused_until = 0.0
        self._pause_s = 0.0
        self.throttles = 0

    async def acquire(self) -> None:
        """Wait for the pause (if any) to end, then for a token."""
        # Not polling: sleep to the deadline, which another throttle may have pushed out.
        while (left := self._paused_until - time.monotonic()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(left)
        await self._bucket.acquire()

    def throttled(self) -> float:
        """The provider pushed back: pause every create, twice as long as last time."""
        self._pause_s = min(MAX_PAUSE_S, max(MIN_PAUSE_S, self._pause_s * 2))
        self._paused_until = max(self._paused_until, time.monotonic() + self._pause_s)
        self.throttles += 1
        return self._pause_s

    def succeeded(self) -> None:
        self._pause_s = 0.0

    def paused_for(self) -> float:
        return max(0.0, self._paused_until - time.monotonic())
