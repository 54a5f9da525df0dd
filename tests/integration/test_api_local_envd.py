"""envd for local sandboxes, the parts beyond commands and files: directory watchers (the sync
SDK's polled watcher and the async SDK's streamed one), reattaching to a running command
(`commands.connect`), PTYs, and routing by host name. The unmodified e2b SDK is the client,
against a real daemon, redis-server and local sandboxes; the attacks too (a watcher flood,
a connect to another sandbox's command or without the claim's token)."""

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import AsyncSandbox, Sandbox
from e2b.exceptions import (
    InvalidArgumentException,
    NotFoundException,
    RateLimitException,
    SandboxException,
)
from e2b.sandbox.commands.command_handle import CommandExitException, PtySize
from e2b.sandbox.filesystem.watch_handle import FilesystemEvent, FilesystemEventType

from tests.support import apply, until, wait_ready

from .test_api import ApiServer, new_key

pytestmark = pytest.mark.timeout(120)

CREATE, WRITE, REMOVE = (
    FilesystemEventType.CREATE,
    FilesystemEventType.WRITE,
    FilesystemEventType.REMOVE,
)
RENAME, CHMOD = FilesystemEventType.RENAME, FilesystemEventType.CHMOD


def connect_stream(url: str, sandbox_id: str, secret: str, pid: int) -> bytes:
    """process.Process/Connect by hand: a Connect server stream (its error comes in the
    stream's end message)."""
    body = json.dumps({"process": {"pid": pid}}).encode()
    answer = httpx.post(
        f"{url}/process.Process/Connect",
        headers={
            "E2b-Sandbox-Id": sandbox_id,
            "X-Access-Token": secret,
            "Content-Type": "application/connect+json",
        },
        content=b"\x00" + len(body).to_bytes(4, "big") + body,
        timeout=10,
    )
    return answer.content


def keepalive_within(url: str, sandbox_id: str, secret: str, pid: int, within: float) -> bool:
    """Follow a command by hand, asking for keepalives every second (the SDK asks for 50):
    does one come while the command is quiet?"""
    body = json.dumps({"process": {"pid": pid}}).encode()
    headers = {
        "E2b-Sandbox-Id": sandbox_id,
        "X-Access-Token": secret,
        "Content-Type": "application/connect+json",
        "Keepalive-Ping-Interval": "1",
    }
    content = b"\x00" + len(body).to_bytes(4, "big") + body
    with httpx.stream(
        "POST", f"{url}/process.Process/Connect", headers=headers, content=content, timeout=within
    ) as answer:
        for chunk in answer.iter_bytes():
            if b"keepalive" in chunk:
                return True
    return False


class Collected:
    """A sync watcher's events, fetched as they come."""

    def __init__(self, handle: Any):
        self.handle = handle
        self.events: list[tuple[str, FilesystemEventType]] = []

    def has(self, *wanted: tuple[str, FilesystemEventType]) -> bool:
        self.events += [(e.name, e.type) for e in self.handle.get_new_events()]
        return all(w in self.events for w in wanted)


