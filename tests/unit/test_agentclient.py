"""The daemon's and the API's side of the agent protocol."""

import asyncio

import pytest

from sandboxd.providers.local.agentclient import AgentClient, AgentError


async def test_an_agent_that_never_answers_costs_the_caller_its_timeout_only(tmp_path):
    """Sandbox code can starve its agent; a unary call must not wait for ever."""
    accepted, left = asyncio.Event(), asyncio.Event()

    async def silent(reader, writer):
        accepted.set()
        await reader.read()  # reads the request, answers nothing, until the caller leaves
        writer.close()
        await writer.wait_closed()
        left.set()

    path = str(tmp_path / "agent.sock")
    server = await asyncio.start_unix_server(silent, path)
    async with server:
        with pytest.raises(AgentError, match=r"no answer to 'stat' within 0\.2s") as failed:
            await AgentClient(path)._call({"op": "stat", "path": "x"}, timeout=0.2)
        assert failed.value.kind == "unreachable" and accepted.is_set()
        await asyncio.wait_for(left.wait(), 5)  # the caller hung up: no socket left open
