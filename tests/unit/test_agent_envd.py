"""The agent's envd ops, served in this process on a Unix socket (no sandbox): what a reset
leaves to the next claimant (nothing), and the bounds that keep hostile sandbox code from
growing the agent's memory (followers of a command, output nobody follows)."""

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sandboxd.providers.local import agent
from sandboxd.providers.local.agentclient import AgentClient, AgentError

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[AgentClient]:
    home = tmp_path / "home"
    home.mkdir()
    base_env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    path = str(tmp_path / "agent.sock")
    server = await asyncio.start_unix_server(agent._handler(base_env), path, limit=agent.MAX_LINE)
    try:
        yield AgentClient(path)
    finally:
        await AgentClient(path).reset()  # kills what the test left running
        while agent.KEEPING:  # the commands' tasks see them end
            await asyncio.wait(set(agent.KEEPING))
        server.close()
        await server.wait_closed()


async def started(events: AsyncIterator[tuple[str, object]]) -> int:
    event, pid = await anext(events)
    assert event == "started" and isinstance(pid, int)
    return pid


async def test_a_reset_leaves_no_watcher_exit_or_stream_to_the_next_claimant(client, tmp_path):
    polled = await client.watcher_add(".")
    streamed = client.watch(".", recursive=True)
    assert await anext(streamed) == []
    ended = [e async for e in client.start(["sh", "-c", "exit 4"], tag="mine")]
    assert ended[-1] == ("exit", (4, False))
    assert [e async for e in client.attach(tag="mine")][-1] == ("exit", (4, False))

    await client.reset()

    with pytest.raises(AgentError) as gone:
        await client.watcher_events(polled)
    assert gone.value.kind == "not_found"
    with pytest.raises(AgentError) as gone:
        [e async for e in client.attach(tag="mine")]
    assert gone.value.kind == "not_found"
    with pytest.raises(AgentError, match="ended"):
        await anext(streamed)  # the stream ends instead of waiting on a closed watch
    assert agent.WATCHERS == {}


async def test_output_nobody_follows_is_dropped_and_followers_are_bounded(client):
    # 64 MiB of output while nobody follows: the command is not held up by a full pipe
    # (its output is read and dropped, as envd's), and the agent keeps none of it.
    command = client.start(["sh", "-c", "head -c 67108864 /dev/zero; echo done"], tag="big")
    pid = await started(command)
    await command.aclose()
    async with asyncio.timeout(20):  # (the agent runs in this process: wait on its task)
        await asyncio.gather(*agent.KEEPING)
    attached = [e async for e in client.attach(tag="big")]
    assert attached == [("started", pid), ("exit", (0, False))]

    # At most MAX_FOLLOWERS connections follow one command.
    command = client.start(["sh", "-c", "read line"], stdin_open=True)
    pid = await started(command)
    followers = [client.attach(pid=pid) for _ in range(agent.MAX_FOLLOWERS - 1)]
    for follower in followers:
        assert await started(follower) == pid
    with pytest.raises(AgentError) as refused:
        await anext(client.attach(pid=pid))
    assert refused.value.kind == "exhausted"
    await client.send_input(pid, b"go\n")
    for follower in [command, *followers]:
        assert [e async for e in follower][-1] == ("exit", (0, False))


async def test_at_most_max_watchers_and_a_file_is_not_a_directory(client, tmp_path):
    (tmp_path / "home" / "file").write_text("x")
    with pytest.raises(AgentError) as refused:
        await client.watcher_add("file")
    assert refused.value.kind == "not_dir"
    with pytest.raises(AgentError) as refused:
        await client.watcher_add("nowhere")
    assert refused.value.kind == "not_found"
    made = [await client.watcher_add(".") for _ in range(agent.MAX_WATCHERS)]
    with pytest.raises(AgentError) as refused:
        await client.watcher_add(".")
    assert refused.value.kind == "exhausted"
    await client.watcher_remove(made[0])
    await client.watcher_add(".")


async def test_a_watch_past_its_bounds_is_refused_or_fails(client, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setattr(agent, "MAX_WATCH_DIRS", 5)
    monkeypatch.setattr(agent, "MAX_WATCH_EVENTS", 20)
    for i in range(5):
        (home / "tree" / f"d{i}").mkdir(parents=True)
    with pytest.raises(AgentError) as refused:
        await client.watcher_add("tree", recursive=True)  # six directories
    assert refused.value.kind == "exhausted"
    assert agent.WATCHERS == {}

    # A directory of more entries than a watcher may report, moved in at once: the watch
    # fails (events lost) rather than list it all.
    (home / "w").mkdir()
    (home / "big").mkdir()
    for i in range(30):
        (home / "big" / f"f{i}").write_text("")
    watch = client.watch("w", recursive=True)
    assert await anext(watch) == []
    (home / "big").rename(home / "w" / "big")
    with pytest.raises(AgentError) as failed:
        await anext(watch)
    assert failed.value.kind == "overflow" and "events lost" in str(failed.value)
    assert (await client.ping())["ok"]


async def test_a_pty_has_its_size_takes_keys_and_says_what_it_cannot_run(client):
    terminal = client.start(["sh"], pty={"rows": 30, "cols": 100}, env={"PS1": ""})
    pid = await started(terminal)
    await client.resize(pid, 12, 34)
    await client.tty_input(pid, b"stty size; tty; exit 3\n")
    output, end = b"", None
    async for event, value in terminal:
        if event == "pty":
            output += value
        else:
            end = value
    assert end == (3, False) and b"12 34" in output and b"/dev/pts/" in output
    with pytest.raises(AgentError) as refused:
        await client.send_input(pid, b"gone")
    assert refused.value.kind == "not_found"

    # A PTY outlives its client too, and is followed again (the SDK's `pty.connect`).
    terminal = client.start(["sh"], pty={"rows": 5, "cols": 5}, env={"PS1": ""})
    pid = await started(terminal)
    await terminal.aclose()
    again = client.attach(pid=pid)
    assert await started(again) == pid
    await client.tty_input(pid, b"echo back; exit 9\n")
    output = b"".join([v async for e, v in again if e == "pty"])
    assert b"back" in output

    missing = [e async for e in client.start(["no-such-command"], pty={"rows": 5, "cols": 5})]
    said = b"".join(v for e, v in missing if e == "pty")
    assert missing[-1] == ("exit", (127, False)) and b"no-such-command" in said


async def test_a_read_takes_only_a_bounded_regular_file(client, tmp_path: Path):
    """Found from outside: a FIFO stopped the agent's event loop (every call to the sandbox
    hung), and a file of 48 MiB or more made a reply longer than a message line (a 500)."""
    home = tmp_path / "home"
    os.mkfifo(home / "fifo")
    with pytest.raises(AgentError, match="not a regular file") as fifo:
        await client.read("fifo")
    assert fifo.value.kind == "invalid"
    with open(home / "big", "wb") as big:
        big.truncate(agent.MAX_READ + 1)  # sparse: costs no disk
    with pytest.raises(AgentError, match="larger than") as large:
        await client.read("big")
    assert large.value.kind == "too_large"
    (home / "small").write_bytes(b"x" * 1000)
    assert await client.read("small") == b"x" * 1000
    assert (await client.stat("small"))["size"] == 1000  # the agent still answers
