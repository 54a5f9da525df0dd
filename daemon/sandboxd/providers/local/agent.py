"""The in-sandbox agent: the sandbox's first process, serving exec, files and liveness.

It runs *inside* the sandbox with the interpreter's standard library only (the daemon's
virtualenv is not visible there), and speaks newline-delimited JSON over a Unix socket:

  {"op": "ping"}                               -> {"ok": true, "pid": 1, "uptime_s": 1.2}
  {"op": "exec", "argv": [...] | "shell": "...", "env": {}, "cwd": "/workspace", "timeout": 5,
   "stdin": "<base64>" | "stdin_open": true, "tag": "..."}
                                               -> {"event": "started", "pid": N},
                                                  {"event": "stdout"|"stderr", "data": "<b64>"}*,
                                                  {"event": "exit", "code": 0, "timed_out": false}
  {"op": "procs"}                              -> {"ok": true, "procs": [{"pid", "argv", "cwd",
                                                   "tag"}]}  (the running exec'd commands)
  {"op": "signal", "pid": N, "signal": 9|15}   -> {"ok": true}  (exec'd commands only)
  {"op": "input", "pid": N, "data": "<b64>"}   -> {"ok": true}  (an exec with stdin_open)
  {"op": "close_stdin", "pid": N}              -> {"ok": true}
  {"op": "write", "path": p, "data": "<b64>"}  -> {"ok": true, "size": N, "path": absolute}
  {"op": "read", "path": p}                    -> {"ok": true, "data": "<b64>"}
  {"op": "stat", "path": p}                    -> {"ok": true, "entry": Entry}
  {"op": "list", "path": p, "depth": 1}        -> {"ok": true, "entries": [Entry]}
  {"op": "mkdir", "path": p}                   -> {"ok": true, "entry": Entry}
  {"op": "move", "path": p, "to": q}           -> {"ok": true, "entry": Entry}
  {"op": "remove", "path": p}                  -> {"ok": true}
     Entry: {"name", "type": file|dir|symlink|other, "path", "size", "mode", "permissions",
             "owner", "group", "mtime", "symlink_target", "is_symlink"}
  {"op": "reset"}                              -> {"ok": true, "killed": N}  (all but the agent;
                                                  the supervised program is stopped first)
  {"op": "supervise", "run": {...RunSpec}}     -> {"ok": true}  (replaces any program running)
  {"op": "health", "shell": cmd|null, "timeout": s, "since": seq}
                                               -> {"ok": true, "uptime_s": s,
                                                   "check": {"exit_code", "output", "timed_out"}
                                                            | null,
                                                   "program": Supervisor.status(since) | null}
Errors: {"ok": false, "error": "...", "kind": not_found|exists|not_dir|is_dir|denied|invalid|
other}. One request per connection. Paths are the sandbox's own (relative: to HOME): the agent
runs inside the sandbox, so bubblewrap's view is the only file system it can name.
"""

import argparse
import asyncio
import base64
import contextlib
import ctypes
import errno
import grp
import importlib.machinery
import importlib.util
import json
import os
import pwd
import resource
import shutil
import signal
import socket
import stat
import time
from typing import Any