@pytest.fixture
async def local_api(redis, redis_server, daemon_factory, monkeypatch, tmp_path: Path):
    """A daemon with a warm local pool, and `sandboxd api` serving its envd; the SDK pointed
    at it with a key."""
    for name in ("E2B_API_KEY", "E2B_DOMAIN", "E2B_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    daemon = daemon_factory().start()
    await apply(redis, [{"name": "default", "min_ready": 2, "max_total": 3, "lease_s": 120}])
    await wait_ready(redis, "default", 2)
    env = {"SANDBOXD_LOCAL__WORKSPACE_ROOT": str(daemon.workspace)}
    with ApiServer(redis_server, tmp_path / "api.log", **env) as api:
        monkeypatch.setenv("E2B_API_URL", api.url)
        monkeypatch.setenv("E2B_SANDBOX_URL", api.url)
        monkeypatch.setenv("E2B_API_KEY", new_key(redis_server, "alice"))
        yield api


async def test_watch_dir_sync_and_async_recursive_bounded_and_routed_by_host_name(local_api):
    sandbox = Sandbox.create("default")
    run = sandbox.commands.run
    sandbox.files.make_dir("w/deep")

    # The sync SDK: CreateWatcher, then GetWatcherEvents as it polls; every kind of event.
    watched = Collected(sandbox.files.watch_dir("w"))
    run("cd w && echo a > a.txt && echo more >> a.txt && chmod 600 a.txt")
    until(lambda: watched.has(("a.txt", CREATE), ("a.txt", WRITE), ("a.txt", CHMOD)), "a.txt")
    run("cd w && mv a.txt b.txt && rm b.txt")
    until(lambda: watched.has(("a.txt", RENAME), ("b.txt", CREATE), ("b.txt", REMOVE)), "mv")
    run("echo x > w/deep/inner.txt")  # not recursive: nothing from below
    run("echo y > w/marker")
    until(lambda: watched.has(("marker", CREATE)), "marker")
    assert not [e for e in watched.events if e[0].startswith("deep/")]
    watched.handle.stop()
    with pytest.raises(SandboxException):
        watched.handle.get_new_events()

    # Recursive: directories made after the watch began are watched too, and what a new
    # directory already held when its watch came is reported as created.
    deep = Collected(sandbox.files.watch_dir("w", recursive=True))
    run("echo z > w/deep/inner.txt && mkdir -p w/new/er && echo q > w/new/er/f")
    until(lambda: deep.has(("deep/inner.txt", WRITE), ("new", CREATE), ("new/er/f", CREATE)), "r")
    run("echo again >> w/new/er/f")
    until(lambda: deep.has(("new/er/f", WRITE)), "a write below a new directory")
    deep.handle.stop()

    with pytest.raises(NotFoundException):
        sandbox.files.watch_dir("nowhere")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.watch_dir("w/marker")  # a file

    # A flood: sandbox code makes more events than a watcher holds. The watcher fails
    # (events were lost, as envd's does when its queue overflows) instead of growing; the
    # agent goes on serving.
    flooded = sandbox.files.watch_dir("w")
    run("cd w && seq 1 20000 | xargs touch")
    with pytest.raises(SandboxException, match="events lost"):
        until(lambda: flooded.get_new_events() and False, "an overflow", within=20)
    flooded.stop()
    assert run("ls w | wc -l").stdout.strip() == "20003"
    # At most 8 watchers a sandbox; stopping one frees its place.
    handles = [sandbox.files.watch_dir("w") for _ in range(8)]
    with pytest.raises(RateLimitException):
        sandbox.files.watch_dir("w")
    handles.pop().stop()
    handles.append(sandbox.files.watch_dir("w"))

    # The async SDK: the WatchDir stream.
    other = await AsyncSandbox.create("default")
    await other.files.make_dir("v")
    seen: list[FilesystemEvent] = []
    news = asyncio.Event()

    def on_event(event: FilesystemEvent) -> None:
        seen.append(event)
        news.set()

    handle = await other.files.watch_dir("v", on_event=on_event, recursive=True)

    async def seen_all(*wanted: tuple[str, FilesystemEventType]) -> None:
        async with asyncio.timeout(10):
            while not set(wanted) <= {(e.name, e.type) for e in seen}:
                news.clear()
                await news.wait()

    try:
        await other.commands.run("mkdir v/sub")
        await seen_all(("sub", CREATE))  # (then sub is watched: nothing in it is missed)
        await other.commands.run("echo 1 > v/sub/one && rm v/sub/one")
        await seen_all(("sub/one", CREATE), ("sub/one", WRITE), ("sub/one", REMOVE))
    finally:
        await handle.stop()

    # Routing by host name `<port>-<sandbox id>.<domain>` (a wildcard DNS name), with no
    # E2b-Sandbox-Id header: the same checks of the claim's token.
    token = sandbox._envd_access_token
    url, domain = local_api.url, "sandboxes.example.test"

    def call(port: int, sandbox_id: str, secret: str, path: str = "/health", **kw) -> Any:
        headers = {"Host": f"{port}-{sandbox_id}.{domain}", "X-Access-Token": secret}
        with httpx.Client(timeout=10) as client:
            if path == "/health":
                return client.get(f"{url}{path}", headers=headers)
            return client.post(f"{url}{path}", headers=headers, **kw)

    assert call(49983, sandbox.sandbox_id, token).status_code == 204
    assert call(49983, sandbox.sandbox_id, "wrong").status_code == 401
    assert call(49983, sandbox.sandbox_id, other._envd_access_token).status_code == 401
    assert call(8080, sandbox.sandbox_id, token).status_code == 502  # envd's port only
    assert call(49983, "nope", token).status_code == 502
    listed = call(
        49983,
        sandbox.sandbox_id,
        token,
        "/filesystem.Filesystem/ListDir",
        json={"path": "w/new", "depth": 1},
    )
    assert listed.status_code == 200 and [e["name"] for e in listed.json()["entries"]] == ["er"]
    refused = call(
        49983, sandbox.sandbox_id, "", "/filesystem.Filesystem/ListDir", json={"path": "w"}
    )
    assert refused.status_code == 401 and refused.json()["code"] == "unauthenticated"

    for watch in handles:
        watch.stop()
    sandbox.kill()

    # The async SDK's connect to a command whose starter went away.
    started = await other.commands.run(
        "while [ ! -e v/go ]; do sleep 0.02; done; echo async", background=True
    )
    await started.disconnect()
    followed = await other.commands.connect(started.pid)
    await other.files.write("v/go", "")
    assert (await followed.wait()).stdout == "async\n"

    # A watch left open does not hold `sandboxd api` up when it is stopped: streams get a
    # grace period, then are cut (systemd would otherwise kill it after TimeoutStopSec).
    lingering = await other.files.watch_dir("v", on_event=lambda event: None, timeout=0)
    assert local_api.proc is not None
    local_api.proc.terminate()
    local_api.proc.wait(9)
    await lingering.stop()


async def test_commands_outlive_their_client_are_reattached_and_ptys_work(local_api):
    sandbox = Sandbox.create("default")
    run = sandbox.commands.run

    # A background command survives its client's disconnect (as envd's), keeps running,
    # and a connect follows its output from then on, to its end.
    handle = run(
        "echo before; while [ ! -e go ]; do sleep 0.02; done; echo after; exit 3",
        background=True,
    )
    pid = handle.pid
    first = next(iter(handle))
    assert first[0] == "before\n"
    handle.disconnect()
    assert pid in [p.pid for p in sandbox.commands.list()]
    again = sandbox.commands.connect(pid)
    assert again.pid == pid
    sandbox.files.write("go", "")
    with pytest.raises(CommandExitException) as ended:
        again.wait()
    assert ended.value.exit_code == 3 and ended.value.stdout == "after\n"
    until(lambda: pid not in [p.pid for p in sandbox.commands.list()], "the command is gone")

    # A command ends at its deadline (the SDK's `timeout`), followed or not.
    bounded = run("sleep 30", background=True, timeout=1)
    bounded.disconnect()
    until(lambda: bounded.pid not in [p.pid for p in sandbox.commands.list()], "killed at 1 s")

    # Input as a stream (StreamInput), to stdin and to a PTY.
    cat = run("cat", background=True, stdin=True)
    sandbox.commands.stream_input(cat.pid, ["one ", b"two\n"])
    sandbox.commands.close_stdin(cat.pid)
    assert cat.wait().stdout == "one two\n"
    with pytest.raises(NotFoundException):
        sandbox.commands.stream_input(999_999, ["nobody"])

    # A command that ended lately still answers a connect with its exit code.
    quick = run("exit 5", background=True)
    with pytest.raises(CommandExitException):
        quick.wait()
    with pytest.raises(CommandExitException) as late:
        sandbox.commands.connect(quick.pid).wait()
    assert late.value.exit_code == 5

    # Kill and list keep working on a reattached command.
    sleeper = run("sleep 60", background=True)
    sleeper.disconnect()
    follower = sandbox.commands.connect(sleeper.pid)
    assert sandbox.commands.kill(sleeper.pid) is True
    with pytest.raises(CommandExitException):
        follower.wait()
    with pytest.raises(NotFoundException):
        sandbox.commands.connect(999_999)

    # Only this sandbox's commands, and only with this claim's token.
    other = Sandbox.create("default")
    waiting = run("while [ ! -e go2 ]; do sleep 0.02; done; echo mine", background=True)
    assert waiting.pid not in [p.pid for p in other.commands.list()]
    with pytest.raises(NotFoundException):
        other.commands.connect(waiting.pid)
    for secret in ("", "wrong", other._envd_access_token):
        answer = connect_stream(local_api.url, sandbox.sandbox_id, secret, waiting.pid)
        assert b'"unauthenticated"' in answer and b"mine" not in answer
    token = sandbox._envd_access_token
    assert keepalive_within(local_api.url, sandbox.sandbox_id, token, waiting.pid, within=5)
    follower = sandbox.commands.connect(waiting.pid)
    sandbox.files.write("go2", "")
    assert follower.wait().stdout == "mine\n"

    # PTYs: a terminal of the size asked for, keys to it, a resize, a kill.
    output = bytearray()
    terminal = sandbox.pty.create(PtySize(rows=24, cols=80))
    sandbox.pty.stream_input(terminal.pid, [b"stty size; ", b"tty; exit 7\n"])
    with pytest.raises(CommandExitException) as closed:
        terminal.wait(on_pty=output.extend)
    assert closed.value.exit_code == 7
    assert b"24 80" in output and b"/dev/pts/" in output
    output.clear()
    terminal = sandbox.pty.create(PtySize(rows=24, cols=80))
    sandbox.pty.resize(terminal.pid, PtySize(rows=10, cols=33))
    sandbox.pty.send_stdin(terminal.pid, b"stty size\n")
    for _, _, chunk in terminal:
        output.extend(chunk or b"")
        if b"10 33" in output:
            break
    with pytest.raises(InvalidArgumentException):
        sandbox.commands.send_stdin(terminal.pid, "a terminal takes keys, not stdin")
    assert sandbox.pty.kill(terminal.pid) is True
    with pytest.raises(CommandExitException):
        terminal.wait()

    sandbox.kill()
    other.kill()
