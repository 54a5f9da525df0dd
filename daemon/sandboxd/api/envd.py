"""envd's API for local sandboxes: what the `e2b` SDK calls once it holds a sandbox
(`commands`, `files`), served by `sandboxd api` and carried to the sandbox's agent.

Routing is E2B's: with `E2B_SANDBOX_URL` the SDK sends every envd call to one URL with the
sandbox's id in `E2b-Sandbox-Id` (and the port, envd's 49983, in `E2b-Sandbox-Port`); with a
wildcard domain the host name is `<port>-<sandbox id>.<domain>`. Every call must carry the
claim's envd access token (`X-Access-Token`), which the API made at create and keeps only as
its SHA-256; a sandbox that is not a live claim of a local pool is E2B's proxy's 502, a
wrong token envd's 401.

The agent is reached through `<local.workspace_root>/<sandbox id>/agent.sock` only — the
path is made from this server's configuration and the id, checked by `trusted_socket`, never
read from a record. Paths are resolved by the agent inside the sandbox, so a call names
nothing but the sandbox's own file system view.

Served: process.Process Start (streamed start, stdout/stderr or PTY data, end), Connect,
List, SendSignal, SendInput and StreamInput (stdin or a PTY's keys), CloseStdin, Update (a
PTY's size); filesystem.Filesystem Stat, ListDir, MakeDir, Move, Remove, WatchDir (the async
SDK's watch) and CreateWatcher/GetWatcherEvents/RemoveWatcher (the sync SDK's, polled);
GET /files (download), POST /files (multipart upload), GET /health.

As envd's, a command outlives the stream that started it (closing it early leaves the command
running, until it ends, is killed or its deadline passes); Connect follows it again, in this
sandbox only (the sandbox's own agent holds its commands and watchers, and a release's reset
ends them). Output nobody follows is dropped, and a slow client slows the command's output
pipe: nothing is buffered here or in the agent beyond a chunk. Watchers are inotify in the
agent, bounded (watchers a sandbox, directories a watch, events held between two polls); past
a bound a watcher fails ("events lost") rather than grow. Quiet streams get keepalive events
at the client's `Keepalive-Ping-Interval`.
"""

import asyncio
import contextlib
import hashlib
import hmac
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from e2b.envd.filesystem import filesystem_pb
from e2b.envd.filesystem.filesystem_connect import Filesystem, FilesystemASGIApplication
from e2b.envd.process import process_pb
from e2b.envd.process.process_connect import Process, ProcessASGIApplication
from protobuf import Oneof
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp
from redis.exceptions import RedisError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandboxd.api.e2binit import ENVD_PORT
from sandboxd.api.limits import BodyTooLarge
from sandboxd.api.registry import Entry, Registry
from sandboxd.client.connections import UnreachableSandbox, trusted_socket
from sandboxd.providers.local.agentclient import AgentClient, AgentError

log = logging.getLogger("sandboxd.api")

# The envd version the SDK is told: 0.4.0+ sends no default user; 0.5.2+ may close stdin;
# below 0.5.7 uploads are multipart (no octet-stream, no gzip), below 0.6.2 no file metadata.
ENVD_VERSION = "0.5.2"
MAX_UPLOAD = 32 * 1024 * 1024  # one file: the agent's JSON line carries it in base64
FILE_TRANSFERS = 4  # uploads and downloads in flight at once, per API server
MAX_LIST_DEPTH = 64  # ListDir: the SDK asks for 1 or a few; a huge depth would busy the agent
PE = process_pb.ProcessEvent
WDR = filesystem_pb.WatchDirResponse


