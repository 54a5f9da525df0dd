"""`sandboxd spec history | rollback` and `sandboxd check-health`, through the real CLI."""

import json

from tests.support import apply, cli, eventually, ready_ids, wait_event, wait_ready


async def test_rollback_restores_an_earlier_revision_and_the_pools_follow(
    redis, redis_server, daemon_factory
):
    daemon_factory().start()
    await apply(redis, [{"name": "small", "min_ready": 1, "max_total": 2}])
    await wait_ready(redis, "small", 1)
    await apply(redis, [{"name": "big", "min_ready": 2, "max_total": 3}])
    await wait_ready(redis, "big", 2)
    await wait_event(redis, "spec.applied", revision=2)

    history = json.loads(cli(redis_server, "spec", "history", "-o", "json").stdout)
    assert [h["revision"] for h in history] == [2, 1]
    assert [h["in_force"] for h in history] == [True, False]
    assert "small" in cli(redis_server, "spec", "history").stdout

    done = cli(redis_server, "spec", "rollback", "1")
    assert done.returncode == 0, done.stderr
    assert "applied revision 3 (the spec of revision 1)" in done.stdout
    assert "+ pool small" in done.stdout and "- pool big (drained)" in done.stdout
    await wait_event(redis, "spec.applied", revision=3)
    await wait_ready(redis, "small", 1)

    async def big_drained():
        return not await ready_ids(redis, "big")

    await eventually(big_drained, what="pool big drained")

    missing = cli(redis_server, "spec", "rollback", "99")
    assert missing.returncode == 2 and "not in the history (kept: 1, 2, 3)" in missing.stderr


async def test_check_health_follows_the_heartbeat(redis, redis_server, daemon_factory):
    assert cli(redis_server, "check-health").returncode == 3
    daemon = daemon_factory().start()

    async def healthy():
        done = cli(redis_server, "check-health")
        return done if done.returncode == 0 else None

    assert (await eventually(healthy, what="a fresh heartbeat")).stdout.startswith("OK:")
    stale = cli(redis_server, "check-health", "--max-age", "0")
    assert stale.returncode == 3 and "UNHEALTHY" in stale.stdout
    daemon.stop()
    assert cli(redis_server, "check-health").returncode == 3
