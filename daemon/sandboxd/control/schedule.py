"""Scheduled pool sizes: windows of the week (in a time zone) that override a pool's
min_ready / max_total while active; the sizes in force ramp to each new target."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sandboxd.spec import PoolSpec, ScheduleWindow


def active_window(windows: Sequence[ScheduleWindow], now: datetime) -> ScheduleWindow | None:
    return next((w for w in windows if w.active(now)), None)


def next_change(windows: Sequence[ScheduleWindow], now: datetime) -> datetime | None:
    """When the window in force next differs from now's (None: never within a week)."""
    current = active_window(windows, now)
    edges = sorted({edge for w in windows for span in w.spans(now) for edge in span if edge > now})
    return next((edge for edge in edges if active_window(windows, edge) != current), None)


Sizes = tuple[int, int]  # (min_ready, max_total)


@dataclass(frozen=True)
class Ramp:
    """A move from `origin` to `target` sizes over `seconds`, begun at `began`."""

    origin: Sizes
    target: Sizes
    began: datetime
    seconds: float

    def at(self, now: datetime) -> Sizes:
        elapsed = (now - self.began).total_seconds()
        share = 1.0 if self.seconds <= 0 else min(1.0, max(0.0, elapsed / self.seconds))
        low, high = (
            round(o + (t - o) * share) for o, t in zip(self.origin, self.target, strict=True)
        )
        return min(low, high), high

    def done(self, now: datetime) -> bool:
        return self.at(now) == self.target


@dataclass(frozen=True)
class Change:
    """A pool's target sizes moved (a window started or ended, or the spec changed)."""

    pool: str
    window: ScheduleWindow | None
    target: Sizes
    ramp_s: float


class PoolSchedules:
    """Turns each pool's spec into the sizes in force now, given its schedule."""

    def __init__(self, clock: Callable[[], datetime] | None = None):
        self.clock = clock or (lambda: datetime.now(UTC))
        self._ramps: dict[str, Ramp] = {}
        self._windows: dict[str, ScheduleWindow | None] = {}

    def apply(self, pools: list[PoolSpec]) -> tuple[list[PoolSpec], list[Change]]:
        now = self.clock()
        scheduled, changes = [], []
        for pool in pools:
            if not pool.schedule:
                scheduled.append(pool)
                continue
            window = active_window(pool.schedule, now)
            change = self._track(pool, window, now)
            if change is not None:
                changes.append(change)
            low, high = self._ramps[pool.name].at(now)
            scheduled.append(pool.model_copy(update={"min_ready": low, "max_total": high}))
        self._forget({p.name for p in pools if p.schedule})
        return scheduled, changes

    def _track(self, pool: PoolSpec, window: ScheduleWindow | None, now: datetime) -> Change | None:
        target = _sizes(pool, window)
        ramp = self._ramps.get(pool.name)
        self._windows[pool.name] = window
        if ramp is None:  # first sight (a start): no ramp from an unknown size
            self._ramps[pool.name] = Ramp(target, target, now, 0.0)
            return None
        if ramp.target == target:
            return None
        self._ramps[pool.name] = Ramp(ramp.at(now), target, now, pool.schedule_ramp_s)
        return Change(pool.name, window, target, pool.schedule_ramp_s)

    def _forget(self, names: set[str]) -> None:
        for gone in self._ramps.keys() - names:
            del self._ramps[gone]
            self._windows.pop(gone, None)

    def status(self, pools: list[PoolSpec]) -> dict[str, dict[str, Any]]:
        """Per scheduled pool: the window in force, sizes now and targeted, next change."""
        now = self.clock()
        result = {}
        for pool in pools:
            ramp = self._ramps.get(pool.name)
            if not pool.schedule or ramp is None:
                continue
            window = self._windows.get(pool.name)
            upcoming = next_change(pool.schedule, now)
            result[pool.name] = {
                "window": window.label() if window else None,
                "min_ready": ramp.at(now)[0],
                "max_total": ramp.at(now)[1],
                "target_min_ready": ramp.target[0],
                "target_max_total": ramp.target[1],
                "next_change_at": upcoming.astimezone(UTC).isoformat() if upcoming else None,
            }
        return result


def _sizes(pool: PoolSpec, window: ScheduleWindow | None) -> Sizes:
    if window is None:
        return pool.min_ready, pool.max_total
    high = window.max_total if window.max_total is not None else pool.max_total
    low = window.min_ready if window.min_ready is not None else pool.min_ready
    return min(low, high), high