EVENT_TYPES = {
    "create": filesystem_pb.EventType.CREATE,
    "write": filesystem_pb.EventType.WRITE,
    "remove": filesystem_pb.EventType.REMOVE,
    "rename": filesystem_pb.EventType.RENAME,
    "chmod": filesystem_pb.EventType.CHMOD,
}
FILE_TYPES = {
    "file": filesystem_pb.FileType.FILE,
    "dir": filesystem_pb.FileType.DIRECTORY,
    "symlink": filesystem_pb.FileType.SYMLINK,
}
CODES = {
    "not_found": Code.NOT_FOUND,
    "exists": Code.ALREADY_EXISTS,
    "not_dir": Code.INVALID_ARGUMENT,
    "is_dir": Code.INVALID_ARGUMENT,
    "invalid": Code.INVALID_ARGUMENT,
    "denied": Code.PERMISSION_DENIED,
    "exhausted": Code.RESOURCE_EXHAUSTED,  # watchers or followers: a bound reached
    "too_large": Code.RESOURCE_EXHAUSTED,
    "overflow": Code.INTERNAL,  # a watcher lost events (envd's watcher error too)
    "unreachable": Code.UNAVAILABLE,
}
STATUSES = {
    "not_found": 404,
    "is_dir": 400,
    "not_dir": 400,
    "invalid": 400,
    "denied": 403,
    "too_large": 413,
}


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def envd_token(claim_token: str) -> str:
    """A local claim's envd access token, derived from its claim token (256 random bits,
    kept by the API's registry anyway): so `connect` can hand the same token out again
    without any more secrets stored, and it ends with the claim."""
    mac = hmac.new(claim_token.encode(), b"sandboxd envd access token", hashlib.sha256)
    return "sbe_" + mac.hexdigest()


class Refused(Exception):
    """An envd call refused before it reached an agent: HTTP status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> JSONResponse:
        return JSONResponse({"code": self.status, "message": self.message}, self.status)

    def connect_error(self) -> ConnectError:
        code = {401: Code.UNAUTHENTICATED, 502: Code.UNAVAILABLE}.get(self.status, Code.INTERNAL)
        return ConnectError(code, self.message)


@dataclass
class Target:
    entry: Entry
    agent: AgentClient


class Envd:
    """Finds the sandbox an envd call is for, and checks its access token."""

    def __init__(self, registry: Registry, local_root: Path | None):
        self.registry = registry
        self.local_root = local_root

    async def target(self, headers: Mapping[str, str]) -> Target:
        sandbox_id, port = _sandbox_id(headers)
        if not sandbox_id:
            raise Refused(
                502,
                "no sandbox named: send E2b-Sandbox-Id, or use the host name "
                "<port>-<sandbox id>.<domain>",
            )
        if port and port != str(ENVD_PORT):
            raise Refused(502, f"port {port} of sandbox {sandbox_id} is not served by sandboxd")
        try:
            entry = await self.registry.get(sandbox_id) if sandbox_id else None
        except RedisError:
            raise Refused(502, "sandboxd cannot reach Redis") from None
        if entry is None or entry.provider != "local" or not entry.envd_token_sha256:
            raise Refused(502, f"The sandbox {sandbox_id} was not found")
        token = headers.get("x-access-token") or ""
        if not hmac.compare_digest(token_digest(token), entry.envd_token_sha256):
            raise Refused(401, "invalid access token")
        if entry.paused:
            raise Refused(502, f"The sandbox {sandbox_id} is paused: connect to it to resume")
        return Target(entry, self.agent(entry))

    def agent(self, entry: Entry) -> AgentClient:
        """The agent of a local claim's sandbox, by this server's registry path."""
        if self.local_root is None:
            raise Refused(502, "this sandboxd api has no local.workspace_root")
        path = str(self.local_root / entry.sandbox / "agent.sock")
        try:
            return AgentClient(trusted_socket(path, entry.sandbox))
        except UnreachableSandbox as exc:
            log.warning("sandbox %s: %s", entry.sandbox, exc, extra={"sandbox": entry.sandbox})
            raise Refused(502, f"The sandbox {entry.e2b_id} is not reachable") from None


def _sandbox_id(headers: Mapping[str, str]) -> tuple[str, str | None]:
    """The sandbox and port asked for: `E2b-Sandbox-Id` and `E2b-Sandbox-Port`, else the
    host name's first label `<port>-<sandbox id>`."""
    found = headers.get("e2b-sandbox-id")
    if found:
        return found, headers.get("e2b-sandbox-port")
    label = (headers.get("host") or "").split(":")[0].split(".")[0]
    port, _, sandbox_id = label.partition("-")
    return (sandbox_id, port) if port.isdigit() and sandbox_id else ("", None)


def _failed(exc: AgentError) -> ConnectError:
    return ConnectError(CODES.get(exc.kind, Code.INTERNAL), str(exc))


