"""Prometheus metrics: counters fed by the event stream, gauges from the daemon's last
samples, served by prometheus-client's own HTTP server on `metrics_listen`."""

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sandboxd.config import Config
from sandboxd.spec import PoolSpec
from sandboxd.store import loops
from sandboxd.store.events import Event
from sandboxd.store.records import STATES, SandboxRecord

log = logging.getLogger(__name__)
CREATE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
PASS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)


class Metrics:
    """One registry per daemon. The scrape runs in prometheus-client's thread: it reads only
    `parts`, a dict the event loop replaces whole (never mutates), and thread-safe counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "sandboxd_events", "Events in the stream, by type.", ["type"], registry=r
        )
        self.creates = Counter(
            "sandboxd_creates",
            "Create outcomes (ready, retryable, permanent).",
            ["pool", "outcome"],
            registry=r,
        )
        self.create_seconds = Histogram(
            "sandboxd_create_duration_seconds",
            "From create start to ready.",
            ["pool"],
            buckets=CREATE_BUCKETS,
            registry=r,
        )
        self.claims = Counter("sandboxd_claims", "Sandboxes claimed.", ["pool"], registry=r)
        self.lease_expiries = Counter(
            "sandboxd_lease_expiries", "Claims whose lease ran out.", ["pool"], registry=r
        )
        self.terminations = Counter(
            "sandboxd_terminations",
            "Sandboxes terminated, by reason.",
            ["pool", "reason"],
            registry=r,
        )
        self.reconcile_seconds = Histogram(
            "sandboxd_reconcile_duration_seconds",
            "One reconcile pass.",
            buckets=PASS_BUCKETS,
            registry=r,
        )
        self.parts: dict[str, Any] = {}
        r.register(_SampledCollector(self))

    def update(self, **parts: Any) -> None:
        self.parts = {**self.parts, **parts}

    def observe(self, event: Event) -> None:
        """Count one event of the stream (the daemon's own and clients' claims alike)."""
        self.events.labels(event.type).inc()
        pool, data = event.pool, event.data
        if event.type == "sandbox.ready":
            self.creates.labels(pool, "ready").inc()
            if isinstance(data.get("create_ms"), int | float):
                self.create_seconds.labels(pool).observe(data["create_ms"] / 1000)
        elif event.type == "sandbox.create_failed":
            self.creates.labels(pool, "retryable" if data.get("retryable") else "permanent").inc()
        elif event.type == "sandbox.claimed":
            self.claims.labels(pool).inc()
        elif event.type == "sandbox.lease_expired":
            self.lease_expiries.labels(pool).inc()
        elif event.type == "sandbox.terminated":
            self.terminations.labels(pool, str(data.get("reason", ""))).inc()


def pool_gauges(
    records: list[SandboxRecord],
    specs: dict[str, PoolSpec],
    health: dict[str, dict[str, Any]],
    pacing: dict[str, dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """The `pools` part: per pool in force, sandboxes by state, sizes, health, breaker."""
    counts: dict[str, dict[str, int]] = {}
    for record in records:
        if record.pool in specs:
            states = counts.setdefault(record.pool, dict.fromkeys(STATES, 0))
            states[record.state] += 1
    pools = {}
    for name, spec in specs.items():
        states = counts.get(name) or dict.fromkeys(STATES, 0)
        pools[name] = {
            "states": {**states, "total": sum(states.values())},
            "min_ready": spec.min_ready,
            "max_total": spec.max_total,
            "health": health.get(name, {}),
            "breaker": pacing.get(name, {}).get("breaker", "closed"),
            "state": pacing.get(name, {}).get("state", "ok"),
        }
    return pools


class _SampledCollector(Collector):
    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        parts = self._metrics.parts
        yield from _pool_metrics(parts.get("pools", {}))
        yield from _host_metrics(parts.get("host", {}))
        yield from _sandbox_metrics(parts.get("sandboxes", {}))
        yield from _cost_metrics(parts.get("cost", {}))
        yield from _bridge_metrics(parts.get("mqtt"))
        yield from _consumer_metrics(parts.get("consumers", {}))
        yield from _webhook_metrics(parts.get("webhooks", {}))
        daemon = GaugeMetricFamily("sandboxd_spec_revision", "The spec revision in force.")
        daemon.add_metric([], parts.get("revision", 0))
        yield daemon
        reconnects = CounterMetricFamily(
            "sandboxd_redis_reconnects", "Redis errors a loop survived by reconnecting."
        )
        reconnects.add_metric([], loops.survived_errors)
        yield reconnects


def _gauge(name: str, doc: str, labels: list[str], rows: dict[tuple, float]) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for key, value in rows.items():
        family.add_metric(list(key), value)
    return family


def _pool_metrics(pools: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    """`pools`: name -> {states: {state: n}, min_ready, max_total, health: {...}, breaker}."""
    yield _gauge(
        "sandboxd_pool_sandboxes",
        "Sandboxes of the pool by state (total: all states).",
        ["pool", "state"],
        {(p, s): n for p, v in pools.items() for s, n in v["states"].items()},
    )
    for size in ("min_ready", "max_total"):
        yield _gauge(
            f"sandboxd_pool_desired_{size}",
            f"The pool's {size} in force (after its schedule).",
            ["pool"],
            {(p,): v[size] for p, v in pools.items()},
        )
    yield _gauge(
        "sandboxd_pool_health",
        "Probed sandboxes of the pool by health.",
        ["pool", "health"],
        {(p, h): v["health"].get(h, 0) for p, v in pools.items() for h in _HEALTH},
    )
    yield _gauge(
        "sandboxd_pool_breaker_open",
        "1 while the pool's create breaker is open or half-open.",
        ["pool"],
        {(p,): float(v["breaker"] != "closed") for p, v in pools.items()},
    )
    yield _gauge(
        "sandboxd_pool_failed",
        "1 when the pool gave up after permanent create errors.",
        ["pool"],
        {(p,): float(v["state"] == "failed") for p, v in pools.items()},
    )


_HEALTH = ("healthy", "degraded", "unhealthy", "unknown")


def _host_metrics(host: dict[str, float]) -> Iterator[Metric]:
    for key, doc in (
        ("cpu_percent", "Host CPU use, %."),
        ("memory_percent", "Host memory in use, %."),
        ("disk_percent", "Use of the file system holding local sandboxes, %."),
        ("load1", "1-minute load average."),
        ("load5", "5-minute load average."),
        ("load15", "15-minute load average."),
    ):
        if key in host:
            yield _gauge(f"sandboxd_host_{key}", doc, [], {(): host[key]})


def _sandbox_metrics(boxes: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    yield _gauge(
        "sandboxd_sandbox_cpu_percent",
        "A local sandbox's CPU use (100 = one core).",
        ["pool", "sandbox"],
        {(b["pool"], s): b["cpu_percent"] for s, b in boxes.items()},
    )
    yield _gauge(
        "sandboxd_sandbox_memory_bytes",
        "A local sandbox's resident memory (all its processes).",
        ["pool", "sandbox"],
        {(b["pool"], s): b["rss_bytes"] for s, b in boxes.items()},
    )


def _cost_metrics(cost: dict[str, dict[str, float]]) -> Iterator[Metric]:
    seconds = CounterMetricFamily(
        "sandboxd_pool_sandbox_seconds",
        "Sandbox-seconds by use: idle (ready, not claimed), claimed, paused.",
        labels=["pool", "use"],
    )
    spend = CounterMetricFamily(
        "sandboxd_pool_cost",
        "Estimated spend by use, in the configured currency.",
        labels=["pool", "use"],
    )
    for pool, totals in cost.items():
        for use in ("idle", "claimed", "paused"):
            seconds.add_metric([pool, use], totals.get(f"{use}_s", 0.0))
            spend.add_metric([pool, use], totals.get(f"{use}_cost", 0.0))
    yield seconds
    yield spend


def _bridge_metrics(mqtt: dict[str, Any] | None) -> Iterator[Metric]:
    if mqtt is None:
        return
    yield _gauge(
        "sandboxd_mqtt_connected",
        "1 while the MQTT bridge is connected.",
        [],
        {(): mqtt["connected"]},
    )
    for key, doc in (("published", "Events published to MQTT."), ("dropped", "Events dropped.")):
        family = CounterMetricFamily(f"sandboxd_mqtt_{key}", doc)
        family.add_metric([], mqtt[key])
        yield family


def _consumer_metrics(groups: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    """`consumers`: registered group -> {lag, pending, exists, lost}."""
    yield _gauge(
        "sandboxd_consumer_group_lag",
        "Entries of the event stream not yet delivered to the registered group.",
        ["group"],
        {(g,): v["lag"] for g, v in groups.items() if v.get("lag") is not None},
    )
    yield _gauge(
        "sandboxd_consumer_group_pending",
        "Entries delivered to the registered group and not yet acknowledged.",
        ["group"],
        {(g,): v["pending"] for g, v in groups.items()},
    )
    lost = CounterMetricFamily(
        "sandboxd_consumer_group_lost",
        "Entries the group had not read when the stream passed its hard bound.",
        labels=["group"],
    )
    for group, values in groups.items():
        lost.add_metric([group], values.get("lost", 0))
    yield lost


def _webhook_metrics(hooks: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    for key, doc in (
        ("delivered", "Events the webhook's receiver accepted."),
        ("failed_attempts", "Deliveries that failed (each retry counts)."),
        ("dead", "Events sent to the webhook's dead-letter stream."),
    ):
        family = CounterMetricFamily(f"sandboxd_webhook_{key}", doc, labels=["webhook"])
        for name, values in hooks.items():
            family.add_metric([name], values[key])
        yield family


class MetricsServer:
    """Serves the registry on `config.metrics_listen` (re-read by `reconfigure`)."""

    def __init__(self, config: Config, metrics: Metrics):
        self._config = config
        self._metrics = metrics
        self._changed = asyncio.Event()
        self._server: Any = None
        self._thread: Any = None
        self.listening: str | None = None
        self.serving = asyncio.Event()  # set while the endpoint is served

    def reconfigure(self) -> None:
        self._changed.set()

    async def run(self) -> None:
        try:
            while True:
                if self._config.metrics_listen != self.listening:
                    await self._close()
                    self._open(self._config.metrics_listen)
                await self._changed.wait()
                self._changed.clear()
        finally:
            await asyncio.shield(self._close())

    def _open(self, listen: str | None) -> None:
        if listen is None:
            return
        host, _, port = listen.rpartition(":")
        try:
            self._server, self._thread = start_http_server(
                int(port), addr=host or "127.0.0.1", registry=self._metrics.registry
            )
        except OSError as exc:
            log.error("metrics endpoint not served on %s: %s", listen, exc)
            return
        self.listening = listen
        self.serving.set()
        log.info("metrics served", extra={"metrics_listen": listen})

    async def _close(self) -> None:
        server, self._server, self.listening = self._server, None, None
        self.serving.clear()
        if server is not None:
            await asyncio.to_thread(server.shutdown)
            server.server_close()
            self._thread.join()
