"""Talks to a sandbox's agent over its Unix socket (see agent.py for the protocol)."""

import asyncio
import base64
import json
from typing import Any

from sandboxd.providers.base import ExecResult, OutputCallback

MAX_LINE = 64 * 1024 * 1024


class AgentError(RuntimeError):
    """The agent is unreachable or refused a request."""


class AgentClient:
    def __init__(self, socket_path: str):
        self.socket_path = socket_path

    async def _open(self, request: dict[str, Any]):
        try:
            reader, writer = await asyncio.open_unix_connection(self.socket_path, limit=MAX_LINE)
        except OSError as exc:
            raise AgentError(f"agent unreachable at {self.socket_path}: {exc}") from exc
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        return reader, writer

    async def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        reader, writer = await self._open(request)
        try:
            reply = await _read_message(reader)
        finally:
            writer.close()
        if not reply.get("ok"):
            raise AgentError(reply.get("error", "agent refused the request"))
        return reply

    async def ping(self, timeout: float = 2.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            return await self._call({"op": "ping"})

    async def reset(self) -> int:
        """Kill every process in the sandbox but the agent; returns how many were killed."""
        return int((await self._call({"op": "reset"}))["killed"])

    async def supervise(self, run: dict[str, Any] | None) -> None:
        """Keep `run` (a RunSpec as a dict) running in the sandbox; None stops it."""
        await self._call({"op": "supervise", "run": run})

    async def health(self, command: str | None, timeout: float, since: int) -> dict[str, Any]:
        """Liveness, the probe command's result, and the program's news after `since`."""
        return await self._call(
            {"op": "health", "shell": command, "timeout": timeout, "since": since}
        )

    async def write(self, path: str, data: bytes, mode: int | None = None) -> None:
        await self._call({"op": "write", "path": path, "data": _b64(data), "mode": mode})

    async def read(self, path: str) -> bytes:
        return base64.b64decode((await self._call({"op": "read", "path": path}))["data"])

    async def exec(
        self,
        command: list[str] | str,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult:
        """Run argv (list) or a shell string; stream output to the callbacks as it comes."""
        request: dict[str, Any] = {"op": "exec", "env": env or {}, "cwd": cwd, "timeout": timeout}
        request["shell" if isinstance(command, str) else "argv"] = command
        if stdin is not None:
            request["stdin"] = _b64(stdin)
        reader, writer = await self._open(request)
        try:
            return await _collect(reader, on_stdout, on_stderr)
        finally:
            writer.close()


async def _collect(
    reader: asyncio.StreamReader, on_stdout: OutputCallback | None, on_stderr: OutputCallback | None
) -> ExecResult:
    out: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    callbacks = {"stdout": on_stdout, "stderr": on_stderr}
    while True:
        message = await _read_message(reader)
        if message.get("ok") is False:
            raise AgentError(message.get("error", "exec failed"))
        event = message.get("event")
        if event in out:
            chunk = base64.b64decode(message["data"])
            out[event].append(chunk)
            callback = callbacks[event]
            if callback is not None:
                callback(chunk)
        elif event == "exit":
            return ExecResult(
                exit_code=message["code"],
                stdout=b"".join(out["stdout"]),
                stderr=b"".join(out["stderr"]),
                timed_out=message.get("timed_out", False),
            )


async def _read_message(reader: asyncio.StreamReader) -> dict[str, Any]:
    line = await reader.readline()
    if not line:
        raise AgentError("agent closed the connection")
    return json.loads(line)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
