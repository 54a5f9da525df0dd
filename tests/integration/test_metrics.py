"""The Prometheus endpoint, resource alerts and cost accounting, against a real daemon."""

import asyncio
import subprocess

from prometheus_client.parser import text_string_to_metric_families

from sandboxd.client import Client
from sandboxd.config import AlertThresholds
from tests.support import apply, events_of, eventually, free_port, wait_event, wait_ready


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """`curl` the endpoint, as an operator would, and parse it with prometheus-client."""
    text = subprocess.run(
        ["curl", "-sf", f"http://127.0.0.1:{port}/metrics"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def test_metrics_follow_the_pools_as_they_scale(redis, redis_server, embedded_daemon):
    port = free_port()
    await embedded_daemon(metrics_listen=f"127.0.0.1:{port}", sample_interval_s=0.1)
    await apply(redis, [{"name": "web", "min_ready": 2, "max_total": 5}])
    await wait_ready(redis, "web", 2)

    async def pool_state(state: str, count: int):
        samples = await asyncio.to_thread(scrape, port)
        found = value(samples, "sandboxd_pool_sandboxes", pool="web", state=state)
        return samples if found == count else None

    samples = await eventually(lambda: pool_state("ready", 2), what="2 ready in the metrics")
    assert value(samples, "sandboxd_pool_desired_min_ready", pool="web") == 2
    assert value(samples, "sandboxd_pool_desired_max_total", pool="web") == 5
    assert value(samples, "sandboxd_creates_total", pool="web", outcome="ready") == 2
    assert value(samples, "sandboxd_create_duration_seconds_count", pool="web") == 2
    assert value(samples, "sandboxd_pool_breaker_open", pool="web") == 0
    assert value(samples, "sandboxd_spec_revision") == 1
    assert 0 <= value(samples, "sandboxd_host_memory_percent") <= 100
    assert value(samples, "sandboxd_host_load1") is not None
    assert value(samples, "sandboxd_reconcile_duration_seconds_count") > 0
    boxes = [k for k in samples if k[0] == "sandboxd_sandbox_memory_bytes"]
    assert len(boxes) == 2 and all(samples[k] > 1_000_000 for k in boxes)

    async with Client.from_url(redis_server, owner="metrics") as client:
        claim = await client.claim("web")
        samples = await eventually(lambda: pool_state("claimed", 1), what="a claim in metrics")
        assert value(samples, "sandboxd_claims_total", pool="web") == 1
        assert value(samples, "sandboxd_events_total", type="sandbox.claimed") == 1
        await claim.release()

    await apply(redis, [{"name": "web", "min_ready": 4, "max_total": 5}])
    samples = await eventually(lambda: pool_state("ready", 4), what="4 ready in the metrics")
    assert value(samples, "sandboxd_pool_desired_min_ready", pool="web") == 4
    assert value(samples, "sandboxd_spec_revision") == 2
    assert value(samples, "sandboxd_terminations_total", pool="web", reason="released") == 1
    assert value(samples, "sandboxd_pool_sandbox_seconds_total", pool="web", use="claimed") > 0
    assert value(samples, "sandboxd_pool_sandbox_seconds_total", pool="web", use="idle") > 0


async def test_no_endpoint_unless_configured_and_reload_opens_it(redis, embedded_daemon):
    daemon = await embedded_daemon()
    assert daemon.wings.metrics_server.listening is None
    port = free_port()
    daemon.config.metrics_listen = f"127.0.0.1:{port}"
    daemon.wings.metrics_server.reconfigure()
    samples = await eventually(
        lambda: asyncio.to_thread(_try_scrape, port), what="the endpoint after reconfigure"
    )
    assert value(samples, "sandboxd_redis_reconnects_total") is not None


def _try_scrape(port: int) -> dict | None:
    try:
        return scrape(port)
    except subprocess.CalledProcessError:
        return None


async def test_resource_alerts_fire_on_crossing_not_every_sample(redis, embedded_daemon):
    daemon = await embedded_daemon(
        sample_interval_s=0.05,
        alerts={"host_memory_percent": 0.1, "sandbox_memory_percent": 0.1},
    )
    await apply(redis, [{"name": "mem", "min_ready": 1, "max_total": 1, "memory_mb": 512}])
    await wait_ready(redis, "mem", 1)
    firing = await wait_event(redis, "sandbox.resource_alert", state="firing")
    assert firing["pool"] == "mem" and 0 < firing["data"]["rss_mb"] < 512
    assert firing["data"]["limit_mb"] == 512
    await wait_event(redis, "host.resource_alert", resource="memory", state="firing")
    samples_then = daemon.wings.resources.samples
    await eventually(
        lambda: _async(daemon.wings.resources.samples >= samples_then + 20), what="20 more samples"
    )
    alerts = await events_of(redis, "sandbox.resource_alert", "host.resource_alert")
    memory = [(e["type"], e["data"]["state"]) for e in alerts if e["data"]["resource"] == "memory"]
    assert sorted(memory) == [
        ("host.resource_alert", "firing"),
        ("sandbox.resource_alert", "firing"),
    ]

    daemon.config.alerts = AlertThresholds(sandbox_memory_percent=99, host_memory_percent=99.9)
    await wait_event(redis, "sandbox.resource_alert", state="resolved")
    await wait_event(redis, "host.resource_alert", state="resolved")


async def test_pool_cost_events_show_spend_and_idle_share(redis, embedded_daemon):
    await embedded_daemon(sample_interval_s=0.05, cost={"report_interval_s": 0.2})
    await apply(redis, [{"name": "warm", "min_ready": 2, "cpu": 2, "memory_mb": 1024}])
    await wait_ready(redis, "warm", 2)

    async def costed():
        events = await events_of(redis, "pool.cost")
        return [e for e in events if e["data"].get("idle_s", 0) > 0.5]

    event = (await eventually(costed, what="a pool.cost event with idle time"))[0]
    data = event["data"]
    per_second = 2 * 0.000014 + 1 * 0.0000045  # 2 vCPU + 1 GiB at the default prices
    assert abs(data["idle_cost"] - data["idle_s"] * per_second) < 1e-3 * data["idle_cost"]
    assert data["idle_share"] == 1.0 and data["currency"] == "USD"
    stored = await redis.hgetall("sandboxd:pool:warm:cost")
    assert float(stored["idle_s"]) >= data["idle_s"] - 0.001


async def _async(value):
    return value
