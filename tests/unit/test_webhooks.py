"""Webhook signing, retry decisions and the config of webhooks and retention."""

import asyncio
import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import fakeredis
import httpx
import pytest
from pydantic import ValidationError

from sandboxd.config import Config, WebhookConfig
from sandboxd.outputs.webhooks import WebhookSender, retry_after_s, sign, signing_key
from sandboxd.store.consumers import ConsumerError, check_group, parse_id, successor
from sandboxd.store.events import Event
from sandboxd.store.groupread import Filter
from sandboxd.store.keys import Keys

pytestmark = pytest.mark.timeout(10)


def test_signature_matches_the_standard_webhooks_test_vector():
    key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    body = b'{"test": 2432232314}'
    assert (
        sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", body)
        == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )
    assert signing_key("plain secret") == b"plain secret"


def test_retry_after_as_seconds_or_a_date():
    assert retry_after_s("3") == 3.0
    assert retry_after_s(None) is None and retry_after_s("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 < (retry_after_s(later) or 0) <= 30


def test_filters_by_pattern_and_pool():
    wanted = Filter(["sandbox.*", "pool.failed"], ["web"])
    assert wanted(Event(type="sandbox.ready", pool="web"))
    assert wanted(Event(type="pool.failed", pool="web"))
    assert not wanted(Event(type="pool.scaled", pool="web"))
    assert not wanted(Event(type="sandbox.ready", pool="db"))
    assert Filter()(Event(type="anything"))


def test_group_names_and_ids_are_checked():
    assert check_group("billing.v2:eu-1") == "billing.v2:eu-1"
    for bad in ("", "a b", "-x", "x" * 65, "é", "a\nb"):
        with pytest.raises(ConsumerError):
            check_group(bad)
    assert parse_id("1-2") == (1, 2) and parse_id("1") is None and parse_id("x-1") is None
    assert parse_id(f"{2**64}-0") is None
    assert successor((5, 2**64 - 1)) == (6, 0)


def webhook(**extra) -> dict:
    return {"name": "audit", "url": "https://example.test/hook", "secret": "s3cr3t!", **extra}


def test_config_of_webhooks_and_retention():
    config = Config(webhooks=[webhook()])
    assert config.events.hard_len(config.event_stream_maxlen) == 1_000_000
    assert "s3cr3t!" not in config.model_dump_json() and "s3cr3t!" not in repr(config)
    cases = [
        ({"webhooks": [webhook(url="ftp://x")]}, "http:// or https://"),
        ({"webhooks": [webhook(secret=None)]}, "exactly one of secret, secret_file"),
        ({"webhooks": [webhook(secret_file="/x")]}, "exactly one of secret, secret_file"),
        ({"webhooks": [webhook(), webhook()]}, "a name of its own"),
        ({"webhooks": [webhook(name="a b")]}, "should match pattern"),
        ({"event_stream_maxlen": 1000, "events": {"max_len": 500}}, "at least"),
        ({"events": {"max_age_s": 0}}, "greater than 0"),
    ]
    for settings, message in cases:
        with pytest.raises(ValidationError, match=message):
            Config(**settings)


def sender(handler, **retry) -> WebhookSender:
    config = WebhookConfig.model_validate(
        webhook(retry={"initial_s": 0.001, "max_s": 0.002, **retry})
    )
    return WebhookSender(
        redis=fakeredis.FakeAsyncRedis(decode_responses=True),
        keys=Keys("t"),
        config=config,
        consumer="n1",
        transport=httpx.MockTransport(handler),
    )


async def deliver(webhook_sender: WebhookSender) -> tuple[bool, str, int]:
    async with httpx.AsyncClient(transport=webhook_sender._transport) as http:
        return await webhook_sender.deliver(http, Event(type="pool.scaled", pool="p"))


async def test_5xx_is_retried_up_to_the_attempts_then_given_up():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(503)

    assert await deliver(sender(handler, attempts=3)) == (False, "HTTP 503", 3)
    assert len(calls) == 3
    ids = {c.headers["webhook-id"] for c in calls}
    assert len(ids) == 1  # the same id on every attempt: receivers dedupe by it
    body = json.loads(calls[0].content)
    assert body["type"] == "pool.scaled" and body["id"] in ids


async def test_429_honours_retry_after_and_4xx_is_final():
    answers = [httpx.Response(429, headers={"retry-after": "0"}), httpx.Response(204)]
    assert await deliver(sender(lambda r: answers.pop(0), attempts=2)) == (True, "", 2)
    assert await deliver(sender(lambda r: httpx.Response(404))) == (False, "HTTP 404", 1)
    redirect = await deliver(sender(lambda r: httpx.Response(302)))
    assert redirect[0] is False and "redirects are not followed" in redirect[1]


async def test_an_unreachable_receiver_is_retried_for_unreachable_s_not_attempts():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) < 6:
            raise httpx.ConnectError("refused")
        return httpx.Response(200)

    assert await deliver(sender(handler, attempts=2, unreachable_s=30)) == (True, "", 6)
    gone = await asyncio.wait_for(
        deliver(sender(lambda r: _refuse(), attempts=2, unreachable_s=0.05)), 5
    )
    assert gone[0] is False and gone[1].startswith("unreachable")


def _refuse() -> httpx.Response:
    raise httpx.ConnectError("refused")


async def test_a_dead_letter_key_of_another_type_is_replaced_not_a_crash_loop():
    webhook_sender = sender(lambda r: httpx.Response(500))
    redis = webhook_sender._redis
    dead, queued = Keys("t").webhook_dead("audit"), Keys("t").webhook_redeliver("audit")
    await redis.set(dead, "someone's string")
    await redis.set(queued, "another")
    event = Event(type="pool.scaled", pool="p")
    await webhook_sender._bury("1-1", event, "HTTP 500", 3, ack=False)
    [(_, fields)] = await redis.xrange(dead)
    assert fields["id"] == event.id and fields["reason"] == "HTTP 500"
    assert await redis.type(queued) == "none"


def test_metrics_of_groups_and_webhooks():
    from prometheus_client import generate_latest

    from sandboxd.outputs.metrics import Metrics

    metrics = Metrics()
    metrics.update(
        consumers={
            "billing": {"lag": 7, "pending": 3, "exists": True, "lost": 2},
            "gone": {"lag": None, "pending": 0, "exists": False, "lost": 0},
        },
        webhooks={"audit": {"delivered": 5, "failed_attempts": 4, "dead": 1}},
    )
    text = generate_latest(metrics.registry).decode()
    assert 'sandboxd_consumer_group_lag{group="billing"} 7.0' in text
    assert 'sandboxd_consumer_group_lag{group="gone"}' not in text  # unknown, not 0
    assert 'sandboxd_consumer_group_pending{group="billing"} 3.0' in text
    assert 'sandboxd_consumer_group_lost_total{group="billing"} 2.0' in text
    assert 'sandboxd_webhook_dead_total{webhook="audit"} 1.0' in text
    assert 'sandboxd_webhook_delivered_total{webhook="audit"} 5.0' in text
