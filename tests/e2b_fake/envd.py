"""envd, the agent inside every E2B sandbox, as the SDK reaches it through E2B's proxy (one
URL for all sandboxes, routed by the `E2b-Sandbox-Id` header): GET /health, GET/POST
/files, and the Connect-RPC `process.Process` service (the same generated service the SDK's
client is built from, so its Connect-JSON framing is the real one).

Commands run as real processes on this host, outliving the request that started them (a
client may disconnect and Connect again, as with envd), under bubblewrap, with E2B's view of
a sandbox: the sandbox's own directories mounted at /home/user (HOME, the working
directory) and /tmp, and E2B's environment (HOME, USER, E2B_SANDBOX, E2B_SANDBOX_ID, the
sandbox's env; no TMPDIR). The files API maps those two paths the same way and serves nothing else.
"""

import asyncio
import contextlib
import json
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from e2b.envd.process import process_pb
from e2b.envd.process.process_connect import ProcessASGIApplication
from protobuf import Oneof
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.e2b_fake.state import HOME, FakeSandbox, World

PE = process_pb.ProcessEvent
BWRAP = shutil.which("bwrap")


def not_found(sandbox_id: str) -> JSONResponse:
    # What E2B's proxy answers for a sandbox that is gone (or paused).
    return JSONResponse(
        {
            "code": 502,
            "message": f"The sandbox {sandbox_id} was not found",
            "sandboxId": sandbox_id,
        },
        502,
    )


def sandbox_for(world: World, headers) -> FakeSandbox | JSONResponse:
    sandbox_id = headers.get("e2b-sandbox-id", "")
    sandbox = world.sandboxes.get(sandbox_id)
    if sandbox is None or sandbox.state != "running":
        return not_found(sandbox_id)
    if headers.get("x-access-token") != sandbox.token:
        return JSONResponse({"code": 401, "message": "invalid access token"}, 401)
    return sandbox


class OutsideSandbox(ValueError):
    """A path the fake does not serve: only the sandbox's /home/user and /tmp are its own."""


def resolve(sandbox: FakeSandbox, path: str) -> Path:
    """A path as the sandbox sees it (relative: to HOME) -> where it is on this host."""
    inside = os.path.normpath(path if path.startswith("/") else f"{HOME}/{path}")
    for mount, host in ((HOME, sandbox.home), ("/tmp", sandbox.tmp)):
        if inside == mount or inside.startswith(mount + "/"):
            return host / os.path.relpath(inside, mount)
    raise OutsideSandbox(f"path '{path}' is outside the fake sandbox's {HOME} and /tmp")


