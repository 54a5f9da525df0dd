"""The CLI's views and the event stream, read as an operator would."""

import json
import shutil
import subprocess

import pytest

from tests.support import KEYS, apply, cli, wait_event, wait_ready

EVENT_FIELDS = {"id", "type", "time", "pool", "sandbox", "data"}


async def test_get_status_and_events_json(redis, redis_server, daemon_factory):
    daemon_factory().start()
    await apply(redis, [{"name": "default", "min_ready": 2, "max_total": 5}])
    await wait_ready(redis, "default", 2)
    pools = json.loads(cli(redis_server, "get", "pools", "-o", "json").stdout)
    assert (
        pools == [pools[0]]
        and {"name", "min_ready", "max_total", "ready", "creating", "total"} <= pools[0].keys()
    )
    assert (pools[0]["name"], pools[0]["ready"], pools[0]["total"]) == ("default", 2, 2)
    boxes = json.loads(
        cli(redis_server, "get", "sandboxes", "--pool", "default", "-o", "json").stdout
    )
    assert len(boxes) == 2
    assert all({"id", "pool", "provider", "state", "created_at"} <= b.keys() for b in boxes)
    status = cli(redis_server, "status", "-o", "json")
    body = json.loads(status.stdout)
    assert status.returncode == 0 and body["daemon"]["alive"] and body["revision_in_force"] == 1
    table = cli(redis_server, "status").stdout
    assert "alive" in table and "revision 1 in force" in table and "default" in table
    assert "host:" in table and "outputs:   metrics off  mqtt off" in table
    assert "READY/MIN" in table and "COST" in table and "IDLE%" in table
    events = cli(redis_server, "events", "-n", "100", "-o", "json").stdout.splitlines()
    parsed = [json.loads(line) for line in events]
    assert all(EVENT_FIELDS | {"stream_id"} == e.keys() for e in parsed)
    assert {
        "spec.applied",
        "pool.scaled",
        "sandbox.creating",
        "sandbox.ready",
        "daemon.started",
    } <= {e["type"] for e in parsed}


async def test_status_without_a_daemon(redis_server, redis):
    result = cli(redis_server, "status")
    assert result.returncode == 3 and "NOT RUNNING" in result.stdout


def test_unreachable_redis_is_a_clear_error():
    result = cli("redis://:topsecretpw@127.0.0.1:1/0", "get", "pools")
    assert result.returncode == 1 and "cannot reach Redis at redis://:***@127.0.0.1:1/0" in (
        result.stderr
    )
    assert "topsecretpw" not in result.stderr + result.stdout


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli not installed")
async def test_redis_cli_xrange_shows_documented_fields(redis, redis_server, daemon_factory):
    daemon_factory().start()
    await apply(redis, [{"name": "default", "min_ready": 1}])
    await wait_event(redis, "sandbox.ready")
    port = redis_server.rsplit(":", 1)[1].split("/")[0]
    out = subprocess.run(
        ["redis-cli", "-p", port, "--json", "XRANGE", KEYS.events, "-", "+"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    entries = json.loads(out)
    for entry in entries:
        fields = entry[1] if isinstance(entry, list) else entry[next(iter(entry))]
        if isinstance(fields, list):
            fields = dict(zip(fields[::2], fields[1::2], strict=True))
        assert fields.keys() == EVENT_FIELDS
        json.loads(fields["data"])