async def _target(envd: Envd, ctx: Any) -> Target:
    try:
        return await envd.target(ctx.request_headers)
    except Refused as exc:
        raise exc.connect_error() from None


class ProcessService(Process):
    """process.Process, carried to the sandbox's agent."""

    def __init__(self, envd: Envd):
        self.envd = envd

    async def start(self, request: Any, ctx: Any) -> AsyncIterator[process_pb.StartResponse]:
        """A command as envd runs it: it outlives this stream (Connect follows it again),
        and ends at the call's deadline (`Connect-Timeout-Ms`, the SDK's `timeout`)."""
        target = await _target(self.envd, ctx)
        config = request.process or process_pb.ProcessConfig()
        if not config.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is required")
        pty = None
        if request.pty is not None:
            size = request.pty.size or process_pb.PTY.Size()
            pty = {"rows": size.rows, "cols": size.cols}
        # E2B's own (a program may ask whether and where it runs in a sandbox), the claim's
        # envVars (late binding: the warm sandbox stays warm), then the call's.
        env = {
            "E2B_SANDBOX": "true",
            "E2B_SANDBOX_ID": target.entry.e2b_id,
            "E2B_TEMPLATE_ID": target.entry.template,
            **target.entry.env_vars,
            **dict(config.envs),
        }
        timeout_ms = ctx.timeout_ms
        events = target.agent.start(
            [config.cmd, *config.args],
            env=env,
            cwd=config.cwd or None,
            timeout=timeout_ms / 1000 if timeout_ms is not None else None,
            stdin_open=bool(request.stdin) and pty is None,
            tag=request.tag if request.tag else None,
            pty=pty,
        )
        async with contextlib.aclosing(
            _kept_alive(_process_events(events), ctx, _process_keepalive)
        ) as stream:
            async for event in stream:  # (closed early: the command runs on)
                yield process_pb.StartResponse(event=event)

    async def connect(self, request: Any, ctx: Any) -> AsyncIterator[process_pb.ConnectResponse]:
        """Follow a command Start started, in this sandbox only (its own agent): output from
        now on, then its end; one that ended within 30 s answers its start and end."""
        target = await _target(self.envd, ctx)
        selector = request.process.selector if request.process is not None else None
        if selector is None:
            raise ConnectError(Code.INVALID_ARGUMENT, "a process selector is required")
        if selector.field == "pid":
            events = target.agent.attach(pid=int(selector.value))
        else:
            events = target.agent.attach(tag=str(selector.value))
        async with contextlib.aclosing(
            _kept_alive(_process_events(events), ctx, _process_keepalive)
        ) as stream:
            async for event in stream:  # (closed early: the command runs on)
                yield process_pb.ConnectResponse(event=event)

    async def list(self, request: Any, ctx: Any) -> process_pb.ListResponse:
        target = await _target(self.envd, ctx)
        try:
            procs = await target.agent.procs()
        except AgentError as exc:
            raise _failed(exc) from None
        return process_pb.ListResponse(
            processes=[
                process_pb.ProcessInfo(
                    config=process_pb.ProcessConfig(
                        cmd=p["argv"][0], args=p["argv"][1:], cwd=p.get("cwd") or None
                    ),
                    pid=p["pid"],
                    tag=p.get("tag") or None,
                )
                for p in procs
            ]
        )

    async def _pid(self, target: Target, selector: Any) -> int:
        if selector is None or selector.selector is None:
            raise ConnectError(Code.INVALID_ARGUMENT, "a process selector is required")
        if selector.selector.field == "pid":
            return int(selector.selector.value)
        for p in await target.agent.procs():
            if p.get("tag") == selector.selector.value:
                return int(p["pid"])
        raise ConnectError(Code.NOT_FOUND, f"no process tagged {selector.selector.value!r}")

    async def send_signal(self, request: Any, ctx: Any) -> process_pb.SendSignalResponse:
        target = await _target(self.envd, ctx)
        signum = 15 if request.signal == process_pb.Signal.SIGTERM else 9
        try:
            await target.agent.signal(await self._pid(target, request.process), signum)
        except AgentError as exc:
            raise _failed(exc) from None
        return process_pb.SendSignalResponse()

    async def send_input(self, request: Any, ctx: Any) -> process_pb.SendInputResponse:
        target = await _target(self.envd, ctx)
        given = request.input.input if request.input is not None else None
        if given is None:
            raise ConnectError(Code.INVALID_ARGUMENT, "input is required")
        try:
            await _deliver(target, await self._pid(target, request.process), given)
        except AgentError as exc:
            raise _failed(exc) from None
        return process_pb.SendInputResponse()

    async def close_stdin(self, request: Any, ctx: Any) -> process_pb.CloseStdinResponse:
        target = await _target(self.envd, ctx)
        try:
            await target.agent.close_stdin(await self._pid(target, request.process))
        except AgentError as exc:
            raise _failed(exc) from None
        return process_pb.CloseStdinResponse()

    async def update(self, request: Any, ctx: Any) -> process_pb.UpdateResponse:
        """A PTY's new size (the SDK's `pty.resize`)."""
        target = await _target(self.envd, ctx)
        if request.pty is None or request.pty.size is None:
            raise ConnectError(Code.INVALID_ARGUMENT, "pty.size is required")
        size = request.pty.size
        try:
            pid = await self._pid(target, request.process)
            await target.agent.resize(pid, size.rows, size.cols)
        except AgentError as exc:
            raise _failed(exc) from None
        return process_pb.UpdateResponse()

    async def stream_input(
        self, request: AsyncIterator[Any], ctx: Any
    ) -> process_pb.StreamInputResponse:
        """Input as a stream (the SDK's `stream_input`): a start naming the command, then its
        stdin or a PTY's keys, each delivered as SendInput would; keepalives are ignored."""
        target = await _target(self.envd, ctx)
        pid = None
        try:
            async for message in request:
                event = message.event
                if event is None or event.field == "keepalive":
                    continue
                if event.field == "start":
                    pid = await self._pid(target, event.value.process)
                    if pid not in [p["pid"] for p in await target.agent.procs()]:
                        raise ConnectError(Code.NOT_FOUND, f"no process with pid {pid}")
                elif pid is None:
                    raise ConnectError(Code.INVALID_ARGUMENT, "the stream starts with start")
                elif event.value.input is not None and event.value.input.input is not None:
                    await _deliver(target, pid, event.value.input.input)
        except AgentError as exc:
            raise _failed(exc) from None
        return process_pb.StreamInputResponse()