def _load_supervisor(path: str):
    """supervisor.py, by path (the agent runs isolated, -I, with no sys.path of its own):
    beside this file inside the sandbox, or an inherited file descriptor's /proc path."""
    loader = importlib.machinery.SourceFileLoader("sandbox_supervisor", path)
    spec = importlib.util.spec_from_loader("sandbox_supervisor", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


supervisor: Any = None  # the supervisor module, loaded by main()

MAX_LINE = 64 * 1024 * 1024
STARTED = time.monotonic()


class Children(set):
    """Pids of the processes this agent started: asyncio's child watcher reaps those, so the
    orphan reaper must leave them alone. A child that exits before its pid is added here would
    look like an orphan, and reaping it would make asyncio report exit code 255; so while any
    start is in flight (`starting()`), the orphan reaper waits for the next round.
    """

    in_flight = 0

    @contextlib.contextmanager
    def starting(self):
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


RUNNING = Children()
PROCS: dict[int, dict] = {}  # exec'd commands by pid: {"proc", "argv", "cwd", "tag"}
CHECK_OUTPUT_CHARS = 500


class Program:
    """The one supervised program of this sandbox, if its pool has `run:`."""

    current = None  # supervisor.Supervisor
    task = None  # its asyncio.Task

    @classmethod
    async def replace(cls, run: dict | None, base_env: dict) -> None:
        if cls.current is not None:
            await cls.current.stop(cls.task)
        cls.current = cls.task = None
        if run:
            cls.current = supervisor.Supervisor(
                run, base_env, base_env.get("HOME", "/"), owned=RUNNING
            )
            cls.task = asyncio.get_running_loop().create_task(cls.current.loop())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def _send(writer: asyncio.StreamWriter, message: dict) -> None:
    writer.write(json.dumps(message).encode() + b"\n")
    await writer.drain()


async def _pump(stream: asyncio.StreamReader, name: str, writer: asyncio.StreamWriter) -> None:
    while chunk := await stream.read(65536):
        await _send(writer, {"event": name, "data": _b64(chunk)})


async def _exec(request: dict, base_env: dict, writer: asyncio.StreamWriter) -> None:
    env = {**base_env, **(request.get("env") or {})}
    cwd = request.get("cwd") or base_env.get("HOME", "/")
    stdin = base64.b64decode(request["stdin"]) if request.get("stdin") else None
    keep_open = bool(request.get("stdin_open")) and stdin is None
    if request.get("shell") is not None:
        argv = ["/bin/sh", "-c", request["shell"]]
    else:
        argv = [str(a) for a in request["argv"]]
    if not argv or not all(isinstance(v, str) for v in env.values()):
        await _send(
            writer, {"ok": False, "error": "argv and env must be strings", "kind": "invalid"}
        )
        return
    piped = stdin is not None or keep_open
    try:
        with RUNNING.starting():
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if piped else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
            RUNNING.add(proc.pid)
    except OSError as exc:
        error = f"cannot start {argv[0]!r}: {exc.strerror}"
        await _send(writer, {"ok": False, "error": error, "kind": _kind(exc)})
        return
    PROCS[proc.pid] = {"proc": proc, "argv": argv, "cwd": cwd, "tag": request.get("tag")}
    try:
        await _send(writer, {"event": "started", "pid": proc.pid})
        await _run(proc, stdin, request.get("timeout"), writer)
    finally:
        RUNNING.discard(proc.pid)
        PROCS.pop(proc.pid, None)


async def _run(proc, stdin: bytes | None, timeout: float | None, writer) -> None:
    if stdin is not None:
        proc.stdin.write(stdin)
        proc.stdin.close()
    timed_out = False
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(
                _pump(proc.stdout, "stdout", writer), _pump(proc.stderr, "stderr", writer)
            )
            code = await proc.wait()
    except TimeoutError:
        timed_out = True
        code = await _kill_group(proc)
    finally:
        if proc.returncode is None:  # client went away or we are cancelled
            await _kill_group(proc)
    await _send(writer, {"event": "exit", "code": code, "timed_out": timed_out})


async def _kill_group(proc: asyncio.subprocess.Process) -> int:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return await proc.wait()


def _path(request: dict, base_env: dict, field: str = "path") -> str:
    """Relative paths are in the sandbox's home, which is /workspace under bubblewrap."""
    path = request[field]
    if not isinstance(path, str) or not path or "\0" in path:
        raise ValueError(f"{field}: a non-empty path is required")
    return os.path.normpath(os.path.join(base_env.get("HOME", "/"), path))


def _kind(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return {
            errno.ENOENT: "not_found",
            errno.EEXIST: "exists",
            errno.ENOTEMPTY: "exists",
            errno.ENOTDIR: "not_dir",
            errno.EISDIR: "is_dir",
            errno.EACCES: "denied",
            errno.EPERM: "denied",
            errno.EROFS: "denied",
            errno.ESRCH: "not_found",
        }.get(exc.errno or 0, "other")
    return "invalid" if isinstance(exc, (ValueError, KeyError, TypeError)) else "other"


def _name(table, ident: int) -> str:
    try:
        return table(ident)[0]
    except (KeyError, OSError):
        return str(ident)


def _entry(path: str) -> dict:
    """What envd says of a path: a symlink's own entry names its target's type."""
    info = os.lstat(path)
    is_link = stat.S_ISLNK(info.st_mode)
    target = None
    if is_link:
        target = os.readlink(path)
        with contextlib.suppress(OSError):
            info = os.stat(path)
    kind = (
        "dir"
        if stat.S_ISDIR(info.st_mode)
        else "file"
        if stat.S_ISREG(info.st_mode)
        else "symlink"
        if stat.S_ISLNK(info.st_mode)
        else "other"
    )
    return {
        "name": os.path.basename(path) or "/",
        "type": kind,
        "path": path,
        "size": info.st_size,
        "mode": stat.S_IMODE(info.st_mode),
        "permissions": stat.filemode(info.st_mode),
        "owner": _name(pwd.getpwuid, info.st_uid),
        "group": _name(grp.getgrgid, info.st_gid),
        "mtime": info.st_mtime,
        "symlink_target": target,
        "is_symlink": is_link,
    }


MAX_ENTRIES = 100_000


def _list(request: dict, base_env: dict) -> dict:
    root = _path(request, base_env)
    depth = min(64, max(1, int(request.get("depth") or 1)))
    if not os.path.isdir(root):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", root)
    entries: list[dict] = []
    level = [root]
    for _ in range(depth):
        below = []
        for directory in level:
            with os.scandir(directory) as found:
                names = sorted(e.name for e in found)
            for name in names:
                path = os.path.join(directory, name)
                with contextlib.suppress(FileNotFoundError):
                    entries.append(_entry(path))
                    if entries[-1]["type"] == "dir" and not entries[-1]["is_symlink"]:
                        below.append(path)
                if len(entries) >= MAX_ENTRIES:
                    return {"ok": True, "entries": entries, "truncated": True}
        level = below
        if not level:
            break
    return {"ok": True, "entries": entries}


def _mkdir(request: dict, base_env: dict) -> dict:
    path = _path(request, base_env)
    if os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, "already exists", path)
    os.makedirs(path)
    return {"ok": True, "entry": _entry(path)}


def _move(request: dict, base_env: dict) -> dict:
    source, target = _path(request, base_env), _path(request, base_env, "to")
    os.lstat(source)  # not found before any directory is made
    os.makedirs(os.path.dirname(target) or "/", exist_ok=True)
    os.rename(source, target)
    return {"ok": True, "entry": _entry(target)}


def _remove(request: dict, base_env: dict) -> dict:
    path = _path(request, base_env)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)
    return {"ok": True}