def command_env(sandbox: FakeSandbox, extra: dict[str, str]) -> dict[str, str]:
    """E2B's environment of a command: no TMPDIR (unlike the local provider)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": HOME,
        "USER": "user",
        "E2B_SANDBOX": "true",
        "E2B_SANDBOX_ID": sandbox.id,
        **sandbox.envs,
        **extra,
    }
    env.pop("TMPDIR", None)
    return env


def in_sandbox(sandbox: FakeSandbox, cwd: str, argv: list[str]) -> list[str]:
    """argv under bubblewrap: the host's root, with the sandbox's /home/user and /tmp."""
    if BWRAP is None:
        raise RuntimeError("the fake E2B runs commands under bubblewrap: install bwrap")
    return [
        BWRAP,
        "--dev-bind", "/", "/",
        "--tmpfs", "/home",
        "--bind", str(sandbox.home), HOME,
        "--bind", str(sandbox.tmp), "/tmp",
        "--die-with-parent",
        "--chdir", cwd,
        "--", *argv,
    ]  # fmt: skip


def routes(world: World) -> list[Route]:
    async def health(request: Request) -> Response:
        found = sandbox_for(world, request.headers)
        return found if isinstance(found, Response) else Response(status_code=204)

    async def read_file(request: Request) -> Response:
        found = sandbox_for(world, request.headers)
        if isinstance(found, Response):
            return found
        try:
            path = resolve(found, request.query_params["path"])
        except OutsideSandbox as exc:
            return JSONResponse({"code": 400, "message": str(exc)}, 400)
        if not path.is_file():
            return JSONResponse({"code": 404, "message": f"path '{path}' does not exist"}, 404)
        return Response(path.read_bytes(), media_type="application/octet-stream")

    async def write_file(request: Request) -> Response:
        found = sandbox_for(world, request.headers)
        if isinstance(found, Response):
            return found
        written = []
        async with request.form() as form:
            for upload in form.getlist("file"):
                target = request.query_params.get("path") or upload.filename
                try:
                    path = resolve(found, target)
                except OutsideSandbox as exc:
                    return JSONResponse({"code": 400, "message": str(exc)}, 400)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(await upload.read())
                written.append({"name": path.name, "type": "file", "path": str(path)})
        return JSONResponse(written)

    async def init(request: Request) -> Response:
        """envd's POST /init as E2B's envd answers it: the access token it already has must
        come in the body (else 401, as for an unauthorised reset); `envVars` join the
        environment of every command started after (sandboxd sets a claim's this way)."""
        sandbox_id = request.headers.get("e2b-sandbox-id", "")
        sandbox = world.sandboxes.get(sandbox_id)
        if sandbox is None or sandbox.state != "running":
            return not_found(sandbox_id)
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            return Response(status_code=400)
        if not isinstance(body, dict) or body.get("accessToken") != sandbox.token:
            return Response(b"access token validation failed", 401)
        env = body.get("envVars") or {}
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            return Response(status_code=400)
        sandbox.envs.update(env)
        world.init_calls.append((sandbox_id, sorted(env)))
        return Response(status_code=204)

    return [
        Route("/init", init, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/files", read_file, methods=["GET"]),
        Route("/files", write_file, methods=["POST"]),
    ]


class FakeProcess:
    """A command envd started: it runs on its own, whoever listens. Its output goes to the
    streams subscribed at the moment (Start's own, and any Connect); with none, it is
    dropped, as envd drops it. It ends when it exits, is signalled, or its Start request's
    timeout (`Connect-Timeout-Ms`, 0 or absent: none) runs out, as envd's process context."""

    def __init__(self, process: asyncio.subprocess.Process, tag: str | None):
        self.process = process
        self.tag = tag
        self.listeners: set[asyncio.Queue] = set()
        self.ended: process_pb.ProcessEvent.EndEvent | None = None

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        if self.ended is not None:
            queue.put_nowait(self.ended)
        else:
            self.listeners.add(queue)
        return queue

    def publish(self, event) -> None:
        for queue in self.listeners:
            queue.put_nowait(event)

    async def run(self, timeout_s: float | None) -> process_pb.ProcessEvent.EndEvent:
        try:
            async with asyncio.timeout(timeout_s):
                async for name, chunk in _output(self.process):
                    self.publish(PE.DataEvent(output=Oneof(name, chunk)))
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        code = await self.process.wait()
        self.ended = PE.EndEvent(exit_code=code, exited=code >= 0, status=f"exit status {code}")
        self.publish(self.ended)
        self.listeners.clear()
        return self.ended


class ProcessService:
    """process.Process: Start and Connect (server streams of start, data…, end), List,
    SendSignal. A process outlives the streams that watch it, as in envd: a client that
    disconnects leaves it running, and Connect picks it up again by pid or tag."""

    def __init__(self, world: World):
        self.world = world

    def _sandbox(self, ctx) -> FakeSandbox:
        found = sandbox_for(self.world, ctx.request_headers)
        if isinstance(found, Response):
            # envd refuses a wrong token itself; E2B's proxy answers for a sandbox not there
            code = Code.UNAUTHENTICATED if found.status_code == 401 else Code.UNAVAILABLE
            raise ConnectError(code, bytes(found.body).decode())
        return found

    def _find(self, sandbox: FakeSandbox, selector) -> FakeProcess:
        for pid, watched in sandbox.watched.items():
            if selector.field == "pid" and pid == selector.value:
                return watched
            if selector.field == "tag" and watched.tag == selector.value:
                return watched
        raise ConnectError(
            Code.NOT_FOUND, f"process with {selector.field} {selector.value} not found"
        )

    async def start(self, request, ctx) -> AsyncIterator[process_pb.StartResponse]:
        sandbox = self._sandbox(ctx)
        config = request.process
        timeout_ms = int(ctx.request_headers.get("connect-timeout-ms") or 0)
        process = await asyncio.create_subprocess_exec(
            *in_sandbox(sandbox, config.cwd or HOME, [config.cmd, *config.args]),
            cwd=sandbox.home,
            env=command_env(sandbox, dict(config.envs)),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        watched = FakeProcess(process, request.tag if request.has_field("tag") else None)
        queue = watched.subscribe()
        sandbox.processes[process.pid] = process
        sandbox.commands[process.pid] = (config.cmd, list(config.args))
        sandbox.watched[process.pid] = watched
        sandbox.run_task(self._watch(sandbox, watched, timeout_ms / 1000 or None))
        try:
            yield _event(Oneof("start", PE.StartEvent(pid=process.pid)))
            async for event in _events(queue, ctx):
                yield event
        finally:  # the client went away: the process runs on
            watched.listeners.discard(queue)

    async def _watch(self, sandbox: FakeSandbox, watched: FakeProcess, timeout_s) -> None:
        try:
            await watched.run(timeout_s)
        finally:
            pid = watched.process.pid
            sandbox.processes.pop(pid, None)
            sandbox.commands.pop(pid, None)
            sandbox.watched.pop(pid, None)

    async def connect(self, request, ctx) -> AsyncIterator[process_pb.ConnectResponse]:
        sandbox = self._sandbox(ctx)
        watched = self._find(sandbox, request.process.selector)
        queue = watched.subscribe()
        try:
            start = Oneof("start", PE.StartEvent(pid=watched.process.pid))
            yield process_pb.ConnectResponse(event=PE(event=start))
            async for event in _events(queue, ctx):
                yield process_pb.ConnectResponse(event=event.event)
        finally:
            watched.listeners.discard(queue)

    async def list(self, request, ctx) -> process_pb.ListResponse:
        sandbox = self._sandbox(ctx)
        return process_pb.ListResponse(
            processes=[
                process_pb.ProcessInfo(
                    config=process_pb.ProcessConfig(cmd=cmd, args=args),
                    pid=pid,
                    tag=sandbox.watched[pid].tag if pid in sandbox.watched else None,
                )
                for pid, (cmd, args) in sandbox.commands.items()
            ]
        )

    async def send_signal(self, request, ctx) -> process_pb.SendSignalResponse:
        sandbox = self._sandbox(ctx)
        watched = self._find(sandbox, request.process.selector)
        signum = signal.SIGTERM if request.signal == process_pb.Signal.SIGTERM else signal.SIGKILL
        with contextlib.suppress(ProcessLookupError):
            os.killpg(watched.process.pid, signum)
        return process_pb.SendSignalResponse()

    async def update(self, request, ctx):
        raise ConnectError(Code.UNIMPLEMENTED, "not in the fake")

    async def stream_input(self, request, ctx):
        raise ConnectError(Code.UNIMPLEMENTED, "not in the fake")

    async def send_input(self, request, ctx):
        raise ConnectError(Code.UNIMPLEMENTED, "not in the fake")

    async def close_stdin(self, request, ctx):
        raise ConnectError(Code.UNIMPLEMENTED, "not in the fake")


async def _events(queue: asyncio.Queue, ctx) -> AsyncIterator[process_pb.StartResponse]:
    """A subscriber's data events, then the end event; the stream ends there. With no
    output for the client's `Keepalive-Ping-Interval` seconds, a keepalive event (so a
    client that went away is noticed, as envd does)."""
    interval = float(ctx.request_headers.get("keepalive-ping-interval") or 0) or None
    while True:
        try:
            event = await asyncio.wait_for(queue.get(), interval)
        except TimeoutError:
            yield _event(Oneof("keepalive", PE.KeepAlive()))
            continue
        if isinstance(event, PE.EndEvent):
            yield _event(Oneof("end", event))
            return
        yield _event(Oneof("data", event))


def _event(event: Oneof) -> process_pb.StartResponse:
    return process_pb.StartResponse(event=PE(event=event))


async def _output(process: asyncio.subprocess.Process) -> AsyncIterator[tuple[str, bytes]]:
    """stdout and stderr chunks as they come, until both are closed."""
    queue: asyncio.Queue[tuple[str, bytes | None]] = asyncio.Queue()

    async def pump(name: str, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            await queue.put((name, chunk))
        await queue.put((name, None))

    assert process.stdout is not None and process.stderr is not None
    pumps = [
        asyncio.create_task(pump("stdout", process.stdout)),
        asyncio.create_task(pump("stderr", process.stderr)),
    ]
    try:
        open_streams = 2
        while open_streams:
            name, chunk = await queue.get()
            if chunk is None:
                open_streams -= 1
            else:
                yield name, chunk
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


def process_app(world: World) -> ProcessASGIApplication:
    return ProcessASGIApplication(ProcessService(world))
