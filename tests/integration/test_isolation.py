"""What a program inside a local sandbox can see and do (bubblewrap)."""

import shutil

import pytest

from sandboxd.agentclient import AgentClient
from sandboxd.config import LocalProviderConfig
from sandboxd.providers.local import LocalProvider
from sandboxd.spec import PoolSpec

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")


@pytest.fixture
async def sandbox(tmp_path, request):
    isolation = getattr(request, "param", "auto")
    provider = LocalProvider(LocalProviderConfig(workspace_root=tmp_path, isolation=isolation))
    handle = await provider.create("sb-isolation", PoolSpec(name="iso", env={"GREETING": "hi"}))
    try:
        yield provider, handle, AgentClient(handle["socket"])
    finally:
        await provider.terminate("sb-isolation", handle)
        assert not await provider.is_alive("sb-isolation", handle)
        assert not (tmp_path / "sb-isolation").exists()


async def run(client: AgentClient, script: str) -> str:
    result = await client.exec(["sh", "-c", script], timeout=10)
    return result.stdout.decode().strip()


@needs_bwrap
async def test_only_loopback_own_hostname_own_pid_1(sandbox):
    _, handle, client = sandbox
    assert handle["isolation"] == "bwrap"
    interfaces = await run(client, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
    assert interfaces.split() == ["lo"]
    assert await run(client, "hostname") == "sb-isolation"
    assert "agent.py" in await run(client, "cat /proc/1/cmdline | tr '\\0' ' '")
    pids = [int(p) for p in (await run(client, "ls /proc | grep -E '^[0-9]+$'")).split()]
    assert max(pids) < 100  # a fresh pid namespace, not the host's


@needs_bwrap
async def test_writes_only_in_workspace_and_tmp(sandbox):
    _, handle, client = sandbox
    for path in ("/etc/x", "/usr/x", "/x", "/opt/sandboxd/x"):
        result = await client.exec(["sh", "-c", f"echo > {path}"])
        assert result.exit_code != 0, path
        assert b"Read-only file system" in result.stderr
    assert await run(client, "echo a > /workspace/f && echo b > /tmp/g && cat /workspace/f") == "a"
    shadow = await run(client, "cat /etc/shadow 2>&1 | head -c 40")
    assert shadow.startswith("cat: /etc/shadow")  # host secrets are not mounted
    from pathlib import Path

    assert (Path(handle["dir"]) / "workspace" / "f").read_text() == "a\n"


@pytest.mark.parametrize("sandbox", ["auto", "none"], indirect=True)
async def test_agent_exec_env_files_and_timeout(sandbox):
    client = sandbox[2]
    assert (await client.ping())["ok"]
    assert await run(client, "echo $GREETING $SANDBOX_ID") == "hi sb-isolation"
    streamed: list[bytes] = []
    result = await client.exec(["python3", "-c", "print(6*7)"], on_stdout=streamed.append)
    assert (result.exit_code, result.stdout, b"".join(streamed)) == (0, b"42\n", b"42\n")
    assert (await client.exec("exit 3")).exit_code == 3
    slow = await client.exec(["sleep", "30"], timeout=0.2)
    assert slow.timed_out and slow.exit_code != 0
    home = await run(client, "echo $HOME")
    await client.write(f"{home}/data.bin", b"\x00\x01payload")
    assert await client.read(f"{home}/data.bin") == b"\x00\x01payload"
    assert (await client.exec("cat", stdin=b"piped")).stdout == b"piped"


@needs_bwrap
async def test_memory_limit_is_applied(sandbox):
    _, handle, client = sandbox
    assert handle["limits"] in ("rlimit", "cgroup")
    limit = await run(client, "ulimit -v")
    assert limit == str(512 * 1024)
