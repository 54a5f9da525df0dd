"""The e2b provider, end to end through the real e2b SDK, against the fake E2B on loopback."""

import itertools
import json
import time

from sandboxd.client import Client
from sandboxd.store.records import SandboxRecord, SandboxStore
from tests.support import (
    E2B_TEST_KEY,
    KEYS,
    apply,
    cli,
    events_of,
    eventually,
    wait_event,
    wait_ready,
)


def e2b_pool(name: str = "cloud", **extra) -> dict:
    return {
        "name": name,
        "provider": "e2b",
        "min_ready": 2,
        "max_total": 4,
        "health": {"command": "test -d /", "interval_s": 0.5},
        **extra,
    }


def e2b_settings(fake, **extra) -> dict:
    return {"api_url": fake.url, "sandbox_url": fake.url, "list_interval_s": 0.5, **extra}


def client_endpoints(fake) -> dict:
    """A client's own E2B endpoints (a record's are never used)."""
    return {"e2b": {"api_url": fake.url, "sandbox_url": fake.url}}


def cli_endpoints(fake) -> dict:
    """The CLI's own E2B endpoints, as its config would set them."""
    return {"SANDBOXD_E2B__API_URL": fake.url, "SANDBOXD_E2B__SANDBOX_URL": fake.url}


async def records(redis, pool: str) -> list:
    return [r for r in await SandboxStore(redis, KEYS).records() if r.pool == pool]


