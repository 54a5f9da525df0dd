"""A claimed E2B sandbox's own timeout follows its lease: for the whole lease, however much
longer than the plan's longest timeout (`e2b.max_timeout_s`), and within a second of a renew.

The plan's cap is made small (3 s) on both sides, the fake E2B's account and the daemon's
config, so a lease three times as long takes seconds, not hours."""

import time

from sandboxd.client import Client
from tests.support import E2B_TEST_KEY, apply, events_of, eventually, wait_event, wait_ready

from .test_e2b import client_endpoints, e2b_pool, e2b_settings, stop_daemon

CAP_S = 3


async def test_a_lease_longer_than_max_timeout_keeps_its_sandbox_for_the_whole_lease(
    redis, embedded_daemon
):
    from tests.e2b_fake import FakeE2B

    with FakeE2B(api_key=E2B_TEST_KEY, max_timeout_s=CAP_S) as fake:
        daemon = await embedded_daemon(e2b=e2b_settings(fake, api_key=E2B_TEST_KEY))
        # The plan's cap, as the config would say it (validation keeps it >= 60 s there).
        daemon.config.e2b.max_timeout_s = CAP_S
        lease_s = 3 * CAP_S
        pool = e2b_pool(min_ready=1, max_total=2, lease_s=lease_s, e2b={"timeout_s": CAP_S})
        await apply(redis, [pool])
        await wait_ready(redis, "cloud", 1)

        async with Client(redis, endpoints=client_endpoints(fake)) as client:
            sandbox = await client.claim("cloud")
            claimed_at = time.time()
            e2b_id = sandbox.connection_info["e2b_id"]

            async def gone_or_expired():
                found = await events_of(redis, "sandbox.lease_expired", "sandbox.terminated")
                return next((e for e in found if e["sandbox"] == sandbox.id), None)

            ended = await eventually(gone_or_expired, timeout=lease_s + 10, what="lease end")
            assert ended["type"] == "sandbox.lease_expired", ended["data"]
            assert time.time() - claimed_at >= lease_s - 0.5
            terminated = await wait_event(redis, "sandbox.terminated", sandbox=sandbox.id)
            assert terminated["data"]["reason"] == "lease_expired"
        assert e2b_id not in fake.ledger.expired  # E2B never killed it first
        timeouts = [t for sid, t in fake.ledger.set_timeouts if sid == e2b_id]
        assert len(timeouts) >= 3 and max(timeouts) <= CAP_S  # steps of at most the cap
        await stop_daemon(daemon, redis)  # while this fake still answers


async def test_a_renew_reaches_e2b_within_a_second(fake_e2b, redis, embedded_daemon):
    await embedded_daemon(e2b=e2b_settings(fake_e2b, api_key=E2B_TEST_KEY))
    # A 300 s E2B timeout: the keepalive's periodic round comes every 5 s.
    await apply(redis, [e2b_pool(min_ready=1, lease_s=60, max_lease_s=600)])
    await wait_ready(redis, "cloud", 1)

    def left(e2b_id: str) -> float:
        return fake_e2b.world.sandboxes[e2b_id].end_at - time.time()

    async with (
        Client(redis, endpoints=client_endpoints(fake_e2b)) as client,
        client.claim("cloud") as sandbox,
    ):
        e2b_id = sandbox.connection_info["e2b_id"]

        # The lease and a few seconds' grace for the daemon to end it (LEASE_GRACE_S).
        async def follows_the_claim():
            return 60 < left(e2b_id) <= 66

        await eventually(follows_the_claim, timeout=10, what="E2B timeout set to the lease")
        await sandbox.renew(300)
        renewed_at = time.monotonic()

        async def follows_the_renew():
            return 300 < left(e2b_id) <= 306

        await eventually(follows_the_renew, timeout=1.0, what="the renew on E2B")
        assert time.monotonic() - renewed_at < 1.0
        await sandbox.renew(30)  # shorter: E2B's timeout comes in too

        async def follows_the_shorter_lease():
            return 30 < left(e2b_id) <= 36

        await eventually(follows_the_shorter_lease, timeout=1.0, what="the shorter lease")
