"""Per pool: may a create start now? Its circuit breaker and slow start together, and what
its creates did lately — the numbers `status` and `health.report` show."""

from collections import deque
from typing import Any

from sandboxd.control.breaker import CircuitBreaker, Transition
from sandboxd.control.slowstart import SlowStart
from sandboxd.spec import PoolSpec

RECENT = 50  # create attempts the error rate is computed over
# Permanent errors (bad key, unknown template) in a row that fail the pool: the first opens
# the breaker, the trial after its cooldown confirms it.
PERMANENT_ATTEMPTS = 2


class PoolPacing:
    def __init__(self, spec: PoolSpec):
        self.spec = spec
        self.breaker = CircuitBreaker(spec.breaker)
        self.surge = SlowStart(spec.max_surge)
        self.inflight = 0
        self.created = 0
        self.failed_attempts = 0
        self.last_error = ""
        self.recent: deque[bool] = deque(maxlen=RECENT)  # attempt outcomes, True = ok
        self.below_target = ""  # why the pool is short, when it is
        self.permanent_failures = 0  # in a row
        self.failed = ""  # why the pool gave up creating, when it has

    def reconfigure(self, spec: PoolSpec) -> None:
        if spec != self.spec and self.failed:
            # A changed spec may have fixed what failed: try again, from scratch.
            self.breaker = CircuitBreaker(spec.breaker)
            self.failed, self.permanent_failures = "", 0
        self.spec = spec
        self.breaker.reconfigure(spec.breaker)
        self.surge.reconfigure(spec.max_surge)

    def limit(self, now: float) -> int:
        """Creates the pool may start now."""
        if self.failed:
            return 0
        allowed = self.surge.allowed(self.inflight)
        trial = self.breaker.allowed(now)
        return allowed if trial is None else min(allowed, trial)

    def may_retry(self) -> bool:
        """Retries within one create only while the breaker is closed: once it opens, a
        trial create at a time is all the provider gets."""
        return self.breaker.state == "closed"

    def started(self) -> None:
        self.inflight += 1
        self.breaker.started()

    def attempt_failed(self, error: str, now: float, *, permanent: bool) -> Transition | None:
        self.failed_attempts += 1
        self.last_error = error
        self.recent.append(False)
        self.surge.failed()
        self.permanent_failures = self.permanent_failures + 1 if permanent else 0
        if self.permanent_failures >= PERMANENT_ATTEMPTS and not self.failed:
            self.failed = error
        return self.breaker.failed(error, now, permanent=permanent)

    def finished(self, ok: bool) -> Transition | None:
        self.inflight -= 1
        if not ok:
            return None
        self.created += 1
        self.permanent_failures = 0
        self.recent.append(True)
        self.surge.succeeded()
        return self.breaker.succeeded()

    def error_rate(self) -> float:
        return round(self.recent.count(False) / len(self.recent), 3) if self.recent else 0.0

    def explain_shortfall(
        self, wanted: int, started: int, limit: int, now: float, provider_full: str = ""
    ) -> None:
        """Remember why fewer creates started than the pool needs (shown by `status`)."""
        if wanted <= started:
            self.below_target = ""
        elif self.failed:
            self.below_target = self.failed_note()
        elif self.breaker.state == "open":
            retry = self.breaker.retry_in(now)
            self.below_target = (
                f"breaker open after {self.breaker.failures} failed creates, trial in "
                f"{retry:.0f}s; last error: {self.breaker.last_error}"
            )
        elif self.breaker.state == "half_open":
            self.below_target = "breaker half-open: one trial create at a time"
        elif provider_full:
            self.below_target = provider_full
        elif started >= limit:
            self.below_target = f"slow start: {self.surge.window} creates at a time"
        else:
            self.below_target = "global limit max_concurrent_creates reached"

    def failed_note(self) -> str:
        return (
            f"failed: {self.failed} (no more creates until the pool's spec changes "
            "or the daemon restarts)"
        )

    def quiet(self) -> bool:
        """Nothing has happened to the pool's creates: `status` depends on the spec alone
        (so thousands of idle pools need not be looked at one by one)."""
        return not (
            self.inflight
            or self.created
            or self.failed_attempts
            or self.failed
            or self.below_target
            or self.breaker.failures
            or self.breaker.state != "closed"
        )

    def status(self, now: float) -> dict[str, Any]:
        return {
            "state": "failed" if self.failed else "ok",
            "failed_reason": self.failed,
            "breaker": self.breaker.state,
            "breaker_retry_in_s": round(self.breaker.retry_in(now), 1),
            "consecutive_failures": self.breaker.failures,
            "creating": self.inflight,
            "surge_window": self.surge.window,
            "created": self.created,
            "failed_attempts": self.failed_attempts,
            "error_rate": self.error_rate(),
            "last_error": self.last_error,
            "below_target": self.failed_note() if self.failed else self.below_target,
        }
