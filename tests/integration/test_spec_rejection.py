"""Invalid specs: the CLI refuses them and writes nothing; the daemon rejects direct writes."""

import json

from tests.support import KEYS, apply, cli, events_of, eventually, wait_event, wait_ready

INVALID = {
    "pools:\n  - name: default\n    min_ready: -1\n": "pools[0](default).min_ready",
    "pools:\n  - name: default\n    colour: blue\n": "pools[0](default).colour: unknown field",
    "pools:\n  - name: default\n    min_ready: 9\n    max_total: 3\n": "must not exceed max_total",
    "pools:\n  - name: default\n  min_ready: [\n": "malformed YAML",
}


async def test_cli_refuses_invalid_specs_and_changes_nothing(
    redis, redis_server, daemon_factory, tmp_path
):
    daemon_factory().start()
    await apply(redis, [{"name": "default", "min_ready": 2}])
    before_ids = sorted(await wait_ready(redis, "default", 2))
    before = await redis.get(KEYS.spec)
    for text, expected in INVALID.items():
        spec_file = tmp_path / "bad.yaml"
        spec_file.write_text(text)
        result = cli(redis_server, "apply", "-f", str(spec_file))
        assert result.returncode == 2, result
        assert expected in result.stderr and "nothing applied" in result.stderr
        assert await redis.get(KEYS.spec) == before
    assert sorted(await redis.lrange(KEYS.pool_ready("default"), 0, -1)) == before_ids


async def test_cli_apply_prints_revision_and_changes(redis, redis_server, tmp_path):
    spec_file = tmp_path / "ok.yaml"
    spec_file.write_text("pools:\n  - name: web\n    min_ready: 1\n")
    first = cli(redis_server, "apply", "-f", str(spec_file))
    assert first.returncode == 0 and first.stdout.splitlines() == [
        "applied revision 1",
        "  + pool web",
    ]
    spec_file.write_text("pools:\n  - name: web\n    min_ready: 3\n")
    second = cli(redis_server, "apply", "-f", "-", stdin=spec_file.read_text())
    assert second.stdout.splitlines() == ["applied revision 2", "  ~ pool web: min_ready 1 -> 3"]


async def test_daemon_rejects_an_invalid_spec_written_directly(redis, daemon_factory):
    daemon = daemon_factory().start()
    revision = await apply(redis, [{"name": "default", "min_ready": 2}])
    await wait_ready(redis, "default", 2)
    bad = {
        "revision": revision + 1,
        "pools": [{"name": "default", "min_ready": 50, "max_total": 3}],
    }
    await redis.set(KEYS.spec, json.dumps(bad))
    await redis.publish(KEYS.nudge, "manual")
    rejected = await wait_event(redis, "spec.rejected")
    assert rejected["data"]["revision"] == revision + 1
    assert rejected["data"]["revision_in_force"] == revision
    assert any("must not exceed max_total" in e for e in rejected["data"]["errors"])
    active = json.loads(await redis.get(KEYS.spec_active))
    assert active["revision"] == revision
    # still serving: a later valid apply is taken
    await apply(redis, [{"name": "default", "min_ready": 3}])
    await wait_ready(redis, "default", 3)
    assert daemon.proc.poll() is None
    assert len(await events_of(redis, "spec.rejected")) == 1


async def test_restart_with_invalid_spec_keeps_last_valid_revision(redis, daemon_factory):
    first = daemon_factory().start()
    revision = await apply(redis, [{"name": "default", "min_ready": 1}])
    await wait_ready(redis, "default", 1)
    first.stop()
    await redis.set(KEYS.spec, '{"revision": 99, "pools": "nope"}')
    daemon_factory().start()
    await wait_ready(redis, "default", 1)
    active = await eventually(lambda: redis.get(KEYS.spec_active), what="spec in force")
    assert json.loads(active)["revision"] == revision
