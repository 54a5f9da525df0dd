"""`reuse: reset` on E2B pools, against the fake E2B whose envd runs commands in a shell with
E2B's environment (HOME=/home/user, a private /tmp, no TMPDIR)."""

from sandboxd.client import Client
from tests.support import E2B_TEST_KEY, apply, events_of, eventually, wait_event, wait_ready

from .test_e2b import client_endpoints, e2b_pool, e2b_settings

SECRET = "pool-secret-value-0123456789"


def _files(fake, e2b_id: str) -> list[str]:
    sandbox = fake.world.sandboxes[e2b_id]
    return sorted(
        str(p.relative_to(sandbox.workdir))
        for d in (sandbox.home, sandbox.tmp)
        for p in d.rglob("*")
    )


async def _reset_or_ended(redis, sandbox_id: str) -> dict | None:
    found = await events_of(redis, "sandbox.reset", "sandbox.terminated")
    return next((e for e in found if e["sandbox"] == sandbox_id), None)


async def test_the_default_reset_command_wipes_an_e2b_sandbox_and_keeps_it(
    fake_e2b, redis, embedded_daemon
):
    await embedded_daemon(e2b=e2b_settings(fake_e2b, api_key=E2B_TEST_KEY))
    await apply(redis, [e2b_pool(min_ready=1, max_total=1, reuse="reset")])
    await wait_ready(redis, "cloud", 1)

    async with Client(redis, endpoints=client_endpoints(fake_e2b)) as client:
        async with client.claim("cloud", lease_s=60) as sandbox:
            done = await sandbox.exec(
                'echo "$TMPDIR" && mkdir -p "$HOME/a/b" && touch "$HOME/a/b/f" "$HOME/.hidden" '
                "/tmp/left-behind && echo ok"
            )
            assert done.stdout == b"\nok\n", done.stderr  # E2B sets no TMPDIR
            e2b_id = sandbox.connection_info["e2b_id"]
            assert len(_files(fake_e2b, e2b_id)) == 5

        reset = await eventually(lambda: _reset_or_ended(redis, sandbox.id), what="reset")
        assert reset["type"] == "sandbox.reset", reset["data"]
        assert reset["data"]["uses"] == 1
        assert _files(fake_e2b, e2b_id) == []  # $HOME and /tmp are empty again
        assert await wait_ready(redis, "cloud", 1) == [sandbox.id]  # the same sandbox
        async with client.claim("cloud", lease_s=60) as again:
            assert again.id == sandbox.id
            assert (await again.exec("ls -A ~ /tmp")).stdout == b"/home/user:\n\n/tmp:\n"


async def test_a_failed_reset_says_why_with_the_commands_stderr_bounded_and_redacted(
    fake_e2b, redis, embedded_daemon
):
    await embedded_daemon(e2b=e2b_settings(fake_e2b, api_key=E2B_TEST_KEY))
    reset = (
        'echo "cannot wipe: first line" >&2; echo "the pool secret: $API_SECRET" >&2; '
        "head -c 100000 /dev/zero | tr '\\0' x >&2; echo >&2; echo 'the last words' >&2; exit 7"
    )
    pool = e2b_pool(
        min_ready=1, max_total=1, reuse="reset", reset_command=reset, env={"API_SECRET": SECRET}
    )
    await apply(redis, [pool])
    await wait_ready(redis, "cloud", 1)

    async with Client(redis, endpoints=client_endpoints(fake_e2b)) as client:
        async with client.claim("cloud", lease_s=60) as sandbox:
            assert (await sandbox.exec("echo $API_SECRET")).stdout == SECRET.encode() + b"\n"

    ended = await wait_event(redis, "sandbox.terminated", sandbox=sandbox.id)
    assert ended["data"]["reason"] == "reset_failed"
    error = ended["data"]["error"]
    assert "exited 7" in error and "the last words" in error  # not only the first line
    assert 200 < len(error) <= 2000  # bounded, whatever the command wrote
    assert SECRET not in error and E2B_TEST_KEY not in error