def _exec_proc(request: dict) -> dict:
    pid = request["pid"]
    if not isinstance(pid, int) or pid not in PROCS:
        raise ProcessLookupError(errno.ESRCH, f"no command with pid {pid!r}")
    return PROCS[pid]


def _signal(request: dict) -> dict:
    proc = _exec_proc(request)["proc"]
    signum = signal.SIGTERM if request.get("signal") == signal.SIGTERM else signal.SIGKILL
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signum)
    return {"ok": True}


async def _input(request: dict) -> dict:
    proc = _exec_proc(request)["proc"]
    if proc.stdin is None or proc.stdin.is_closing():
        raise ValueError("the command's stdin is not open (start it with stdin)")
    if request.get("op") == "close_stdin":
        proc.stdin.close()
    else:
        proc.stdin.write(base64.b64decode(request.get("data") or ""))
        await proc.stdin.drain()
    return {"ok": True}


def _procs() -> dict:
    listed = [
        {"pid": pid, "argv": p["argv"], "cwd": p["cwd"], "tag": p["tag"]}
        for pid, p in sorted(PROCS.items())
    ]
    return {"ok": True, "procs": listed}


def _write(request: dict, base_env: dict) -> dict:
    data = base64.b64decode(request.get("data") or "")
    path = _path(request, base_env)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
    if request.get("mode") is not None:
        os.chmod(path, int(request["mode"]))
    return {"ok": True, "size": len(data), "path": path}


def _read(request: dict, base_env: dict) -> dict:
    with open(_path(request, base_env), "rb") as handle:
        return {"ok": True, "data": _b64(handle.read())}


async def _reset() -> dict:
    """Kill every process the last holder left behind.

    As the namespace's PID 1, kill(-1) reaches exactly the sandbox's other processes, even
    daemonized ones. Without a PID namespace only the exec'd commands' sessions are ours.
    """
    if os.getpid() == 1:
        others = _other_pids()
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
        # Wait until they are gone, zombies reaped too (`ps` would still list those).
        deadline = time.monotonic() + 5.0
        while set(_other_pids()) - RUNNING and time.monotonic() < deadline:
            _reap_orphans(RUNNING)
            await asyncio.sleep(0.002)
        return {"ok": True, "killed": len(others)}
    groups = set(RUNNING)
    for pid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    return {"ok": True, "killed": len(groups)}


async def _health(request: dict, base_env: dict) -> dict:
    check = None
    if request.get("shell"):
        result = await _capture(request["shell"], base_env, request.get("timeout") or 5)
        check = result
    program = Program.current.status(int(request.get("since") or 0)) if Program.current else None
    uptime = round(time.monotonic() - STARTED, 3)
    return {"ok": True, "uptime_s": uptime, "check": check, "program": program}


