"""The MQTT bridge against a real mosquitto, watched by a real mosquitto_sub."""

import json
import subprocess
from pathlib import Path

import pytest

from sandboxd.client import Client
from tests.support import KEYS, apply, events_of, eventually, wait_event, wait_ready

pytestmark = pytest.mark.timeout(90)


class Subscriber:
    """`mosquitto_sub -t 'sandboxd/#'` with a persistent session (-c): what it prints."""

    def __init__(self, broker, out: Path):
        self.out = out
        with open(out, "wb") as sink:
            self.proc = subprocess.Popen(
                [
                    "mosquitto_sub",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(broker.port),
                    "-t",
                    "sandboxd/#",
                    "-q",
                    "1",
                    "-c",
                    "-i",
                    "test-subscriber",
                    "-v",
                ],
                stdout=sink,
                stderr=subprocess.DEVNULL,
            )

    def seen(self) -> list[tuple[str, dict]]:
        lines = self.out.read_text(errors="replace").splitlines()
        found = []
        for line in lines:
            topic, _, payload = line.partition(" ")
            if payload.startswith("{") and payload.endswith("}"):
                found.append((topic, json.loads(payload)))
        return found

    def ids(self) -> list[str]:
        """Event ids in the order first seen (QoS 1 is at least once: repeats are allowed)."""
        ordered: list[str] = []
        for _, event in self.seen():
            if event["id"] not in ordered:
                ordered.append(event["id"])
        return ordered

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def subscriber(mosquitto, tmp_path):
    sub = Subscriber(mosquitto, tmp_path / "sub.out")
    yield sub
    sub.close()


async def stream_ids(redis) -> list[str]:
    return [e["id"] for e in await events_of(redis)]


async def test_every_event_reaches_mqtt_in_order_across_a_broker_outage(
    redis, redis_server, mosquitto, subscriber, daemon_factory
):
    daemon = daemon_factory(mqtt={"url": mosquitto.url}, sample_interval_s=0.5).start()
    await wait_event(redis, "daemon.started")
    await apply(redis, [{"name": "web", "min_ready": 2, "max_total": 6}])
    await wait_ready(redis, "web", 2)

    async def caught_up():
        return subscriber.ids() == await stream_ids(redis)

    await eventually(caught_up, what="the subscriber to see every event so far")
    topics = {topic for topic, _ in subscriber.seen()}
    assert "sandboxd/_/daemon.started" in topics and "sandboxd/web/sandbox.ready" in topics
    topic, event = next(t for t in subscriber.seen() if t[1]["type"] == "sandbox.ready")
    assert topic == "sandboxd/web/sandbox.ready" and event["pool"] == "web"

    mosquitto.stop()
    before = len(await stream_ids(redis))
    await apply(redis, [{"name": "web", "min_ready": 4, "max_total": 6}])
    await wait_ready(redis, "web", 4)
    async with Client.from_url(redis_server, owner="mqtt-test") as client:
        claim = await client.claim("web")
        await claim.release()
    await wait_event(redis, "sandbox.terminated", reason="released")
    during = (await stream_ids(redis))[before:]
    assert len(during) >= 6  # events produced while the broker was away
    assert not set(during) & set(subscriber.ids())

    mosquitto.start()
    await eventually(caught_up, timeout=40, what="every event, in order, after the restart")
    assert daemon.proc.poll() is None
    assert await redis.get(KEYS.mqtt_cursor) == (await redis.xrevrange(KEYS.events, count=1))[0][0]


async def test_a_backlog_over_the_bound_drops_the_oldest_and_says_so(
    redis, mosquitto, subscriber, embedded_daemon
):
    daemon = await embedded_daemon(mqtt={"url": mosquitto.url, "max_backlog": 5})
    await eventually(lambda: _true(daemon.wings.bridge.connected), what="the bridge to connect")
    mosquitto.stop()
    await eventually(lambda: _true(not daemon.wings.bridge.connected), what="the bridge to notice")
    await apply(redis, [{"name": "burst", "min_ready": 4, "max_total": 4}])
    await wait_ready(redis, "burst", 4)
    produced = await stream_ids(redis)

    mosquitto.start()
    dropped = await wait_event(redis, "bridge.dropped", timeout=40)
    everything = await stream_ids(redis)
    last_five = produced[-5:]

    async def delivered():
        ids = subscriber.ids()
        return all(i in ids for i in last_five) and dropped["id"] in ids

    await eventually(delivered, timeout=40, what="the newest 5 events and the drop notice")
    ids = subscriber.ids()
    assert [i for i in ids if i in produced] == [i for i in produced if i in ids]  # in order
    skipped = [i for i in everything[: everything.index(dropped["id"])] if i not in ids]
    # At least once: events of the batch the broker took just as it went away may be in the
    # backlog (the cursor had not moved) and dropped there, yet have reached the subscriber.
    assert dropped["data"]["dropped"] >= len(skipped) > 0
    assert daemon.wings.bridge.dropped == dropped["data"]["dropped"]


async def _true(value: bool) -> bool:
    return value
