"""Loop helpers for control loops that must outlive a Redis outage.

`every` runs a step on an interval, `forever` back to back; a Redis error skips a round
(logged, counted in `survived_errors`) instead of ending the loop, and neither swallows a
cancellation (`cancelling`)."""

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

log = logging.getLogger(__name__)

survived_errors = 0  # Redis errors some loop outlived by retrying (a metric)


def cancelling() -> bool:
    """Is the current task being cancelled? A loop that survives errors checks this, so a
    cancel request that got lost on the way (seen under storms of nudges) still stops it."""
    task = asyncio.current_task()
    return bool(task and task.cancelling())


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Until `event` is set or `timeout_s` passed (False): the pause of a loop. A cancel
    already requested ends it here even if the loop's last round lost it on the way (seen
    on Python 3.11 under load: the stop then waited on the lease loop's pause for good);
    `asyncio.timeout`, not `asyncio.wait_for`, whose 3.11 version can lose one itself."""
    if cancelling():
        raise asyncio.CancelledError
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


def why(exc: BaseException) -> str:
    """How a loop that outlived `exc` names it: a key holding another type than a command
    wanted is bad data (repaired by the reconciler), not an outage."""
    if "WRONGTYPE" in str(exc):
        return "a key holds the wrong type"
    if str(exc).startswith("FENCEFREE"):  # store.fence.LeaseVacant
        return "Redis lost the lease with its data (it is being taken again)"
    return "Redis unavailable"


def survive(exc: BaseException) -> bool:
    """May a loop that outlives Redis errors go on after `exc`? Not while being cancelled."""
    global survived_errors
    if isinstance(exc, RedisError | OSError) and not cancelling():
        survived_errors += 1
        return True
    return False


async def every(
    interval_s: float | Callable[[], float], step: Callable[[], Awaitable[Any]], failed: str
) -> None:
    """Run `step` every `interval_s` (a number, or asked anew each round) forever; a Redis
    outage skips a round (logged as `failed`) instead of ending the loop."""
    while True:
        try:
            await step()
        except RedisError as exc:
            if not survive(exc):
                raise
            log.warning("%s, %s: %s", failed, why(exc), exc)
        if cancelling():  # a cancel the Redis client swallowed mid-command
            raise asyncio.CancelledError
        await asyncio.sleep(interval_s() if callable(interval_s) else interval_s)


async def forever(step: Callable[[], Awaitable[Any]], failed: str) -> None:
    """Run `step` back to back (it blocks on Redis itself); a Redis outage backs off,
    jittered and doubling to 5 s, and the first success goes back to full speed."""
    delay = 0.0
    while True:
        try:
            await step()
            delay = 0.0
        except (RedisError, OSError) as exc:
            if not survive(exc):
                raise
            delay = min(5.0, max(0.2, delay * 2))
            log.warning("%s, %s: %s", failed, why(exc), exc)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        if cancelling():
            raise asyncio.CancelledError
