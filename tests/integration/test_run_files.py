"""`run:` on local pools: `run.files` are in $HOME before the program starts, and a reset
starts it again numbered past its first run (the e2b side is in test_e2b_program.py)."""

from sandboxd.client import Client
from sandboxd.providers.local.agentclient import AgentClient
from sandboxd.store.records import SandboxStore
from tests.support import KEYS, apply, eventually, wait_event, wait_ready

BOT = "print('hello from bot.py:', open('conf/answer.txt').read())\nimport time\ntime.sleep(1000)\n"


async def test_run_files_are_written_before_a_local_program_starts(redis, daemon_factory):
    daemon_factory(agent_poll_interval_s=0.1).start()
    run = {"command": "python3 -u bot.py", "files": {"bot.py": BOT, "conf/answer.txt": "42"}}
    await apply(redis, [{"name": "bots", "min_ready": 1, "run": run}])
    (sandbox,) = await wait_ready(redis, "bots", 1)

    async def said() -> list[str] | None:
        lines = [f["line"] for _, f in await redis.xrange(KEYS.sandbox_logs(sandbox))]
        return lines or None

    assert await eventually(said, what="the bot's line") == ["hello from bot.py: 42"]


# Once told to go (a file), 4,500 lines in 1.5 s: their numbers run 3 s ahead of the clock
# the next run's numbers start from. (A local agent keeps 1,000 unread lines: a busy host may
# lose some of them, which is not what this test is about.)
BURST_BOT = (
    "import os, time\n"
    "print('ready')\n"
    "while not os.path.exists('go'):\n"
    "    time.sleep(0.01)\n"
    "os.remove('go')\n"
    "for i in range(4500):\n"
    "    print(i)\n"
    "    if i % 900 == 899:\n"
    "        time.sleep(0.3)\n"
    "print('up')\n"
    "time.sleep(1000)\n"
)


async def test_a_local_reset_numbers_the_programs_second_run_past_its_first(redis, daemon_factory):
    daemon_factory(agent_poll_interval_s=0.1, agent_log_lines=10_000).start()
    run = {"command": "python3 -u bot.py", "files": {"bot.py": BURST_BOT}}
    pool = {"name": "bots", "min_ready": 1, "max_total": 1, "reuse": "reset", "run": run}
    await apply(redis, [pool])
    (sandbox,) = await wait_ready(redis, "bots", 1)

    def said(line: str, times: int):
        async def probe() -> list[str] | None:
            found = [f["line"] for _, f in await redis.xrange(KEYS.sandbox_logs(sandbox))]
            return found if found.count(line) >= times else None

        return probe

    await eventually(said("ready", 1), what="the program waiting")
    record = await SandboxStore(redis, KEYS).get(sandbox)
    await AgentClient(record.handle["socket"]).write("go", b"")
    await eventually(said("up", 1), what="the first run's last line")
    async with Client(redis) as client:
        async with client.claim("bots", lease_s=60) as claimed:
            assert claimed.id == sandbox
    await wait_event(redis, "sandbox.reset", sandbox=sandbox)
    # Numbered from the clock, the second run's lines would all be behind the cursor.
    await eventually(said("ready", 2), what="the program waiting again, after the reset")
    await AgentClient(record.handle["socket"]).write("go", b"")
    found = await eventually(said("up", 2), what="the second run's last line")
    second = found[found.index("ready", 1) + 1 : -1]
    assert [int(x) for x in second] == sorted({int(x) for x in second})  # no line twice