async def _deliver(target: Target, pid: int, given: Any) -> None:
    """Input to a command: its stdin, or a PTY's keys."""
    if given.field == "pty":
        await target.agent.tty_input(pid, given.value)
    else:
        await target.agent.send_input(pid, given.value)


async def _process_events(
    events: AsyncGenerator[tuple[str, Any], None],
) -> AsyncGenerator[Any, None]:
    """The agent's events of a command as envd's ProcessEvents. Closing this early (the
    client went away) leaves the command running, as envd's."""
    try:
        async for event, value in events:
            one: Any  # (a Oneof: its field name is typed as a Literal)
            if event == "started":
                one = Oneof("start", PE.StartEvent(pid=value))
            elif event in ("stdout", "stderr", "pty"):
                output: Any = Oneof(event, value)
                one = Oneof("data", PE.DataEvent(output=output))
            else:
                code, timed_out = value
                end = PE.EndEvent(
                    exit_code=code,
                    exited=True,
                    status=f"exit status {code}",
                    error="timed out" if timed_out else None,
                )
                one = Oneof("end", end)
            yield PE(event=one)
    except AgentError as exc:
        raise _failed(exc) from None
    finally:
        await events.aclose()


def _entry(found: dict[str, Any]) -> filesystem_pb.EntryInfo:
    mtime = float(found.get("mtime") or 0)
    return filesystem_pb.EntryInfo(
        name=str(found["name"]),
        type=FILE_TYPES.get(found.get("type", ""), filesystem_pb.FileType.UNSPECIFIED),
        path=str(found["path"]),
        size=int(found.get("size") or 0),
        mode=int(found.get("mode") or 0),
        permissions=str(found.get("permissions") or ""),
        owner=str(found.get("owner") or ""),
        group=str(found.get("group") or ""),
        modified_time=Timestamp(seconds=int(mtime), nanos=int((mtime % 1) * 1e9)),
        symlink_target=found.get("symlink_target"),
        is_symlink=bool(found.get("is_symlink")),
    )


