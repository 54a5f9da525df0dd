"""`sandboxd api` serves envd for local sandboxes: the unmodified e2b SDK, with
`E2B_API_URL` and `E2B_SANDBOX_URL` both at sandboxd, gets a warm local sandbox and runs
commands and file calls in it, each carried to the sandbox's agent."""

import contextlib
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from e2b import AsyncSandbox, Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import (
    NotFoundException,
    SandboxException,
)
from e2b.sandbox.commands.command_handle import CommandExitException

from tests.support import KEYS, apply, cli, ready_ids, until, wait_event, wait_ready

from .test_api import ApiServer, new_key

pytestmark = pytest.mark.timeout(180)


def in_sandbox(sandbox_id: str, cmdline: list[str]) -> list[psutil.Process]:
    """The host's view of the processes of one local sandbox running `cmdline`."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(OSError):
            cgroup = Path(f"/proc/{proc.pid}/cgroup").read_text()
            if proc.info["cmdline"] == cmdline and f"sandbox-{sandbox_id}" in cgroup:
                found.append(proc)
    return found


def envd_get(url: str, path: str, sandbox_id: str, token: str) -> int:
    request = urllib.request.Request(
        f"{url}{path}", headers={"E2b-Sandbox-Id": sandbox_id, "X-Access-Token": token}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_the_e2b_sdk_runs_commands_and_files_in_a_warm_local_sandbox(
    redis, redis_server, daemon_factory, monkeypatch, tmp_path: Path
):
    for name in ("E2B_API_KEY", "E2B_DOMAIN", "E2B_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    daemon = daemon_factory(log_level="DEBUG").start()
    await apply(redis, [{"name": "default", "min_ready": 2, "max_total": 3, "lease_s": 120}])
    await wait_ready(redis, "default", 2)
    alice = new_key(redis_server, "alice")
    bob = new_key(redis_server, "bob")
    outside = tmp_path / "host-secret.txt"
    outside.write_text("the host's, not the sandbox's")

    env = {"SANDBOXD_LOCAL__WORKSPACE_ROOT": str(daemon.workspace)}
    with ApiServer(redis_server, tmp_path / "api.log", **env) as api:
        monkeypatch.setenv("E2B_API_URL", api.url)
        monkeypatch.setenv("E2B_SANDBOX_URL", api.url)
        monkeypatch.setenv("E2B_API_KEY", alice)

        warm = set(await ready_ids(redis, "default"))
        sandbox = Sandbox.create("default", envs={"GREETING": "hello from the claim"})
        assert sandbox.sandbox_id in warm  # a warm claim, not a cold start (speed: bench/)
        mapping = await redis.hgetall(KEYS.api_sandbox(sandbox.sandbox_id))
        assert mapping["sandbox"] == sandbox.sandbox_id and mapping["provider"] == "local"
        token = sandbox._envd_access_token
        assert token and token not in str(mapping)  # only its digest is kept

        # Commands: stdout, exit codes and stderr, streaming, the claim's envs.
        assert sandbox.commands.run("echo hi").stdout == "hi\n"
        with pytest.raises(CommandExitException) as failed:
            sandbox.commands.run("echo oops >&2; exit 3")
        assert failed.value.exit_code == 3 and failed.value.stderr == "oops\n"
        chunks: list[str] = []
        done = sandbox.commands.run(
            "for i in 1 2 3; do echo line $i; sleep 0.05; done", on_stdout=chunks.append
        )
        assert "".join(chunks) == done.stdout == "line 1\nline 2\nline 3\n"
        assert sandbox.commands.run("echo $GREETING").stdout == "hello from the claim\n"
        # E2B's own variables, as in an E2B sandbox
        own = sandbox.commands.run("echo $E2B_SANDBOX $E2B_SANDBOX_ID $E2B_TEMPLATE_ID").stdout
        assert own == f"true {sandbox.sandbox_id} default\n"
        assert sandbox.commands.run("echo $X", envs={"X": "per command"}).stdout == (
            "per command\n"
        )

        # Background commands: listed, given stdin, killed.
        cat = sandbox.commands.run("cat", background=True, stdin=True)
        assert cat.pid in [p.pid for p in sandbox.commands.list()]
        sandbox.commands.send_stdin(cat.pid, "to cat\n")
        sandbox.commands.close_stdin(cat.pid)
        assert cat.wait().stdout == "to cat\n"
        sleeper = sandbox.commands.run("sleep 60", background=True)
        assert sandbox.commands.kill(sleeper.pid) is True
        with pytest.raises(CommandExitException):
            sleeper.wait()
        assert sleeper.pid not in [p.pid for p in sandbox.commands.list()]

        # Files.
        info = sandbox.files.write("notes/a.txt", "alpha")
        assert info.path.endswith("/notes/a.txt")
        assert sandbox.files.read("notes/a.txt") == "alpha"
        assert sandbox.commands.run("cat notes/a.txt").stdout == "alpha"
        assert [e.name for e in sandbox.files.list("notes")] == ["a.txt"]
        assert sandbox.files.exists("notes/a.txt") and not sandbox.files.exists("nope")
        assert sandbox.files.make_dir("made/deep") is True
        assert sandbox.files.make_dir("made/deep") is False
        moved = sandbox.files.rename("notes/a.txt", "made/deep/b.txt")
        assert moved.name == "b.txt" and sandbox.files.read("made/deep/b.txt") == "alpha"
        assert not sandbox.files.exists("notes/a.txt")
        sandbox.files.remove("made")
        assert not sandbox.files.exists("made/deep/b.txt")
        with pytest.raises(NotFoundException):
            sandbox.files.read("gone.txt")

        # A hostile path names only the sandbox's own view (the agent resolves it inside).
        for path in (str(outside), f"../../..{outside}", "../../etc/shadow"):
            with pytest.raises((NotFoundException, SandboxException)):
                sandbox.files.read(path)
        assert not sandbox.files.exists(str(outside))

        # The async SDK too.
        other = await AsyncSandbox.create("default")
        assert (await other.commands.run("echo $((6*7))")).stdout == "42\n"
        assert other.sandbox_id != sandbox.sandbox_id

        # The access token is required: none or a wrong one is envd's 401.
        assert envd_get(api.url, "/health", sandbox.sandbox_id, token) == 204
        assert envd_get(api.url, "/health", sandbox.sandbox_id, "wrong") == 401
        assert envd_get(api.url, "/files?path=a", sandbox.sandbox_id, "") == 401
        assert envd_get(api.url, "/health", "nope", token) == 502
        other_token = other._envd_access_token
        assert envd_get(api.url, "/health", sandbox.sandbox_id, other_token) == 401
        # Another key's sandbox: not listed, not killed, not reachable with its own token.
        assert Sandbox.list(api_key=bob).next_items() == []
        assert Sandbox.kill(sandbox.sandbox_id, api_key=bob) is False

        # Pause stops every process of the sandbox (its claim goes on); envd is refused
        # until connect, from any program holding the key, continues them.
        sandbox.commands.run("sleep 300", background=True)
        (sleep,) = until(lambda: in_sandbox(sandbox.sandbox_id, ["sleep", "300"]), "the sleep")
        assert sandbox.pause() is True
        until(lambda: sleep.status() == psutil.STATUS_STOPPED, "stopped")
        assert Sandbox.pause(sandbox.sandbox_id) is False  # already paused: E2B's 409
        assert [
            s.sandbox_id
            for s in Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
        ] == [sandbox.sandbox_id]
        assert envd_get(api.url, "/health", sandbox.sandbox_id, token) == 502
        with pytest.raises(SandboxException):
            sandbox.commands.run("true")
        again = Sandbox.connect(sandbox.sandbox_id, timeout=200)  # a fresh handle: same token
        assert again._envd_access_token == token
        until(lambda: sleep.status() != psutil.STATUS_STOPPED, "continued")
        assert again.commands.run("echo back").stdout == "back\n"
        assert Sandbox.connect(sandbox.sandbox_id).sandbox_id == sandbox.sandbox_id  # running
        with pytest.raises(NotFoundException):
            Sandbox.connect(sandbox.sandbox_id, api_key=bob)
        with pytest.raises(SandboxException):
            Sandbox.pause(sandbox.sandbox_id, api_key=bob)
        assert sleep.status() != psutil.STATUS_STOPPED

        # Kill releases; the pool refills; the token opens nothing any more.
        sandbox.kill()
        await wait_event(redis, "sandbox.released", sandbox=mapping["sandbox"])
        assert envd_get(api.url, "/health", sandbox.sandbox_id, token) == 502
        await other.kill()
        await wait_ready(redis, "default", 2)

    texts = [
        daemon.log_path.read_text(),
        (tmp_path / "api.log").read_text(),
        cli(redis_server, "events", "-n", "1000", "-o", "json").stdout,
    ]
    for text in texts:
        assert token not in text and "hello from the claim" not in text
