"""A pool's circuit breaker on creates: stop hammering a provider that keeps failing.

closed -> (N consecutive failures, or one permanent error) -> open -> (cooldown) ->
half_open: one trial create -> closed on success, open again (cooldown doubled) on failure.
Pure and clock-injected, so every transition is tested directly (tests/unit/test_breaker.py).
"""

from dataclasses import dataclass
from typing import Literal

from sandboxd.spec import BreakerSpec

BreakerState = Literal["closed", "open", "half_open"]


@dataclass
class Transition:
    """What a recorded outcome changed, for the caller to publish."""

    state: BreakerState
    error: str = ""


class CircuitBreaker:
    def __init__(self, spec: BreakerSpec):
        self.spec = spec
        self.state: BreakerState = "closed"
        self.failures = 0  # consecutive
        self.last_error = ""
        self.opened_at = 0.0
        self.cooldown_s = spec.cooldown_s
        self._trial_running = False

    def allowed(self, now: float) -> int | None:
        """How many creates may start now: None for no limit, 0 or 1 otherwise."""
        if self.state == "open" and now - self.opened_at >= self.cooldown_s:
            self.state = "half_open"
        if self.state == "closed":
            return None
        if self.state == "half_open" and not self._trial_running:
            return 1
        return 0

    def started(self) -> None:
        if self.state == "half_open":
            self._trial_running = True

    def succeeded(self) -> Transition | None:
        self.failures = 0
        self._trial_running = False
        if self.state == "closed":
            return None
        self.state = "closed"
        self.cooldown_s = self.spec.cooldown_s
        return Transition("closed")

    def failed(self, error: str, now: float, *, permanent: bool = False) -> Transition | None:
        self.failures += 1
        self.last_error = error
        if self.state == "half_open":
            self._trial_running = False
            self.cooldown_s = min(self.cooldown_s * 2, self.spec.max_cooldown_s)
            return self._open(now)
        if self.state == "closed" and (permanent or self.failures >= self.spec.failures):
            return self._open(now)
        return None

    def _open(self, now: float) -> Transition:
        self.state = "open"
        self.opened_at = now
        return Transition("open", self.last_error)

    def reconfigure(self, spec: BreakerSpec) -> None:
        if spec != self.spec:
            self.spec = spec
            self.cooldown_s = min(max(self.cooldown_s, spec.cooldown_s), spec.max_cooldown_s)

    def retry_in(self, now: float) -> float:
        """Seconds until the next trial create (0 unless open)."""
        if self.state != "open":
            return 0.0
        return max(0.0, self.opened_at + self.cooldown_s - now)
