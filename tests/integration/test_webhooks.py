"""Signed webhooks from the real daemon to a real HTTP receiver on loopback: every event
arrives signed, a receiver that was down gets everything in order per pool, an event the
receiver keeps refusing goes to the dead-letter stream and `redeliver` sends it again, and
the secret appears nowhere."""

import base64
import json
import os
import secrets
import subprocess
import sys
from collections import defaultdict

import pytest

from sandboxd.store.events import EventPublisher
from tests.support import KEYS, cli, eventually, wait_event
from tests.support.webhooks import receiving, verify

pytestmark = pytest.mark.timeout(60)


def sandboxd(redis_url: str, *args: str, config=None) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    if config is not None:
        env["SANDBOXD_CONFIG"] = str(config)
    return cli(redis_url, *args, env=env)


def webhook_toml(url: str, secret_file) -> str:
    return f"""
[[webhooks]]
name = "audit"
url = "{url}"
secret_file = "{secret_file}"
pools = ["p1", "p2"]
types = ["pool.*"]
timeout_s = 2

[webhooks.retry]
attempts = 3
initial_s = 0.05
max_s = 0.2
unreachable_s = 60
"""


async def test_signed_in_order_retried_dead_lettered_redelivered_secret_kept(
    redis, redis_server, daemon_factory, tmp_path
):
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    secret_file = tmp_path / "webhook-secret"
    secret_file.write_text(secret + "\n")
    publisher = EventPublisher(redis, KEYS, maxlen=1000)

    async def produce(n: int, start: int, pools=("p1", "p2")) -> list[dict]:
        out = []
        for i in range(start, start + n):
            pool = pools[i % len(pools)]
            out.append((await publisher.publish("pool.scaled", pool=pool, n=i)).model_dump())
        return out

    with receiving() as receiver:
        daemon = daemon_factory(log_level="DEBUG")
        with open(daemon.config_path, "a") as config:
            config.write(webhook_toml(receiver.url, secret_file))
        daemon.start()
        await wait_event(redis, "daemon.started")
        await eventually(
            lambda: redis.hexists(KEYS.event_consumers, "webhook.audit"),
            what="the webhook's group registered",
        )

        # 1. every matching event arrives, signed; other pools and types do not
        sent = await produce(20, 0)
        await publisher.publish("pool.scaled", pool="p3")  # another pool: filtered out
        await publisher.publish("pool.breaker_closed", pool="p1")  # type matches pool.*
        sent.append((await publisher.publish("sandbox.ready", pool="p1")).model_dump())
        wanted = [e["id"] for e in sent[:20]]

        def arrived(ids):
            return lambda: _async_true(set(ids) <= {d.event["id"] for d in receiver.accepted()})

        await eventually(arrived(wanted), timeout=15, what="20 webhooks")
        for delivery in receiver.accepted():
            assert verify(secret, delivery), delivery.headers
            assert delivery.headers["webhook-id"] == delivery.event["id"]
            assert delivery.headers["content-type"] == "application/json"
        pools = {d.event["pool"] for d in receiver.accepted()}
        types = {d.event["type"] for d in receiver.accepted()}
        assert pools <= {"p1", "p2"} and types <= {"pool.scaled", "pool.breaker_closed"}

        # 2. the receiver is down while events happen: all of them after it returns, in order
        receiver.stop()
        down = await produce(30, 100)
        await eventually(
            lambda: _failed_attempts(redis, at_least=6), timeout=15, what="deliveries failing"
        )
        receiver.start()
        await eventually(arrived([e["id"] for e in down]), timeout=20, what="the backlog")
        order = defaultdict(list)
        for delivery in receiver.accepted():
            event = delivery.event
            if event["id"] not in order[event["pool"]]:
                order[event["pool"]].append(event["id"])
        for pool in ("p1", "p2"):
            produced = [e["id"] for e in sent[:20] + down if e["pool"] == pool]
            assert [i for i in order[pool] if i in produced] == produced

        # 3. one event the receiver answers with 500: dead-lettered after 3 attempts
        # The receiver knows it before it is sent: published first, it could be delivered
        # (and accepted) before the receiver was told to refuse it.
        event = publisher.build("pool.scaled", pool="p1", poison=True)
        poison = event.id
        receiver.fail_ids.add(poison)
        await redis.xadd(KEYS.events, event.to_fields())
        after = await produce(4, 200, pools=("p1",))  # the pool goes on after it
        await eventually(arrived([e["id"] for e in after]), timeout=15, what="after the 500s")
        dead = sandboxd(redis_server, "webhooks", "dead", "audit", "-o", "json")
        assert dead.returncode == 0, dead.stderr
        rows = json.loads(dead.stdout)
        assert [(r["id"], r["reason"], r["attempts"]) for r in rows] == [(poison, "HTTP 500", "3")]
        assert sum(d.event["id"] == poison for d in receiver.all()) == 3
        table = sandboxd(redis_server, "webhooks", "dead", "audit")
        assert "HTTP 500" in table.stdout and "DEAD_ID" in table.stdout

        # ... and `redeliver` sends it again once the receiver takes it
        receiver.fail_ids.clear()
        again = sandboxd(redis_server, "webhooks", "redeliver", "audit", rows[0]["dead_id"])
        assert again.returncode == 0, again.stderr
        await eventually(arrived([poison]), timeout=15, what="the redelivery")
        redelivered = [d for d in receiver.accepted() if d.event["id"] == poison]
        assert verify(secret, redelivered[0])
        await eventually(
            lambda: _async_true(
                not json.loads(
                    sandboxd(redis_server, "webhooks", "dead", "audit", "-o", "json").stdout
                )
            ),
            what="the dead-letter stream emptied",
        )
        bad = sandboxd(redis_server, "webhooks", "redeliver", "audit", "1-1")
        assert bad.returncode == 2 and "no dead-lettered event" in bad.stderr
        assert sandboxd(redis_server, "webhooks", "redeliver", "audit").returncode == 2

        # 4. the secret is nowhere: logs, events, status, dead letters, the daemon's argv
        status = sandboxd(redis_server, "status", "-o", "json")
        assert status.returncode == 0
        heartbeat = json.loads(status.stdout)
        assert heartbeat["daemon"]["webhooks"]["audit"]["delivered"] >= 55
        text = sandboxd(redis_server, "status").stdout
        assert "webhook:   audit -> http://127.0.0.1" in text
        assert "consumer:  webhook.audit: lag " in text
        places = {
            "status": status.stdout,
            "status text": text,
            "stream": json.dumps(await redis.xrange(KEYS.events)),
            "dead": json.dumps(await redis.xrange(KEYS.webhook_dead("audit"))),
            "heartbeat": await redis.get(KEYS.daemon) or "",
            "argv": " ".join(daemon.proc.args),
        }
        daemon.stop()
        places["log"] = daemon.log_path.read_text()
        assert "webhook" in places["log"]
        for name, text in places.items():
            assert secret not in text, name
            assert secret.removeprefix("whsec_") not in text, name