async def test_an_e2b_pool_fills_and_sandboxd_exec_runs_a_command_through_the_sdk(
    redis, redis_server, daemon_factory, fake_e2b
):
    daemon = daemon_factory(e2b=e2b_settings(fake_e2b))
    daemon.env["E2B_API_KEY"] = E2B_TEST_KEY
    daemon.start()
    await apply(redis, [e2b_pool(labels={"team": "research"})])
    ids = await wait_ready(redis, "cloud", 2)

    ours = {s.metadata["sandboxd-id"]: s for s in fake_e2b.ours()}
    assert set(ours) == set(ids)
    meta = ours[ids[0]].metadata
    assert meta["sandboxd-pool"] == "cloud" and meta["team"] == "research"
    assert meta["sandboxd-rev"] == "1" and meta["sandboxd-instance"]

    done = cli(
        redis_server,
        "exec",
        "cloud",
        "--",
        "sh",
        "-c",
        "echo hello from $E2B_SANDBOX_ID; exit 3",
        env=cli_endpoints(fake_e2b),  # no E2B key: the claim gives what is needed
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout.startswith("hello from i")  # the fake's sandbox ids start with "i"


async def test_claims_of_an_e2b_pool_work_as_for_local_pools(fake_e2b, redis, embedded_daemon):
    await embedded_daemon(e2b=e2b_settings(fake_e2b, api_key=E2B_TEST_KEY))
    await apply(redis, [e2b_pool(lease_s=120)])
    await wait_ready(redis, "cloud", 2)

    async with (
        Client(redis, endpoints=client_endpoints(fake_e2b)) as client,
        client.claim("cloud", lease_s=90) as sandbox,
    ):
        result = await sandbox.exec(["python3", "-c", "import sys; print(6*7, file=sys.stderr)"])
        assert (result.exit_code, result.stderr) == (0, b"42\n")
        await sandbox.write("notes.txt", "kept")
        assert await sandbox.read("notes.txt") == b"kept"
        piped = await sandbox.exec("tr a-z A-Z", stdin=b"shout")
        assert piped.stdout == b"SHOUT"
        e2b_id = sandbox.connection_info["e2b_id"]
        # The claim's lease (and a few seconds' grace) is the sandbox's timeout on E2B too.
        left = await eventually(
            lambda: _seconds_left(fake_e2b, e2b_id), what="E2B timeout set to the lease"
        )
        assert left
    await wait_event(redis, "sandbox.terminated", sandbox=sandbox.id, reason="released")
    await eventually(lambda: _gone(fake_e2b, e2b_id), what="released sandbox killed on E2B")
    await wait_ready(redis, "cloud", 2)


async def _seconds_left(fake, e2b_id: str) -> float | None:
    sandbox = fake.world.sandboxes.get(e2b_id)
    left = sandbox.end_at - time.time() if sandbox else None
    return left if left and 60 < left <= 96 else None  # the lease's 90 s and the grace


async def _gone(fake, e2b_id: str) -> bool:
    return e2b_id not in fake.world.sandboxes


async def test_ready_sandboxes_outlive_many_e2b_timeouts(fake_e2b, redis, embedded_daemon):
    await embedded_daemon(e2b=e2b_settings(fake_e2b, api_key=E2B_TEST_KEY))
    await apply(redis, [e2b_pool(e2b={"timeout_s": 2})])
    first = set(await wait_ready(redis, "cloud", 2))
    created = {s.id: s.started_at for s in fake_e2b.ours()}

    async def four_timeouts_later():
        return time.time() - min(created.values()) > 4 * 2

    await eventually(four_timeouts_later, timeout=30, what="four E2B timeouts to pass")
    assert set(await wait_ready(redis, "cloud", 2)) == first
    assert {s.id for s in fake_e2b.ours()} == set(created)  # the same sandboxes on E2B
    assert fake_e2b.ledger.expired == []
    extended = {sandbox_id for sandbox_id, _ in fake_e2b.ledger.set_timeouts}
    assert extended == set(created) and len(fake_e2b.ledger.set_timeouts) >= 2 * 6
    assert not await events_of(redis, "sandbox.terminated")


async def test_recycle_replaces_ready_sandboxes_before_they_expire(
    fake_e2b, redis, embedded_daemon
):
    await embedded_daemon(e2b=e2b_settings(fake_e2b, api_key=E2B_TEST_KEY))
    await apply(redis, [e2b_pool(e2b={"timeout_s": 3, "keepalive": "recycle"})])
    first = set(await wait_ready(redis, "cloud", 2))

    async def all_replaced():
        ready = set(await wait_ready(redis, "cloud", 2))
        return ready if not ready & first else None

    await eventually(all_replaced, timeout=30, what="the first sandboxes recycled")
    assert fake_e2b.ledger.expired == []
    assert fake_e2b.ledger.set_timeouts == []
    recycled = await events_of(redis, "sandbox.terminated")
    assert {e["data"]["reason"] for e in recycled} == {"idle_ttl"}


async def test_a_restarted_daemon_adopts_e2b_sandboxes_found_by_their_metadata(
    fake_e2b, redis, daemon_factory
):
    settings = {"e2b": e2b_settings(fake_e2b), "on_shutdown": "keep"}
    first = daemon_factory(**settings)
    first.env["E2B_API_KEY"] = E2B_TEST_KEY
    first.start()
    await apply(redis, [e2b_pool()])
    ids = set(await wait_ready(redis, "cloud", 2))
    first.signal(9)  # no goodbye: the sandboxes stay on E2B, their records in Redis
    first.wait()

    second = daemon_factory(**settings)
    second.env["E2B_API_KEY"] = E2B_TEST_KEY
    second.start()
    started = await wait_event(redis, "daemon.started", adopted=2)
    assert started["data"]["adopted"] == 2
    assert set(await wait_ready(redis, "cloud", 2)) == ids
    assert len(fake_e2b.ours()) == 2
    assert not await events_of(redis, "sandbox.creating", "sandbox.leaked") or all(
        e["sandbox"] in ids for e in await events_of(redis, "sandbox.creating")
    )


async def test_the_janitor_kills_labelled_strays_and_vanished_sandboxes_are_replaced(
    fake_e2b, redis, embedded_daemon
):
    await embedded_daemon(e2b=e2b_settings(fake_e2b, api_key=E2B_TEST_KEY), janitor_interval_s=0.5)
    await apply(redis, [e2b_pool()])
    ids = await wait_ready(redis, "cloud", 2)

    # A sandbox with our labels that Redis has never heard of (a create whose record was
    # lost): the janitor finds it through the metadata listing and kills it.
    stray = fake_e2b.call(
        lambda world: (
            world.new_sandbox(
                "base",
                300,
                {"sandboxd": "sandboxd", "sandboxd-id": "sb-stray", "sandboxd-pool": "cloud"},
                {},
            ).id
        )
    )
    leaked = await wait_event(redis, "sandbox.leaked", sandbox="sb-stray")
    assert leaked["data"]["provider"] == "e2b"
    assert stray in fake_e2b.ledger.killed

    # Someone else's sandbox on the same account (no `sandboxd` label) is left alone.
    foreign = fake_e2b.call(lambda world: world.new_sandbox("base", 300, {"owner": "bob"}, {}).id)

    # A ready sandbox that vanishes on E2B's side is recorded as lost and replaced.
    victim = await SandboxStore(redis, KEYS).get(ids[0])
    fake_e2b.vanish(victim.handle["e2b_id"])
    lost = await wait_event(redis, "sandbox.terminated", sandbox=victim.id)
    assert lost["data"]["reason"] == "lost"
    await wait_event(redis, "recovery.succeeded", old=victim.id)
    await wait_ready(redis, "cloud", 2)
    assert foreign in fake_e2b.world.sandboxes


async def test_a_lost_create_response_is_retried_without_a_duplicate(
    fake_e2b, redis, embedded_daemon
):
    await embedded_daemon(e2b=e2b_settings(fake_e2b, api_key=E2B_TEST_KEY))
    fake_e2b.faults.lose_create_responses = 1
    await apply(redis, [e2b_pool(min_ready=1)])
    await wait_ready(redis, "cloud", 1)
    failed = await events_of(redis, "sandbox.create_failed")
    assert len(failed) == 1 and failed[0]["data"]["will_retry"]
    assert len(fake_e2b.ours()) == 1  # the retry got the same sandbox back


def _max_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    return max((sum(1 for u in times if t <= u < t + window) for t in times), default=0)


async def test_429_storms_and_503s_converge_at_the_configured_rate(redis, embedded_daemon):
    from tests.e2b_fake import FakeE2B

    # The account allows 4 creates/s; the daemon is configured for 2/s, burst 2.
    with FakeE2B(api_key=E2B_TEST_KEY, creates_per_s=4, burst=4) as fake:
        fake.faults.create_errors = [(429, "storm", {"Retry-After": "1"})]
        fake.faults.errors_left = 6
        settings = e2b_settings(fake, api_key=E2B_TEST_KEY, creates_per_s=2, creates_burst=2)
        daemon = await embedded_daemon(e2b=settings, create_attempts=5)
        await apply(redis, [e2b_pool(min_ready=6, max_total=8, max_surge=8)])
        await wait_ready(redis, "cloud", 6, timeout=60)

        # The storm was honoured: after each injected 429 the next create came no
        # sooner than its Retry-After, and events show the pause the daemon took.
        creates = fake.ledger.creates()
        for (t429, status), (t_next, _) in itertools.pairwise(creates):
            if status == 429:
                assert t_next - t429 >= 0.95
        failed = await events_of(redis, "sandbox.create_failed")
        assert failed and all(e["data"]["retryable"] for e in failed)
        assert any((e["data"]["retry_after_s"] or 0) >= 1 for e in failed)
        # The daemon itself never set off the account's rate limit.
        assert fake.ledger.rate_limited == 0
        ok_times = [t for t, status in creates if status == 201]
        # A bucket of 2 refilled at 2/s allows at most 2 + 2 creates in any 1 s window.
        assert _max_in_window(ok_times, 1.0) <= 4

        # 503s (no capacity) are retried the same way.
        fake.faults.create_errors = [(503, "no capacity", {})]
        fake.faults.errors_left = 3
        await apply(redis, [e2b_pool(min_ready=8, max_total=8, max_surge=8)])
        await wait_ready(redis, "cloud", 8, timeout=60)
        assert daemon.providers["e2b"].limiter.throttles >= 2
        await stop_daemon(daemon, redis)  # while this fake still answers its terminates
        assert not fake.ours()


async def stop_daemon(daemon, redis) -> None:
    """Stop an embedded daemon and wait until its stop is done (`daemon.stopping` comes
    after the terminations; its heartbeat key expires long before on a loaded machine)."""
    daemon.stop.set()
    await wait_event(redis, "daemon.stopping", timeout=60, instance=daemon.instance)


async def test_a_bad_api_key_fails_the_pool_after_a_bounded_number_of_attempts(
    fake_e2b, redis, redis_server, embedded_daemon
):
    await embedded_daemon(e2b=e2b_settings(fake_e2b, api_key="e2b_wrong"))
    await apply(redis, [e2b_pool(breaker={"cooldown_s": 0.3})])
    failed = await wait_event(redis, "pool.failed", pool="cloud")
    assert "401" in failed["data"]["reason"]

    # No retry storm: two attempts (the first opens the breaker, the trial confirms it).
    posts = fake_e2b.ledger.creates()
    assert len(posts) == 2 and {s for _, s in posts} == {401}

    async def failed_in_status():
        pool = _pool_status(cli(redis_server, "status", "-o", "json").stdout, "cloud")
        return pool if pool.get("state") == "failed" else None

    pool = await eventually(failed_in_status, what="status shows the pool failed")
    assert "401" in pool["failed_reason"]
    table = cli(redis_server, "status").stdout
    assert "failed" in table and "401" in table


async def test_an_unknown_template_fails_the_pool_and_a_fixed_spec_recovers_it(
    fake_e2b, redis, embedded_daemon
):
    await embedded_daemon(e2b=e2b_settings(fake_e2b, api_key=E2B_TEST_KEY))
    await apply(redis, [e2b_pool(template="no-such", breaker={"cooldown_s": 0.3})])
    failed = await wait_event(redis, "pool.failed", pool="cloud")
    assert "template 'no-such' not found" in failed["data"]["reason"]
    assert len(fake_e2b.ledger.creates()) == 2

    await apply(redis, [e2b_pool(template="base", breaker={"cooldown_s": 0.3})])
    await wait_ready(redis, "cloud", 2)


def _pool_status(text: str, name: str) -> dict:
    status = json.loads(text)
    return (status.get("daemon") or {}).get("pools", {}).get(name, {})


async def test_the_api_key_appears_in_no_log_event_status_or_redis_key(
    fake_e2b, redis, redis_server, daemon_factory, tmp_path
):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "e2b_api_key").write_text(E2B_TEST_KEY + "\n")
    # As under systemd's LoadCredential=: a relative file name in $CREDENTIALS_DIRECTORY.
    daemon = daemon_factory(
        e2b=e2b_settings(fake_e2b, api_key_file="e2b_api_key"), log_level="DEBUG"
    )
    daemon.env["CREDENTIALS_DIRECTORY"] = str(credentials)
    daemon.start()
    await apply(
        redis,
        [e2b_pool(), e2b_pool("broken", template="nope", min_ready=1, breaker={"cooldown_s": 0.3})],
    )
    await wait_ready(redis, "cloud", 2)
    await wait_event(redis, "pool.failed", pool="broken")
    done = cli(
        redis_server,
        "exec",
        "cloud",
        "--",
        "true",
        env=cli_endpoints(fake_e2b),  # no E2B key: the claim gives what is needed
    )
    assert done.returncode == 0, done.stderr

    texts = [
        daemon.log_path.read_text(),
        cli(redis_server, "status").stdout,
        cli(redis_server, "status", "-o", "json").stdout,
        cli(redis_server, "events", "-n", "1000", "-o", "json").stdout,
        cli(redis_server, "get", "sandboxes", "-o", "json").stdout,
        done.stdout + done.stderr,
    ]
    for key in await redis.keys("*"):
        kind = await redis.type(key)
        if kind == "string":
            texts.append(await redis.get(key))
        elif kind == "hash":
            texts.append(str(await redis.hgetall(key)))
        elif kind == "stream":
            texts.append(str(await redis.xrange(key)))
        elif kind == "list":
            texts.append(str(await redis.lrange(key, 0, -1)))
    assert len(texts) > 8 and "pool.failed" in texts[3]
    for text in texts:
        assert E2B_TEST_KEY not in text
        assert E2B_TEST_KEY[4:20] not in text  # nor a recognisable part of it


