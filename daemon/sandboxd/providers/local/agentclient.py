"""Talks to a sandbox's agent over its Unix socket (see agent.py for the protocol)."""

import asyncio
import base64
import json
from collections.abc import AsyncGenerator
from typing import Any

from sandboxd.providers.base import ExecResult, OutputCallback

MAX_LINE = 64 * 1024 * 1024
CALL_TIMEOUT_S = 60.0  # a unary call's answer: a 32 MiB file, a reset's 5 s, a deep listing


class AgentError(RuntimeError):
    """The agent is unreachable or refused a request. `kind`: what went wrong, as the agent
    says (not_found, exists, not_dir, is_dir, denied, invalid, exhausted, overflow, other;
    unreachable)."""

    def __init__(self, message: str, kind: str = "other"):
        super().__init__(message)
        self.kind = kind


def _refused(reply: dict[str, Any], default: str) -> AgentError:
    kind = reply.get("kind")
    return AgentError(
        str(reply.get("error") or default), kind if isinstance(kind, str) else "other"
    )


class AgentClient:
    def __init__(self, socket_path: str):
        self.socket_path = socket_path

    async def _open(self, request: dict[str, Any]):
        try:
            reader, writer = await asyncio.open_unix_connection(self.socket_path, limit=MAX_LINE)
        except OSError as exc:
            raise AgentError(
                f"agent unreachable at {self.socket_path}: {exc}", "unreachable"
            ) from exc
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        return reader, writer

    async def _call(
        self, request: dict[str, Any], timeout: float = CALL_TIMEOUT_S
    ) -> dict[str, Any]:
        """One request, one reply, within `timeout`: an agent that does not answer (a
        sandbox starved by its own code, say) costs its caller no more than that."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await self._open(request)
                try:
                    reply = await _read_message(reader)
                finally:
                    writer.close()
        except TimeoutError:
            op = request.get("op")
            message = f"agent gave no answer to {op!r} within {timeout:g}s"
            raise AgentError(message, "unreachable") from None

        if not reply.get("ok"):
            raise _refused(reply, "agent refused the request")
        return reply

    async def ping(self, timeout: float = 2.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            return await self._call({"op": "ping"})

    async def reset(self) -> int:
        """Kill every process in the sandbox but the agent; returns how many were killed."""
        return int((await self._call({"op": "reset"}))["killed"])

    async def freeze(self) -> int:
        """Stop every process of the sandbox but the agent (SIGSTOP); how many."""
        return int((await self._call({"op": "freeze"}))["processes"])

    async def thaw(self) -> int:
        """Continue them (SIGCONT); how many."""
        return int((await self._call({"op": "thaw"}))["processes"])

    async def supervise(self, run: dict[str, Any] | None) -> None:
        """Keep `run` (a RunSpec as a dict) running in the sandbox; None stops it."""
        await self._call({"op": "supervise", "run": run})

    async def health(self, command: str | None, timeout: float, since: int) -> dict[str, Any]:
        """Liveness, the probe command's result, and the program's news after `since`."""
        return await self._call(
            {"op": "health", "shell": command, "timeout": timeout, "since": since},
            timeout=timeout + CALL_TIMEOUT_S,
        )

    async def write(self, path: str, data: bytes, mode: int | None = None) -> None:
        await self.put(path, data, mode)

    async def put(self, path: str, data: bytes, mode: int | None = None) -> str:
        """Write the file (its directories made); the absolute path written, as the sandbox
        sees it."""
        reply = await self._call({"op": "write", "path": path, "data": _b64(data), "mode": mode})
        return str(reply.get("path") or path)

    async def read(self, path: str) -> bytes:
        return base64.b64decode((await self._call({"op": "read", "path": path}))["data"])

    # -- the file system as the sandbox sees it (see agent.py for an entry's fields) --------

    async def stat(self, path: str) -> dict[str, Any]:
        return dict((await self._call({"op": "stat", "path": path}))["entry"])

    async def listdir(self, path: str, depth: int = 1) -> list[dict[str, Any]]:
        return list((await self._call({"op": "list", "path": path, "depth": depth}))["entries"])

    async def mkdir(self, path: str) -> dict[str, Any]:
        return dict((await self._call({"op": "mkdir", "path": path}))["entry"])

    async def move(self, path: str, to: str) -> dict[str, Any]:
        return dict((await self._call({"op": "move", "path": path, "to": to}))["entry"])

    async def remove(self, path: str) -> None:
        await self._call({"op": "remove", "path": path})

    # -- the commands exec'd through the agent -----------------------------------------------

    async def procs(self) -> list[dict[str, Any]]:
        """The running exec'd commands: pid, argv, cwd, tag."""
        return list((await self._call({"op": "procs"}))["procs"])

    async def signal(self, pid: int, signum: int) -> None:
        """SIGTERM (15) or SIGKILL (anything else) to an exec'd command's process group."""
        await self._call({"op": "signal", "pid": pid, "signal": signum})

    async def send_input(self, pid: int, data: bytes) -> None:
        await self._call({"op": "input", "pid": pid, "data": _b64(data)})

    async def close_stdin(self, pid: int) -> None:
        await self._call({"op": "close_stdin", "pid": pid})

    async def stream(
        self,
        command: list[str] | str,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin_open: bool = False,
        tag: str | None = None,
    ) -> AsyncGenerator[tuple[str, Any], None]:
        """Run a command, yielding ("started", pid), ("stdout" | "stderr", bytes)…, then
        ("exit", (code, timed_out)). Closing the iterator early kills the command (the agent
        sees its connection go). `stdin_open`: keep stdin open for `send_input`."""
        request: dict[str, Any] = {"op": "exec", "env": env or {}, "cwd": cwd, "timeout": timeout}
        request["shell" if isinstance(command, str) else "argv"] = command
        request["stdin_open"] = stdin_open
        if tag is not None:
            request["tag"] = tag
        reader, writer = await self._open(request)
        try:
            while True:
                message = await _read_message(reader)
                if message.get("ok") is False:
                    raise _refused(message, "exec failed")
                event = message.get("event")
                if event == "started":
                    yield "started", int(message["pid"])
                elif event in ("stdout", "stderr"):
                    yield event, base64.b64decode(message["data"])
                elif event == "exit":
                    yield "exit", (message["code"], bool(message.get("timed_out")))
                    return
        finally:
            writer.close()

    # -- envd's commands: they outlive their client's connection (see agent.py) -------------

    def start(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin_open: bool = False,
        tag: str | None = None,
        pty: dict[str, int] | None = None,
    ) -> AsyncGenerator[tuple[str, Any], None]:
        """Start a command as envd does, yielding what `stream` yields (and ("pty", bytes)
        for a PTY, `pty={"rows", "cols"}`). Closing the iterator early leaves the command
        running; `attach` follows it again."""
        request: dict[str, Any] = {"op": "start", "argv": argv, "env": env or {}, "cwd": cwd}
        request.update(timeout=timeout, stdin_open=stdin_open, tag=tag, pty=pty)
        return self._process_events(request)

    def attach(
        self, *, pid: int | None = None, tag: str | None = None
    ) -> AsyncGenerator[tuple[str, Any], None]:
        """Follow a command `start` started (by pid or tag): ("started", pid), its output
        from now on, ("exit", …); one that ended lately answers its start and exit."""
        return self._process_events({"op": "connect", "pid": pid, "tag": tag})

    async def _process_events(
        self, request: dict[str, Any]
    ) -> AsyncGenerator[tuple[str, Any], None]:
        reader, writer = await self._open(request)
        try:
            while True:
                message = await _read_message(reader)
                if message.get("ok") is False:
                    raise _refused(message, f"{request['op']} failed")
                event = message.get("event")
                if event == "started":
                    yield "started", int(message["pid"])
                elif event in ("stdout", "stderr", "pty"):
                    yield event, base64.b64decode(message["data"])
                elif event == "exit":
                    yield "exit", (message["code"], bool(message.get("timed_out")))
                    return
        finally:
            writer.close()

    async def tty_input(self, pid: int, data: bytes) -> None:
        await self._call({"op": "tty_input", "pid": pid, "data": _b64(data)})

    async def resize(self, pid: int, rows: int, cols: int) -> None:
        await self._call({"op": "resize", "pid": pid, "size": {"rows": rows, "cols": cols}})

    # -- envd's file system watchers ---------------------------------------------------------

    async def watch(
        self, path: str, recursive: bool = False
    ) -> AsyncGenerator[list[dict[str, str]], None]:
        """Watch a directory: first [] once the watch is set, then each batch of events
        ({"name": relative path, "type": create|write|remove|rename|chmod}). The watch ends
        when the iterator is closed; events lost raise AgentError("overflow")."""
        reader, writer = await self._open({"op": "watch", "path": path, "recursive": recursive})
        try:
            while True:
                message = await _read_message(reader)
                if message.get("ok") is False:
                    raise _refused(message, "watch failed")
                if message.get("event") == "started":
                    yield []
                elif message.get("event") == "fs":
                    yield list(message["events"])
        finally:
            writer.close()

    async def watcher_add(self, path: str, recursive: bool = False) -> str:
        """A watcher that holds its events until `watcher_events`; its id."""
        request = {"op": "watcher_add", "path": path, "recursive": recursive}
        return str((await self._call(request))["id"])

    async def watcher_events(self, watcher_id: str) -> list[dict[str, str]]:
        return list((await self._call({"op": "watcher_events", "id": watcher_id}))["events"])

    async def watcher_remove(self, watcher_id: str) -> None:
        await self._call({"op": "watcher_remove", "id": watcher_id})

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
            raise _refused(message, "exec failed")
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
