"""`run:` in E2B sandboxes: the supervisor uploaded and started through envd, its news read
back from its journal, against the fake E2B (real processes, envd's process service)."""

import signal

import psutil
import pytest
from e2b import AsyncSandbox

from sandboxd.client import Client
from sandboxd.providers.e2b import program
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

from .test_e2b import client_endpoints, e2b_pool, e2b_settings

# The bot, faster: five lines, then exit 1.
CRASHING_BOT = (
    "import sys, time\n"
    "for i in range(1, 6):\n"
    "    print(f'line {i}')\n"
    "    time.sleep(0.01)\n"
    "sys.exit(1)\n"
)
COUNTING_BOT = "import time\ni = 0\nwhile True:\n    i += 1\n    print(i)\n    time.sleep(0.02)\n"
# 3,000 lines at once: its numbers run ahead of the clock the next run's start from.
BURST_BOT = "import time\nfor i in range(3000):\n    print(i)\nprint('up')\ntime.sleep(1000)\n"


def bot(text: str, **extra) -> dict:
    return {"command": "python3 -u bot.py", "files": {"bot.py": text}, **extra}


def settings(fake) -> dict:
    return {"agent_poll_interval_s": 0.1, "e2b": e2b_settings(fake, api_key=E2B_TEST_KEY)}


async def agent_events(redis, sandbox: str) -> list[dict]:
    return [e for e in await events_of(redis) if e["sandbox"] == sandbox and "agent." in e["type"]]


async def log_lines(redis, sandbox: str) -> list[str]:
    return [f["line"] for _, f in await redis.xrange(KEYS.sandbox_logs(sandbox))]


def e2b_id_of(fake, sandbox: str) -> str:
    (found,) = [s for s in fake.ours() if s.metadata["sandboxd-id"] == sandbox]
    return found.id


def programs(fake, e2b_id: str) -> list[psutil.Process]:
    """The sandbox's python3 processes running bot.py (not the shells around them)."""
    sandbox = fake.world.sandboxes[e2b_id]
    return [
        p
        for p in fake.call(lambda _: sandbox.members())
        if p.name().startswith("python") and "bot.py" in p.cmdline()
    ]


async def test_a_crashing_bot_in_e2b_is_restarted_with_backoff_then_failed_and_replaced(
    fake_e2b, redis, redis_server, embedded_daemon
):
    await embedded_daemon(**settings(fake_e2b))
    run = bot(CRASHING_BOT, restart="on-failure", backoff_s=0.05, max_restarts=2)
    await apply(redis, [e2b_pool(min_ready=1, max_total=2, run=run)])
    (first,) = await wait_ready(redis, "cloud", 1)
    e2b_id = e2b_id_of(fake_e2b, first)

    failed = await wait_event(redis, "agent.failed", sandbox=first)
    assert "exited with 1 after 2 restarts" in failed["data"]["reason"]
    mine = await agent_events(redis, first)
    assert [e["type"] for e in mine] == ["agent.started", "agent.exited"] + [
        "agent.restarting",
        "agent.started",
        "agent.exited",
    ] * 2 + ["agent.failed"]
    assert [e["data"]["exit_code"] for e in mine if e["type"] == "agent.exited"] == [1, 1, 1]
    delays = [e["data"]["delay_s"] for e in mine if e["type"] == "agent.restarting"]
    assert 0.025 <= delays[0] <= 0.05 and 0.05 <= delays[1] <= 0.1  # doubled, jittered

    done = await wait_event(redis, "recovery.succeeded", old=first)
    started = await wait_event(redis, "recovery.started", sandbox=first)
    assert "agent failed" in started["data"]["detail"]
    new = done["data"]["new"]
    assert new != first
    await wait_event(redis, "agent.started", sandbox=new)  # the replacement runs the bot
    assert e2b_id not in {s.id for s in fake_e2b.ours()}  # the failed one is gone from E2B

    logs = cli(redis_server, "logs", first)  # kept after the sandbox is gone
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout.splitlines() == [f"line {i}" for i in range(1, 6)] * 3