async def test_idle_pause_keeps_ready_sandboxes_paused_until_a_claim_resumes_one(
    fake_e2b, redis, embedded_daemon
):
    await embedded_daemon(e2b=e2b_settings(fake_e2b, api_key=E2B_TEST_KEY))
    pool = e2b_pool(e2b={"idle": "pause"}, health={"command": "true", "interval_s": 0.2})
    await apply(redis, [pool])
    ids = set(await wait_ready(redis, "cloud", 2))
    assert {s.state for s in fake_e2b.ours()} == {"paused"}

    async def probed_a_few_times():
        checks = [r.health_checks for r in await records(redis, "cloud")]
        return all(len(c) >= 3 for c in checks) and len(checks) == 2

    await eventually(probed_a_few_times, what="paused sandboxes probed")
    assert {s.state for s in fake_e2b.ours()} == {"paused"}  # probes never woke them
    assert set(await wait_ready(redis, "cloud", 2)) == ids

    async with (
        Client(redis, endpoints=client_endpoints(fake_e2b)) as client,
        client.claim("cloud", lease_s=90) as sandbox,
    ):
        assert (await sandbox.exec("echo awake")).stdout == b"awake\n"
        e2b_id = sandbox.connection_info["e2b_id"]
        assert fake_e2b.world.sandboxes[e2b_id].state == "running"
        left = fake_e2b.world.sandboxes[e2b_id].end_at - time.time()
        assert 60 < left <= 96  # resumed with the lease (and its grace) as its timeout


