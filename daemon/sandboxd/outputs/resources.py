"""Host and local-sandbox resource use (psutil), and alerts when a threshold is crossed."""

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from sandboxd.config import Config
from sandboxd.providers import Provider
from sandboxd.providers.base import Metered
from sandboxd.spec import PoolSpec
from sandboxd.store.events import EventPublisher
from sandboxd.store.loops import every
from sandboxd.store.records import PassSnapshot, SandboxRecord

Snapshot = Callable[[], PassSnapshot]
MIB = 1024 * 1024
# Local sandboxes measured per sample (each a few cgroup or /proc reads): with more, each
# sample measures the next this many in turn, so a sample's cost is bounded whatever N is
# and every sandbox is measured every ceil(N / this) samples (its CPU % over that time).
MEASURED_PER_SAMPLE = 1000


def sample_host(disk_path: Path) -> dict[str, float]:
    """CPU % since the previous call, memory %, disk % where sandboxes live, load averages."""
    path = disk_path
    while not path.exists() and path != path.parent:
        path = path.parent
    load1, load5, load15 = psutil.getloadavg()
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "memory_percent": psutil.virtual_memory().percent,
        "disk_percent": psutil.disk_usage(str(path)).percent,
        "load1": round(load1, 2),
        "load5": round(load5, 2),
        "load15": round(load15, 2),
    }


class Crossings:
    """Which (key) values are above their threshold; reports only the crossings."""

    def __init__(self) -> None:
        self.firing: set[Any] = set()

    def check(self, key: Any, value: float, threshold: float, hysteresis: float) -> str | None:
        if key not in self.firing and value >= threshold:
            self.firing.add(key)
            return "firing"
        if key in self.firing and value < threshold - hysteresis:
            self.firing.discard(key)
            return "resolved"
        return None

    def forget(self, keep: Callable[[Any], bool]) -> None:
        self.firing = {key for key in self.firing if keep(key)}


@dataclass
class _CpuMark:
    cpu_s: float
    at: float


class ResourceSampler:
    """Every `sample_interval_s`: host figures and local sandboxes' CPU and memory (up to
    `MEASURED_PER_SAMPLE` of them, in turn), for metrics and `status`;
    `host.resource_alert` / `sandbox.resource_alert` on crossings."""

    def __init__(
        self,
        *,
        config: Config,
        events: EventPublisher,
        providers: dict[str, Provider],
        snapshot: Snapshot,
    ):
        self._config = config
        self._events = events
        self._providers = providers
        self._snapshot = snapshot
        self._marks: dict[str, _CpuMark] = {}
        self._crossings = Crossings()
        self.host: dict[str, float] = {}
        self.sandboxes: dict[str, dict[str, Any]] = {}
        self.samples = 0
        self._turn = 0  # where the next sample's share of the sandboxes begins
        self.per_sample = MEASURED_PER_SAMPLE

    async def run(self) -> None:
        await every(lambda: self._config.sample_interval_s, self.sample, "resources not sampled")

    async def sample(self) -> None:
        last = self._snapshot()
        records, specs = last.records, last.specs
        local = self._providers.get("local")
        # A provider that cannot measure its sandboxes (E2B only, a fake): no walk of them.
        boxes: list[SandboxRecord] = (
            [r for r in records if r.provider == "local" and r.state != "creating"]
            if isinstance(local, Metered)
            else []
        )
        share = self._share(boxes)
        workspace = self._config.local.workspace_root
        self.host, usage = await asyncio.to_thread(self._measure, local, share, workspace)
        self.sandboxes = self._rates(boxes, share, usage, specs)
        await self._alert_host()
        await self._alert_sandboxes({r.id for r in share})
        self.samples += 1

    @staticmethod
    def _measure(
        local: Provider | None, boxes: list[SandboxRecord], workspace: Path
    ) -> tuple[dict[str, float], dict[str, tuple[float, int] | None]]:
        usage: dict[str, tuple[float, int] | None] = {}
        if isinstance(local, Metered):
            usage = {r.id: local.usage(r.handle) for r in boxes}
        return sample_host(workspace), usage

    def _share(self, boxes: list[SandboxRecord]) -> list[SandboxRecord]:
        """The sandboxes this sample measures: all of them, or the next `per_sample`."""
        if len(boxes) <= self.per_sample:
            self._turn = 0
            return boxes
        start = self._turn % len(boxes)
        share = (boxes + boxes)[start : start + self.per_sample]
        self._turn = start + self.per_sample
        return share

    def _rates(
        self,
        boxes: list[SandboxRecord],
        share: list[SandboxRecord],
        usage: dict[str, tuple[float, int] | None],
        specs: dict[str, PoolSpec],
    ) -> dict[str, dict[str, Any]]:
        """Every sandbox's last measure (the ones measured now updated), the ones gone
        dropped. CPU % is over the time since that sandbox's previous measure."""
        now = time.monotonic()
        present = {r.id: r for r in boxes}
        marks = {i: m for i, m in self._marks.items() if i in present}
        result = {}
        for sandbox_id, box in self.sandboxes.items():
            if (record := present.get(sandbox_id)) is not None:
                box["state"] = record.state  # a claim since it was measured
                result[sandbox_id] = box
        for record in share:
            measured = usage.get(record.id)
            if measured is None:
                result.pop(record.id, None)
                marks.pop(record.id, None)
                continue
            cpu_s, rss = measured
            mark = marks.get(record.id)
            elapsed = now - mark.at if mark else 0.0
            percent = (cpu_s - mark.cpu_s) / elapsed * 100 if mark and elapsed > 0 else 0.0
            marks[record.id] = _CpuMark(cpu_s, now)
            spec = specs.get(record.pool)
            result[record.id] = {
                "pool": record.pool,
                "state": record.state,
                "cpu_percent": round(max(0.0, percent), 1),
                "rss_bytes": rss,
                "memory_limit_bytes": spec.memory_mb * MIB if spec else None,
            }
        self._marks = marks
        return result

    async def _alert_host(self) -> None:
        alerts = self._config.alerts
        for resource, threshold in (
            ("cpu", alerts.host_cpu_percent),
            ("memory", alerts.host_memory_percent),
            ("disk", alerts.host_disk_percent),
        ):
            value = self.host[f"{resource}_percent"]
            state = self._crossings.check(("host", resource), value, threshold, alerts.hysteresis)
            if state:
                await self._events.publish(
                    "host.resource_alert",
                    resource=resource,
                    state=state,
                    percent=value,
                    threshold=threshold,
                )

    async def _alert_sandboxes(self, measured: set[str]) -> None:
        """Crossings of the sandboxes measured now (a kept measure may predate a reset)."""
        alerts = self._config.alerts
        for sandbox_id, box in self.sandboxes.items():
            if sandbox_id not in measured or not box["memory_limit_bytes"]:
                continue
            percent = round(box["rss_bytes"] / box["memory_limit_bytes"] * 100, 1)
            threshold = alerts.sandbox_memory_percent
            state = self._crossings.check(sandbox_id, percent, threshold, alerts.hysteresis)
            if state:
                await self._events.publish(
                    "sandbox.resource_alert",
                    pool=box["pool"],
                    sandbox=sandbox_id,
                    resource="memory",
                    state=state,
                    percent=percent,
                    threshold=threshold,
                    rss_mb=round(box["rss_bytes"] / MIB, 1),
                    limit_mb=box["memory_limit_bytes"] // MIB,
                )
        self._crossings.forget(lambda key: isinstance(key, tuple) or key in self.sandboxes)