async def _async_true(value) -> bool:
    return bool(value)


async def _failed_attempts(redis, at_least: int) -> bool:
    raw = await redis.get(KEYS.daemon)
    if not raw:
        return False
    hooks = json.loads(raw).get("webhooks") or {}
    return hooks.get("audit", {}).get("failed_attempts", 0) >= at_least


def test_a_webhook_config_that_cannot_work_is_refused(tmp_path, redis_server):
    config = tmp_path / "bad.toml"
    config.write_text(
        f'redis_url = "{redis_server}"\n[[webhooks]]\nname = "a"\nurl = "ftp://x"\n'
        'secret = "s3cr3t-value"\n'
    )
    out = sandboxd(redis_server, "--config", str(config), "status")
    assert out.returncode == 2 and "http:// or https://" in out.stderr
    assert "s3cr3t-value" not in out.stderr and "Traceback" not in out.stderr
    config.write_text(
        f'redis_url = "{redis_server}"\nevent_stream_maxlen = 1000\n[events]\nmax_len = 500\n'
    )
    out = sandboxd(redis_server, "--config", str(config), "status")
    assert out.returncode == 2 and "events.max_len (500)" in out.stderr


def test_a_daemon_whose_webhook_secret_cannot_be_read_refuses_to_start(tmp_path, redis_server):
    config = tmp_path / "sandboxd.toml"
    config.write_text(
        f'redis_url = "{redis_server}"\n[local]\nworkspace_root = "{tmp_path / "boxes"}"\n'
        f'[[webhooks]]\nname = "a"\nurl = "http://127.0.0.1:9/"\n'
        f'secret_file = "{tmp_path / "missing"}"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "sandboxd", "--config", str(config), "run"],
        env={**os.environ, "SANDBOXD_LOG_LEVEL": "INFO"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 78, done.stdout + done.stderr
    assert "refusing to start: webhook 'a'" in done.stdout and "Traceback" not in done.stderr