class FilesystemService(Filesystem):
    """filesystem.Filesystem, carried to the sandbox's agent."""

    def __init__(self, envd: Envd):
        self.envd = envd

    async def stat(self, request: Any, ctx: Any) -> filesystem_pb.StatResponse:
        target = await _target(self.envd, ctx)
        try:
            return filesystem_pb.StatResponse(entry=_entry(await target.agent.stat(request.path)))
        except AgentError as exc:
            raise _failed(exc) from None

    async def list_dir(self, request: Any, ctx: Any) -> filesystem_pb.ListDirResponse:
        target = await _target(self.envd, ctx)
        try:
            depth = min(MAX_LIST_DEPTH, max(1, request.depth or 1))
            found = await target.agent.listdir(request.path, depth)
        except AgentError as exc:
            raise _failed(exc) from None
        return filesystem_pb.ListDirResponse(entries=[_entry(e) for e in found])

    async def make_dir(self, request: Any, ctx: Any) -> filesystem_pb.MakeDirResponse:
        target = await _target(self.envd, ctx)
        try:
            return filesystem_pb.MakeDirResponse(
                entry=_entry(await target.agent.mkdir(request.path))
            )
        except AgentError as exc:
            raise _failed(exc) from None

    async def move(self, request: Any, ctx: Any) -> filesystem_pb.MoveResponse:
        target = await _target(self.envd, ctx)
        try:
            moved = await target.agent.move(request.source, request.destination)
        except AgentError as exc:
            raise _failed(exc) from None
        return filesystem_pb.MoveResponse(entry=_entry(moved))

    async def remove(self, request: Any, ctx: Any) -> filesystem_pb.RemoveResponse:
        target = await _target(self.envd, ctx)
        try:
            await target.agent.remove(request.path)
        except AgentError as exc:
            raise _failed(exc) from None
        return filesystem_pb.RemoveResponse()

    async def watch_dir(self, request: Any, ctx: Any) -> AsyncIterator[Any]:
        """The async SDK's `watch_dir`: a start event once the watch is set, then each event;
        the watch (inotify, in the agent) ends with the stream."""
        target = await _target(self.envd, ctx)
        events = target.agent.watch(request.path, bool(request.recursive))
        async with contextlib.aclosing(
            _kept_alive(_watch_events(events), ctx, _watch_keepalive)
        ) as stream:
            async for event in stream:
                yield event

    async def create_watcher(self, request: Any, ctx: Any) -> Any:
        """The sync SDK's `watch_dir`: a watcher in the agent holds the events (bounded)
        until GetWatcherEvents; RemoveWatcher (or the sandbox's release) ends it."""
        target = await _target(self.envd, ctx)
        try:
            watcher_id = await target.agent.watcher_add(request.path, bool(request.recursive))
        except AgentError as exc:
            raise _failed(exc) from None
        return filesystem_pb.CreateWatcherResponse(watcher_id=watcher_id)

    async def get_watcher_events(self, request: Any, ctx: Any) -> Any:
        target = await _target(self.envd, ctx)
        try:
            found = await target.agent.watcher_events(request.watcher_id)
        except AgentError as exc:
            raise _failed(exc) from None
        return filesystem_pb.GetWatcherEventsResponse(events=[_fs_event(e) for e in found])

    async def remove_watcher(self, request: Any, ctx: Any) -> Any:
        target = await _target(self.envd, ctx)
        try:
            await target.agent.watcher_remove(request.watcher_id)
        except AgentError as exc:
            raise _failed(exc) from None
        return filesystem_pb.RemoveWatcherResponse()


async def _watch_events(
    events: AsyncGenerator[list[dict[str, str]], None],
) -> AsyncGenerator[Any, None]:
    try:
        async for batch in events:
            one: Any  # (a Oneof: its field name is typed as a Literal)
            if not batch:
                one = Oneof("start", WDR.StartEvent())
                yield WDR(event=one)
            for found in batch:
                one = Oneof("filesystem", _fs_event(found))
                yield WDR(event=one)
    except AgentError as exc:
        raise _failed(exc) from None
    finally:
        await events.aclose()