async def _capture(shell: str, base_env: dict, timeout: float) -> dict:
    with RUNNING.starting():
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            shell,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=base_env,
            cwd=base_env.get("HOME", "/"),
            start_new_session=True,
        )
        RUNNING.add(proc.pid)
    try:
        async with asyncio.timeout(timeout):
            output, _ = await proc.communicate()
        text = output.decode(errors="replace")[-CHECK_OUTPUT_CHARS:]
        return {"exit_code": proc.returncode, "output": text, "timed_out": False}
    except TimeoutError:
        await _kill_group(proc)
        return {"exit_code": None, "output": "", "timed_out": True}
    finally:
        if proc.returncode is None:
            await _kill_group(proc)
        RUNNING.discard(proc.pid)


FILE_OPS = {
    "write": _write,
    "read": _read,
    "stat": lambda request, base_env: {"ok": True, "entry": _entry(_path(request, base_env))},
    "list": _list,
    "mkdir": _mkdir,
    "move": _move,
    "remove": _remove,
}


def _other_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]


def _handler(base_env: dict):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline())
            op = request.get("op")
            if op == "exec":
                await _exec(request, base_env, writer)
            elif op == "ping":
                uptime = round(time.monotonic() - STARTED, 3)
                await _send(writer, {"ok": True, "pid": os.getpid(), "uptime_s": uptime})
            elif op == "reset":
                await Program.replace(None, base_env)
                await _send(writer, await _reset())
            elif op == "supervise":
                await Program.replace(request.get("run"), base_env)
                await _send(writer, {"ok": True})
            elif op == "health":
                await _send(writer, await _health(request, base_env))
            elif op in FILE_OPS:
                await _send(writer, FILE_OPS[op](request, base_env))
            elif op == "procs":
                await _send(writer, _procs())
            elif op == "signal":
                await _send(writer, _signal(request))
            elif op in ("input", "close_stdin"):
                await _send(writer, await _input(request))
            else:
                await _send(writer, {"ok": False, "error": f"unknown op {op!r}"})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            error = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "kind": _kind(exc)}
            with contextlib.suppress(OSError):
                await _send(writer, error)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    return handle


def _reap_orphans(own: Children) -> None:
    """As PID 1 we inherit orphaned grandchildren; reap the zombies that are not ours."""
    if own.in_flight:
        return
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in own:
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and fields[1] == "1":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry), os.WNOHANG)


async def _reaper() -> None:
    while True:
        await asyncio.sleep(1.0)
        _reap_orphans(RUNNING)


def _apply_limits(memory_mb: int | None) -> None:
    if memory_mb:
        limit = memory_mb * 1024 * 1024
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


async def serve(listen_fd: int, base_env: dict) -> None:
    """Serve on the listening socket the daemon made on the host side and handed over: its
    path is in a directory the sandbox cannot see, so nothing inside can replace it."""
    sock = socket.socket(fileno=listen_fd)
    sock.set_inheritable(False)  # exec'd commands never get the control socket
    server = await asyncio.start_unix_server(_handler(base_env), sock=sock, limit=MAX_LINE)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server, asyncio.TaskGroup() as group:
        if os.getpid() == 1:
            reaper = group.create_task(_reaper())
        await stop.wait()
        if os.getpid() == 1:
            reaper.cancel()


def _not_dumpable() -> None:
    """No core dumps, and no ptrace or /proc/1/fd access by the sandbox's other processes
    (they hold no capability): the agent's sockets and memory stay its own."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0


def main() -> None:
    parser = argparse.ArgumentParser(description="sandboxd in-sandbox agent")
    parser.add_argument("--listen-fd", type=int, required=True, help="listening Unix socket")
    parser.add_argument("--env-fd", type=int, required=True, help="JSON object: the base env")
    parser.add_argument("--memory-mb", type=int, default=None, help="RLIMIT_AS (no cgroup)")
    parser.add_argument(
        "--supervisor",
        # beside this file inside a sandbox (/opt/sandboxd); otherwise the provider names it
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "supervisor.py"),
    )
    args = parser.parse_args()
    global supervisor
    supervisor = _load_supervisor(args.supervisor)
    _not_dumpable()
    with os.fdopen(args.env_fd, "rb") as handle:
        base_env = json.loads(handle.read())
    _apply_limits(args.memory_mb)
    os.umask(0o022)
    asyncio.run(serve(args.listen_fd, base_env))


if __name__ == "__main__":
    main()
