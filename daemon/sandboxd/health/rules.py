"""A sandbox's health from its probes: healthy, degraded (slow or intermittently failing)
or unhealthy (failure_threshold consecutive failures, agent gone, `run:` program failed).
Pure, so each rule is tested directly (tests/unit/test_health.py); monitor.py runs probes."""

from dataclasses import dataclass
from typing import Any

from sandboxd.providers.base import Probe
from sandboxd.spec import HealthSpec
from sandboxd.store.records import HealthCheck, HealthState

KEPT_RESULTS = 5  # last probe results kept in the record; a failure among them: degraded


@dataclass(slots=True)
class SandboxHealth:
    state: HealthState = "unknown"
    reason: str = ""
    consecutive_failures: int = 0
    results: tuple[HealthCheck, ...] = ()  # the last KEPT_RESULTS, oldest first

    def keep(self, *results: HealthCheck) -> None:
        self.results = (*self.results, *results)[-KEPT_RESULTS:]

    def checks(self) -> list[dict[str, Any]]:
        return [r._asdict() for r in self.results]


def assess(health: SandboxHealth, probe: Probe, spec: HealthSpec, at: str) -> bool:
    """Fold one full probe into `health`; True if its state changed."""
    health.keep(HealthCheck(at, probe.ok, probe.latency_ms, probe.detail))
    health.consecutive_failures = 0 if probe.ok else health.consecutive_failures + 1
    state, reason = _verdict(health, probe, spec)
    changed = state != health.state
    health.state, health.reason = state, reason
    return changed


def program_failed(health: SandboxHealth, reason: str) -> bool:
    """The `run:` program gave up: unhealthy whatever the probes say."""
    changed = health.state != "unhealthy"
    health.state, health.reason = "unhealthy", f"agent failed: {reason}"
    return changed


def _verdict(health: SandboxHealth, probe: Probe, spec: HealthSpec) -> tuple[HealthState, str]:
    if not probe.alive:
        return "unhealthy", probe.detail or "agent gone"
    if health.consecutive_failures >= spec.failure_threshold:
        return "unhealthy", f"{probe.detail} ({health.consecutive_failures} failures in a row)"
    if not probe.ok:
        return "degraded", f"failing: {probe.detail}"
    if probe.latency_ms > spec.degraded_latency_ms:
        return "degraded", f"slow: probe took {probe.latency_ms:.0f} ms"
    failed = sum(1 for r in health.results if not r.ok)
    if failed:
        return "degraded", f"{failed} of the last {len(health.results)} probes failed"
    return "healthy", ""


def pool_state(score: float | None) -> str:
    """A pool's health from its share of healthy sandboxes."""
    if score is None:
        return "unknown"
    return "healthy" if score >= 0.9 else "degraded" if score >= 0.7 else "unhealthy"