async def _kept_alive(
    events: AsyncGenerator[Any, None], ctx: Any, keepalive: Callable[[], Any]
) -> AsyncGenerator[Any, None]:
    """`events`, and a keepalive event whenever none came for the interval the client asks
    for (`Keepalive-Ping-Interval`, s), as envd: a quiet stream stays open through proxies."""
    asked = ctx.request_headers.get("keepalive-ping-interval")
    try:
        interval = max(1.0, float(asked)) if asked else None
    except ValueError:
        interval = None
    if interval is None:
        async for event in events:
            yield event
        return
    pending: asyncio.Task | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield keepalive()
                continue
            found, pending = pending, None
            try:
                event = found.result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        await events.aclose()


def _process_keepalive() -> Any:
    one: Any = Oneof("keepalive", PE.KeepAlive())
    return PE(event=one)


def _watch_keepalive() -> Any:
    one: Any = Oneof("keepalive", WDR.KeepAlive())
    return WDR(event=one)


def _fs_event(found: dict[str, str]) -> filesystem_pb.FilesystemEvent:
    kind = EVENT_TYPES.get(found.get("type", ""), filesystem_pb.EventType.UNSPECIFIED)
    return filesystem_pb.FilesystemEvent(name=str(found.get("name", "")), type=kind)


def _http_failure(exc: AgentError) -> JSONResponse:
    status = STATUSES.get(exc.kind, 502 if exc.kind == "unreachable" else 500)
    return JSONResponse({"code": status, "message": str(exc)}, status)


def routes(envd: Envd) -> list[Route]:
    """GET /health, GET /files (download), POST /files (multipart upload). At most
    FILE_TRANSFERS of them at once per API server: each holds up to a few times its file in
    memory (and an upload up to limits.MAX_FILES_BODY on disk); more wait their turn."""
    transfers = asyncio.Semaphore(FILE_TRANSFERS)

    async def health(request: Request) -> Response:
        try:
            await envd.target(request.headers)
        except Refused as exc:
            return exc.response()
        return Response(status_code=204)

    async def read_file(request: Request) -> Response:
        try:
            target = await envd.target(request.headers)
        except Refused as exc:
            return exc.response()
        path = request.query_params.get("path")
        if not path:
            return JSONResponse({"code": 400, "message": "path is required"}, 400)
        try:
            async with transfers:
                data = await target.agent.read(path)
        except AgentError as exc:
            return _http_failure(exc)
        return Response(data, media_type="application/octet-stream")

    async def write_file(request: Request) -> Response:
        try:
            target = await envd.target(request.headers)
        except Refused as exc:
            return exc.response()
        try:
            async with transfers:
                return await _write_files(request, target)
        except BodyTooLarge as exc:  # past limits.MAX_FILES_BODY: read no further
            return exc.response()
        except ClientDisconnect:  # gone mid-upload: nothing to answer, nothing to log
            return Response(status_code=400)

    async def _write_files(request: Request, target: Target) -> Response:
        written = []
        # Only file parts are wanted: Starlette keeps other fields in memory (max_part_size
        # bounds each, max_fields their number), so allow next to none of them.
        async with request.form(max_files=100, max_fields=4, max_part_size=4096) as form:
            for upload in form.getlist("file"):
                if isinstance(upload, str):
                    continue
                path = request.query_params.get("path") or upload.filename
                if not path:
                    return JSONResponse({"code": 400, "message": "path is required"}, 400)
                data = await upload.read(MAX_UPLOAD + 1)
                if len(data) > MAX_UPLOAD:
                    message = f"a file of sandboxd's envd is at most {MAX_UPLOAD} bytes"
                    return JSONResponse({"code": 413, "message": message}, 413)
                try:
                    where = await target.agent.put(path, data)
                except AgentError as exc:
                    return _http_failure(exc)
                written.append({"name": where.rsplit("/", 1)[-1], "type": "file", "path": where})
        return JSONResponse(written)

    return [
        Route("/health", health, methods=["GET"]),
        Route("/files", read_file, methods=["GET"]),
        Route("/files", write_file, methods=["POST"]),
    ]


def rpc_apps(envd: Envd) -> dict[str, Any]:
    """The Connect-RPC apps by their path prefix."""
    return {
        "/process.Process/": ProcessASGIApplication(ProcessService(envd)),
        "/filesystem.Filesystem/": FilesystemASGIApplication(FilesystemService(envd)),
    }