async def test_kill_9_of_the_daemon_loses_and_repeats_no_line_of_an_e2b_program(
    fake_e2b, redis, daemon_factory
):
    config = {**settings(fake_e2b), "lease_ttl_s": 1, "agent_log_lines": 100_000}
    first = daemon_factory(**config)
    first.env["E2B_API_KEY"] = E2B_TEST_KEY
    first.start()
    await apply(redis, [e2b_pool(min_ready=1, max_total=1, run=bot(COUNTING_BOT))])
    (sandbox,) = await wait_ready(redis, "cloud", 1)
    journal = fake_e2b.world.sandboxes[e2b_id_of(fake_e2b, sandbox)].tmp / ".sandboxd/journal"

    await eventually(lambda: _at_least(redis, sandbox, 20), what="20 lines copied")
    first.signal(signal.SIGKILL)
    first.wait()
    copied = len(await log_lines(redis, sandbox))

    def printed() -> int:
        return sum(1 for line in journal.read_text().splitlines() if line.startswith("["))

    async def went_on() -> bool:
        return printed() > copied + 25

    await eventually(went_on, what="output while no daemon runs")
    missed = printed()

    second = daemon_factory(**config)
    second.env["E2B_API_KEY"] = E2B_TEST_KEY
    second.start()
    await eventually(lambda: _at_least(redis, sandbox, missed + 10), what="the log to go on")
    numbers = [int(line) for line in await log_lines(redis, sandbox)]
    assert numbers == list(range(1, len(numbers) + 1))  # no gap, no repeat
    starts = [e for e in await agent_events(redis, sandbox) if e["type"] == "agent.started"]
    assert len(starts) == 1  # the program ran on through the daemon's restart


async def _at_least(redis, sandbox: str, count: int) -> bool:
    return len(await log_lines(redis, sandbox)) >= count


async def test_a_reset_restarts_the_e2b_program_and_leaves_no_old_copy_running(
    fake_e2b, redis, embedded_daemon
):
    await embedded_daemon(**settings(fake_e2b), agent_log_lines=10_000)
    pool = e2b_pool(min_ready=1, max_total=1, reuse="reset", run=bot(BURST_BOT))
    await apply(redis, [pool])
    (sandbox,) = await wait_ready(redis, "cloud", 1)
    e2b_id = e2b_id_of(fake_e2b, sandbox)
    await eventually(lambda: _at_least(redis, sandbox, 3001), what="the program's first run")

    async with Client(redis, endpoints=client_endpoints(fake_e2b)) as client:
        async with client.claim("cloud", lease_s=60) as claimed:
            assert claimed.id == sandbox
            listed = await claimed.exec("ls -A ~")
            assert listed.stdout == b"bot.py\n"  # the pool's file; the supervisor is in /tmp

    reset = await wait_event(redis, "sandbox.reset", sandbox=sandbox)
    assert reset["data"]["uses"] == 1
    await eventually(lambda: _at_least(redis, sandbox, 6002), what="the program's second run")
    expected = [str(i) for i in range(3000)] + ["up"]
    assert await log_lines(redis, sandbox) == expected * 2  # numbered past the first run
    starts = [e for e in await agent_events(redis, sandbox) if e["type"] == "agent.started"]
    assert len(starts) == 2
    assert len(programs(fake_e2b, e2b_id)) == 1  # the first run was killed by the reset


async def test_a_paused_e2b_sandbox_freezes_its_program_and_a_claim_thaws_it(
    fake_e2b, redis, embedded_daemon
):
    await embedded_daemon(**settings(fake_e2b))
    pool = e2b_pool(min_ready=1, max_total=1, e2b={"idle": "pause"}, run=bot(COUNTING_BOT))
    await apply(redis, [pool])
    (sandbox,) = await wait_ready(redis, "cloud", 1)
    e2b_id = e2b_id_of(fake_e2b, sandbox)
    members = fake_e2b.call(lambda world: world.sandboxes[e2b_id].members())
    assert len(members) >= 3  # the supervisor, the shell of `run.command`, maybe the bot

    async def frozen() -> bool:  # (one in the middle of a disk write stops once it is done)
        return {p.status() for p in members} == {psutil.STATUS_STOPPED}

    await eventually(frozen, timeout=5, what="every process of the sandbox stopped, not killed")
    assert await log_lines(redis, sandbox) == []  # a paused sandbox is not woken to ask

    async with Client(redis, endpoints=client_endpoints(fake_e2b)) as client:
        async with client.claim("cloud", lease_s=60) as claimed:
            await claimed.exec("true")  # runs once the daemon has resumed it
            await eventually(lambda: _at_least(redis, sandbox, 10), what="lines after thaw")
            numbers = [int(line) for line in await log_lines(redis, sandbox)]
            assert numbers == list(range(1, len(numbers) + 1))  # it went on where it stopped
            assert all(p.status() != psutil.STATUS_STOPPED for p in members)
    starts = [e for e in await agent_events(redis, sandbox) if e["type"] == "agent.started"]
    assert len(starts) == 1