async def test_get_sandboxes_shows_the_e2b_id_and_started_counts_orphans_apart(
    fake_e2b, redis, redis_server, embedded_daemon
):
    # Before the daemon starts: a sandbox of ours on E2B that Redis has no record of (an
    # orphan), and a record whose sandbox E2B no longer has (dropped).
    fake_e2b.call(
        lambda world: world.new_sandbox(
            "base", 300, {"sandboxd": "sandboxd", "sandboxd-id": "sb-orphan"}, {}
        )
    )
    gone = SandboxRecord(
        id="sb-gone", pool="cloud", provider="e2b", state="ready", template="base",
        spec_revision=1, instance="old", handle={"e2b_id": "inothere"},
    )  # fmt: skip
    await SandboxStore(redis, KEYS).add(gone)
    await embedded_daemon(e2b=e2b_settings(fake_e2b, api_key=E2B_TEST_KEY))
    started = await wait_event(redis, "daemon.started")
    assert started["data"]["dropped"] == 1
    assert started["data"]["orphans"] == 1
    assert started["data"]["adopted"] == 0

    await apply(redis, [e2b_pool()])
    ids = await wait_ready(redis, "cloud", 2)
    e2b_ids = {s.metadata["sandboxd-id"]: s.id for s in fake_e2b.ours()}
    rows = json.loads(cli(redis_server, "get", "sandboxes", "-o", "json").stdout)
    assert {r["id"]: r["provider_id"] for r in rows} == {i: e2b_ids[i] for i in ids}
    table = cli(redis_server, "get", "sandboxes").stdout.splitlines()
    assert "PROVIDER_ID" in table[0].split()
    for sandbox_id in ids:
        line = next(line for line in table if line.startswith(sandbox_id))
        assert e2b_ids[sandbox_id] in line.split()


