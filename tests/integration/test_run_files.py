"""`run.files` on a local pool: the program's files are in $HOME before it starts (the
e2b side is in test_e2b_program.py)."""

from tests.support import KEYS, apply, eventually, wait_ready

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