async def test_the_fake_envd_keeps_a_command_past_its_stream_as_envd_does(fake_e2b):
    """What the provider relies on, checked on the fake with the real SDK: a background
    command outlives the stream that started it, is listed, can be connected to again,
    and its request timeout (0: none) ends it."""
    sandbox = await AsyncSandbox.create(
        api_key=E2B_TEST_KEY, api_url=fake_e2b.url, sandbox_url=fake_e2b.url
    )
    handle = await sandbox.commands.run(
        "sleep 0.3; echo one; sleep 0.3; echo two", background=True, timeout=0
    )
    await handle.disconnect()
    assert handle.pid in [p.pid for p in await sandbox.commands.list()]
    again = await sandbox.commands.connect(handle.pid)
    assert (await again.wait()).stdout.endswith("two\n")

    short = await sandbox.commands.run("sleep 60", background=True, timeout=1)
    await short.disconnect()

    async def ended() -> bool:
        return short.pid not in [p.pid for p in await sandbox.commands.list()]

    await eventually(ended, timeout=10, what="envd to end a command at its timeout")

    # What the daemon takes from a command in a sandbox is bounded as it streams in.
    with pytest.raises(program.OutputTooLarge):
        await program.run_bounded(sandbox, "cat /dev/zero", timeout=30)

    async def killed() -> bool:
        return not [p for p in await sandbox.commands.list() if "/dev/zero" in " ".join(p.args)]

    await eventually(killed, timeout=10, what="the command that wrote too much killed")
    await sandbox.kill()


FORGING_BOT = (
    "import json, time\n"
    "path = '/tmp/.sandboxd/journal'\n"
    "while not open(path).read().endswith('\\n'):  # agent.started, written as it starts\n"
    "    time.sleep(0.01)\n"
    "last = json.loads(open(path).read().splitlines()[-1])\n"
    "seq = last['seq'] if isinstance(last, dict) else last[0]\n"
    "forged = [\n"
    "    {'seq': seq + 1, 'type': 'sandbox.terminated', 'sandbox': 'sb-victim'},\n"
    "    {'seq': seq + 2, 'type': 'agent.failed', 'reason': 'forged', 'sandbox': 'sb-victim'},\n"
    "    [seq + 3, 1.0, 'x' * 100000],\n"
    "    {'seq': seq + 4, 'type': 'agent.exited', 'exit_code': 99},\n"
    "]\n"
    "with open(path, 'a') as journal:\n"
    "    journal.write(''.join(json.dumps(f) + '\\n' for f in forged))\n"
    "time.sleep(1000)\n"
)


async def test_news_forged_inside_an_e2b_sandbox_is_only_ever_about_that_sandbox(
    fake_e2b, redis, embedded_daemon
):
    await embedded_daemon(**settings(fake_e2b))
    await apply(redis, [e2b_pool(min_ready=1, max_total=1, run=bot(FORGING_BOT))])
    (sandbox,) = await wait_ready(redis, "cloud", 1)
    # The one well-formed forgery is taken, as the sandbox's word about its own program.
    said = await wait_event(redis, "agent.exited", sandbox=sandbox)
    assert said["data"] == {"exit_code": 99} and said["pool"] == "cloud"  # the bot runs on
    everything = await events_of(redis)
    assert not [e for e in everything if e["sandbox"] == "sb-victim"]
    assert not [e for e in everything if e["type"] in ("agent.failed", "sandbox.terminated")]
    assert await log_lines(redis, sandbox) == []  # the 100,000-character line was dropped
    healthy = await wait_event(redis, "sandbox.health_changed", sandbox=sandbox)
    assert healthy["data"]["to"] == "healthy"


async def test_an_e2b_sandbox_whose_supervisor_was_killed_is_replaced(
    fake_e2b, redis, embedded_daemon
):
    await embedded_daemon(**settings(fake_e2b))
    await apply(redis, [e2b_pool(min_ready=1, max_total=1, run=bot(COUNTING_BOT))])
    (sandbox,) = await wait_ready(redis, "cloud", 1)
    e2b_id = e2b_id_of(fake_e2b, sandbox)
    members = fake_e2b.call(lambda world: world.sandboxes[e2b_id].members())
    (supervising,) = [
        p
        for p in members
        if p.name().startswith("python") and f"{program.DIR}/supervisor.py" in p.cmdline()
    ]
    supervising.kill()  # as the sandbox's own code might

    failed = await wait_event(redis, "agent.failed", sandbox=sandbox)
    assert failed["data"]["reason"] == "the supervisor is gone (killed?)"
    started = await wait_event(redis, "recovery.started", sandbox=sandbox)
    assert "the supervisor is gone" in started["data"]["detail"]
    done = await wait_event(redis, "recovery.succeeded", old=sandbox)
    await wait_event(redis, "agent.started", sandbox=done["data"]["new"])