async def test_the_tick_asks_e2b_once_for_every_sandbox_and_still_finds_the_lost(
    fake_e2b, redis, embedded_daemon
):
    """E2B says which sandboxes live from one listing (`Listed`): the tick's liveness check
    asks it once for all of them, not once per sandbox (10,000 awaits every tick at scale),
    and asks one by one only what the listing says is gone."""
    daemon = await embedded_daemon(e2b=e2b_settings(fake_e2b, api_key=E2B_TEST_KEY))
    await apply(redis, [e2b_pool(min_ready=3, max_total=3)])
    ids = await wait_ready(redis, "cloud", 3)
    provider = daemon.wings.reconciler._providers["e2b"]
    one_by_one: list[str] = []
    batches: list[set[str]] = []
    is_alive, gone_among = provider.is_alive, provider.gone_among

    async def counting_is_alive(sandbox_id, handle):
        one_by_one.append(sandbox_id)
        return await is_alive(sandbox_id, handle)

    async def counting_gone_among(sandbox_ids):
        batches.append(set(sandbox_ids))
        return await gone_among(sandbox_ids)

    provider.is_alive, provider.gone_among = counting_is_alive, counting_gone_among
    await eventually(lambda: _at_least(batches, 3), what="three ticks' liveness checks")
    assert one_by_one == [] and set(ids) in batches

    victim = await SandboxStore(redis, KEYS).get(ids[0])
    fake_e2b.vanish(victim.handle["e2b_id"])
    lost = await wait_event(redis, "sandbox.terminated", sandbox=victim.id)
    assert lost["data"]["reason"] == "lost"
    assert set(one_by_one) == {victim.id}  # confirmed one by one, the others not asked
    await wait_ready(redis, "cloud", 3)


async def _at_least(items: list, n: int) -> bool:
    return len(items) >= n
