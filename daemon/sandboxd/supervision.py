"""Keeping the daemon's root tasks running, and making sure a stop request ends the process.

- `supervise`: a root task that raises is restarted after a jittered, doubling backoff
  (`daemon.task_restarted`: task, error, restarts, delay_s) instead of bringing the whole
  process down. Only an *essential* task (one the daemon cannot work without) that keeps
  failing — `MAX_FAILURES` times in a row, none of the runs lasting `STABLE_S` — ends the
  daemon, through `on_fatal`, with a clear log line.
- `HardStop`: once armed (by SIGTERM/SIGINT, or a fatal failure) a thread ends the process
  with `os._exit` after `HARD_STOP_S` whatever the event loop is stuck on — a task that
  ignores cancellation, a blocking call — inside systemd's `TimeoutStopSec=15s`.
"""

import asyncio
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from sandboxd.store.events import EventPublisher
from sandboxd.store.fence import LeaseLost
from sandboxd.store.loops import cancelling

log = logging.getLogger(__name__)
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 30.0
STABLE_S = 60.0  # a run this long resets the backoff and the failure count
MAX_FAILURES = 5  # in a row, for an essential task: then the daemon gives up
HARD_STOP_S = 13.0  # after SIGTERM: the graceful stop takes < 10 s, systemd kills at 15 s
EXIT_HARD_STOP = 1


def describe(exc: BaseException) -> str:
    """`Type: message` of the first real error (TaskGroups wrap them in groups)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"[:500]


async def supervise(
    name: str,
    start: Callable[[], Awaitable[Any]],
    *,
    events: EventPublisher,
    essential: bool,
    on_fatal: Callable[[str, str], None],
) -> None:
    """Run `start()` until cancelled, restarting it when it raises (or returns)."""
    failures = restarts = 0
    while True:
        began = time.monotonic()
        try:
            await start()
            error = "returned unexpectedly"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if _lease_lost(exc):
                return  # the daemon is stopping: it acts for the node no more
            error = describe(exc)
            log.error("task %s failed: %s", name, error, exc_info=exc)
        if cancelling():
            raise asyncio.CancelledError
        failures = 1 if time.monotonic() - began >= STABLE_S else failures + 1
        if essential and failures >= MAX_FAILURES:
            on_fatal(name, error)
            return
        delay = min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** (failures - 1)) * random.uniform(0.5, 1)
        restarts += 1
        log.warning(
            "restarting task %s in %.1fs",
            name,
            delay,
            extra={"task": name, "error": error, "restarts": restarts},
        )
        try:
            await events.publish(
                "daemon.task_restarted",
                task=name,
                error=error,
                restarts=restarts,
                delay_s=round(delay, 2),
            )
        except RedisError as exc:
            log.warning("task restart not published: %s", exc)
        await asyncio.sleep(delay)


def _lease_lost(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return any(_lease_lost(e) for e in exc.exceptions)
    return isinstance(exc, LeaseLost)


class HardStop:
    """A deadline for the whole process, kept by a thread of its own."""

    def __init__(self, after_s: float = HARD_STOP_S):
        self.after_s = after_s
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def arm(self, why: str) -> None:
        """Start the countdown (once; later calls keep the first deadline)."""
        with self._lock:
            if self._timer is not None:
                return
            self._timer = threading.Timer(self.after_s, self._fire, args=(why,))
            self._timer.daemon = True
            self._timer.name = "sandboxd-hard-stop"
            self._timer.start()

    @property
    def armed(self) -> bool:
        return self._timer is not None

    def _fire(self, why: str) -> None:
        message = (
            f"still running {self.after_s:.0f}s after {why}: exiting now "
            f"(exit {EXIT_HARD_STOP}) without finishing the shutdown"
        )
        _emergency_log(message)
        os._exit(EXIT_HARD_STOP)


def _emergency_log(message: str) -> None:
    """One CRITICAL line in the usual format, written without taking any logging lock
    (the stuck thread may hold one)."""
    flusher = threading.Thread(target=sys.stdout.flush, daemon=True)
    flusher.start()
    flusher.join(0.5)
    record = log.makeRecord(log.name, logging.CRITICAL, __file__, 0, message, (), None)
    handlers = logging.getLogger().handlers
    try:
        line = handlers[0].format(record) if handlers else message
    except Exception:
        line = message
    try:
        os.write(sys.stdout.fileno(), (line + "\n").encode(errors="replace"))
    except (OSError, ValueError):
        pass
