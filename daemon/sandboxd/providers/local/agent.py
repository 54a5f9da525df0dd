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
  envd's commands, which outlive their connection (see "envd:" below):
  {"op": "start", "argv": [...], "env", "cwd", "timeout", "stdin_open", "tag",
   "pty": {"rows", "cols"} | null}            -> as exec ("pty" events for a PTY); closing the
                                                  connection leaves the command running
  {"op": "connect", "pid": N | "tag": t}       -> {"event": "started"}, output from now on,
                                                  {"event": "exit"} (one that ended lately:
                                                  started and exit)
  {"op": "tty_input", "pid": N, "data": b64}   -> {"ok": true}  (keys to a PTY)
  {"op": "resize", "pid": N, "size": {"rows", "cols"}} -> {"ok": true}
  {"op": "watch", "path": p, "recursive": b}   -> {"event": "started"}, {"event": "fs",
                                                  "events": [{"name", "type"}]}* until the
                                                  connection closes
  {"op": "watcher_add", "path", "recursive"}   -> {"ok": true, "id": "w..."}
  {"op": "watcher_events", "id": w}            -> {"ok": true, "events": [...]} (since the last)
  {"op": "watcher_remove", "id": w}            -> {"ok": true}
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
  {"op": "freeze"} / {"op": "thaw"}            -> {"ok": true, "processes": N}  (SIGSTOP /
                                                  SIGCONT to every process but the agent)
  {"op": "health", "shell": cmd|null, "timeout": s, "since": seq}
                                               -> {"ok": true, "uptime_s": s,
                                                   "check": {"exit_code", "output", "timed_out"}
                                                            | null,
                                                   "program": Supervisor.status(since) | null}
Errors: {"ok": false, "error": "...", "kind": not_found|exists|not_dir|is_dir|denied|invalid|
exhausted|overflow|other}. One request per connection. Paths are the sandbox's own (relative:
to HOME): the agent runs inside the sandbox, so bubblewrap's view is the only file system it
can name.
"""

import argparse
import asyncio
import base64
import contextlib
import ctypes
import errno
import fcntl
import functools
import grp
import importlib.machinery
import importlib.util
import json
import os
import pwd
import resource
import secrets
import shutil
import signal
import socket
import stat
import struct
import sys
import termios
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
MAX_READ = 32 * 1024 * 1024  # one file read: its base64 is one reply line


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
    """A regular file of at most MAX_READ bytes. Opened without blocking and checked before
    a byte is read: a FIFO would stop the agent, /dev/zero never ends, and a reply must fit
    one message line (base64 of MAX_READ is well under MAX_LINE)."""
    fd = os.open(_path(request, base_env), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        found = os.fstat(handle.fileno())
        if stat.S_ISDIR(found.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        if not stat.S_ISREG(found.st_mode):
            return {"ok": False, "error": "not a regular file", "kind": "invalid"}
        data = handle.read(MAX_READ + 1)
    if len(data) > MAX_READ:
        error = f"the file is larger than the {MAX_READ} bytes a read carries"
        return {"ok": False, "error": error, "kind": "too_large"}
    return {"ok": True, "data": _b64(data)}


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


def _freeze(signum: int) -> dict:
    """Stop (SIGSTOP) or continue (SIGCONT) every process of the sandbox but the agent: a
    local sandbox's pause. As the namespace's PID 1, kill(-1) reaches exactly those; without
    a PID namespace, the exec'd commands' sessions."""
    if os.getpid() == 1:
        others = _other_pids()
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signum)
        return {"ok": True, "processes": len(others)}
    groups = set(RUNNING)
    for pid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signum)
    return {"ok": True, "processes": len(groups)}


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


# -- envd: commands that outlive their client (process Start and Connect), PTYs ------------
#
# envd's commands run on when the client that started them goes away (the SDK's `disconnect`,
# a dropped connection); a Connect follows one again. Output made while nobody follows is
# dropped, not kept (as envd's), and a slow follower slows the command's output pipe rather
# than filling the agent's memory; an exit is kept ENDED_TTL s for a late Connect.

MAX_FOLLOWERS = 8  # connections following one command at once
ENDED_KEPT = 256  # exits kept for a late Connect (the oldest go first)
ENDED_TTL = 30.0
CHUNK = 65536


class Exhausted(Exception):
    """A bound of envd's ops reached (watchers, their directories, followers): kind
    `exhausted`."""


class Kept:
    """A command started for envd: its output goes to whoever follows it at the moment."""

    generation = 0  # bumped by a reset: what came before is not the next claimant's

    def __init__(self, proc, master: int | None, tag: str | None):
        self.proc = proc
        self.master = master  # a PTY's master side, or None (pipes)
        self.tag = tag
        self.followers: set[asyncio.StreamWriter] = set()
        self.done = asyncio.Event()
        self.born = Kept.generation


ENDED: dict[int, tuple[float, str | None, dict]] = {}  # pid -> (expiry, tag, exit message)
KEEPING: set[asyncio.Task] = set()  # the kept commands' tasks (held, so never collected)


def _encode(message: dict) -> bytes:
    return json.dumps(message).encode() + b"\n"


def _follow_now(kept: Kept, pid: int, writer: asyncio.StreamWriter) -> None:
    """The start event, then this connection follows: no await in between, so no output
    is written to it before its start event nor lost between the two."""
    if len(kept.followers) >= MAX_FOLLOWERS:
        message = f"command {pid} has {MAX_FOLLOWERS} followers already"
        raise Exhausted(message)
    writer.write(_encode({"event": "started", "pid": pid}))
    kept.followers.add(writer)


async def _fan_out(kept: Kept, message: dict) -> None:
    data = _encode(message)
    for writer in list(kept.followers):
        if writer.is_closing():
            kept.followers.discard(writer)
            continue
        try:
            writer.write(data)
            await writer.drain()  # a slow follower slows the command's output, as envd's
        except (ConnectionError, OSError):
            kept.followers.discard(writer)


async def _pump_kept(kept: Kept, read, name: str) -> None:
    while chunk := await read():
        if kept.followers:
            await _fan_out(kept, {"event": name, "data": _b64(chunk)})


async def _ready(fd: int, still_open, writing: bool = False) -> None:
    """Until `fd` (non-blocking) can be read (or written). Whoever closes it first stops
    watching it, so this never touches a number the fd's closing freed for another."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    if writing:
        add, remove = loop.add_writer, loop.remove_writer
    else:
        add, remove = loop.add_reader, loop.remove_reader
    add(fd, _resolve, ready)
    try:
        await ready
    finally:
        if still_open():
            remove(fd)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _is(owner: object, field: str, fd: int) -> bool:
    """Is `fd` still `owner`'s (not closed)?"""
    return getattr(owner, field) == fd


def _forget_fd(fd: int) -> None:
    loop = asyncio.get_running_loop()
    loop.remove_reader(fd)
    loop.remove_writer(fd)
    os.close(fd)


def _tty_read(kept: Kept):
    async def read() -> bytes:
        while kept.master is not None:
            try:
                return os.read(kept.master, CHUNK)
            except BlockingIOError:
                fd = kept.master
                await _ready(fd, functools.partial(_is, kept, "master", fd))
            except OSError:  # EIO: every holder of the terminal's other side is gone
                return b""
        return b""

    return read


async def _keep(kept: Kept, streams: list, timeout: float | None) -> None:
    """The command's life: its output to its followers, then its exit to them and to ENDED."""
    proc, timed_out, code = kept.proc, False, None
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(_pump_kept(kept, read, name) for read, name in streams))
            code = await proc.wait()
    except TimeoutError:
        timed_out = True
        code = await _kill_group(proc)
    finally:
        if proc.returncode is None:  # the agent is stopping
            code = await _kill_group(proc)
        RUNNING.discard(proc.pid)
        PROCS.pop(proc.pid, None)
        _close_tty(kept)
        if proc.stdin is not None:
            proc.stdin.close()
    end = {"event": "exit", "code": code, "timed_out": timed_out}
    if kept.born == Kept.generation:
        _retain(proc.pid, kept.tag, end)
    await _fan_out(kept, end)
    kept.done.set()


def _close_tty(kept: Kept) -> None:
    if kept.master is not None:
        fd, kept.master = kept.master, None
        _forget_fd(fd)


def _forget_ended(pid: int, tag: str | None) -> None:
    """A new command: an old one's exit under its pid or tag would answer for it."""
    for old in [p for p, (_, t, _) in ENDED.items() if p == pid or (tag and t == tag)]:
        del ENDED[old]


def _report(task: asyncio.Task) -> None:
    """A task of the agent's own that failed: said on stderr (the sandbox's log), not lost."""
    if not task.cancelled() and task.exception() is not None:
        os.write(2, f"sandboxd agent: {task.get_name()} failed: {task.exception()!r}\n".encode())


def _retain(pid: int, tag: str | None, end: dict) -> None:
    now = time.monotonic()
    for old in [p for p, (expiry, _, _) in ENDED.items() if expiry < now]:
        del ENDED[old]
    while len(ENDED) >= ENDED_KEPT:
        del ENDED[next(iter(ENDED))]
    ENDED[pid] = (now + ENDED_TTL, tag, end)


# A PTY's command is started through this interpreter: in its own session (setsid), the
# terminal on fd 0 becomes its controlling one, then the command replaces it. (A preexec_fn
# would run Python in the forked agent, which other threads of the agent make unsafe.)
LOGIN_TTY = """
import fcntl, os, sys, termios
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
try:
    os.execvp(sys.argv[1], sys.argv[1:])
except OSError as exc:
    sys.stderr.write(f"{sys.argv[1]}: {exc.strerror}\\r\\n")
    os._exit(127)
"""


def _set_size(fd: int, size: dict) -> None:
    rows, cols = int(size.get("rows") or 24), int(size.get("cols") or 80)
    if not (0 < rows < 65536 and 0 < cols < 65536):
        raise ValueError("a PTY's rows and cols are 1..65535")
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


async def _start(request: dict, base_env: dict, reader, writer) -> None:
    """envd's Start: like exec, but the command outlives this connection (see `_follow`)."""
    env = {**base_env, **(request.get("env") or {})}
    cwd = _path(request, base_env, "cwd") if request.get("cwd") else base_env.get("HOME", "/")
    argv = [str(a) for a in request["argv"]]
    if not argv or not all(isinstance(v, str) for v in env.values()):
        raise ValueError("argv and env must be strings")
    timeout = float(request["timeout"]) if request.get("timeout") is not None else None
    pty_size = request.get("pty") or None
    master, slave = os.openpty() if pty_size is not None else (None, None)
    pipe, null = asyncio.subprocess.PIPE, asyncio.subprocess.DEVNULL
    try:
        if master is not None:
            _set_size(master, pty_size or {})
        with RUNNING.starting():
            proc = await asyncio.create_subprocess_exec(
                *([sys.executable, "-I", "-c", LOGIN_TTY, *argv] if slave is not None else argv),
                env=env,
                cwd=cwd,
                start_new_session=True,
                stdin=slave if slave is not None else pipe if request.get("stdin_open") else null,
                stdout=slave if slave is not None else pipe,
                stderr=slave if slave is not None else pipe,
            )
            RUNNING.add(proc.pid)
    except BaseException:
        for fd in (master, slave):
            if fd is not None:
                os.close(fd)
        raise
    kept = Kept(proc, master, request.get("tag"))
    _forget_ended(proc.pid, kept.tag)
    if master is not None and slave is not None:
        os.close(slave)
        os.set_blocking(master, False)
        outputs: list = [(_tty_read(kept), "pty")]
    else:
        assert proc.stdout is not None and proc.stderr is not None
        outputs = [(_pipe_read(proc.stdout), "stdout"), (_pipe_read(proc.stderr), "stderr")]
    PROCS[proc.pid] = {
        "proc": proc,
        "argv": argv,
        "cwd": cwd,
        "tag": request.get("tag"),
        "kept": kept,
    }
    _follow_now(kept, proc.pid, writer)
    task = asyncio.get_running_loop().create_task(_keep(kept, outputs, timeout))
    KEEPING.add(task)
    task.add_done_callback(KEEPING.discard)
    task.add_done_callback(_report)
    await _follow(kept, reader, writer)


def _pipe_read(stream: asyncio.StreamReader):
    return functools.partial(stream.read, CHUNK)


async def _follow(kept: Kept, reader: asyncio.StreamReader, writer) -> None:
    """Until the command's exit was sent here, or this connection's client went away (its
    end of the socket closed): the command runs on."""
    gone = asyncio.ensure_future(reader.read(1))
    ended = asyncio.ensure_future(kept.done.wait())
    try:
        await writer.drain()
        await asyncio.wait({gone, ended}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        kept.followers.discard(writer)
        gone.cancel()
        ended.cancel()


async def _connect(request: dict, base_env: dict, reader, writer) -> None:
    """envd's Connect: follow a running command of envd's (by pid or tag); one that ended
    within ENDED_TTL s answers its start and exit."""
    pid, tag = request.get("pid"), request.get("tag")
    for found_pid, entry in PROCS.items():
        if entry.get("kept") and (found_pid == pid or (tag is not None and entry["tag"] == tag)):
            _follow_now(entry["kept"], found_pid, writer)
            await _follow(entry["kept"], reader, writer)
            return
    for found_pid, (expiry, found_tag, end) in ENDED.items():
        if expiry > time.monotonic() and (found_pid == pid or (tag and found_tag == tag)):
            writer.write(_encode({"event": "started", "pid": found_pid}))
            await _send(writer, end)
            return
    raise ProcessLookupError(errno.ESRCH, f"no command with pid {pid!r} or tag {tag!r}")


def _tty(request: dict) -> int:
    kept = _exec_proc(request).get("kept")
    if kept is None or kept.master is None:
        raise ValueError(f"command {request['pid']} has no PTY (or it has ended)")
    return kept.master


async def _tty_input(request: dict, base_env: dict, reader, writer) -> None:
    """Keys to a PTY; a terminal that takes none for 10 s is an error (`timed out`)."""
    data = base64.b64decode(request.get("data") or "")
    async with asyncio.timeout(10):
        while data:
            fd = _tty(request)
            try:
                data = data[os.write(fd, data) :]
            except BlockingIOError:
                await _ready(
                    fd,
                    functools.partial(_is, _exec_proc(request)["kept"], "master", fd),
                    writing=True,
                )
    await _send(writer, {"ok": True})


async def _resize(request: dict, base_env: dict, reader, writer) -> None:
    _set_size(_tty(request), request.get("size") or {})
    await _send(writer, {"ok": True})


# -- envd: file system watchers (inotify, through ctypes) --------------------------------------
#
# Each watcher is an inotify instance of its own; recursive ones watch each subdirectory as
# it appears (and report what a new directory already holds as created, or it would be lost
# between its mkdir and its watch). Bounded: MAX_WATCHERS per sandbox, MAX_WATCH_DIRS
# directories each, MAX_WATCH_EVENTS events held for a polling watcher; past that the
# watcher fails ("overflow"), as it does when the kernel's own queue overflows. A streamed
# watcher holds nothing: while its client is slow the kernel's queue is the buffer.

IN_MODIFY, IN_ATTRIB, IN_MOVED_FROM, IN_MOVED_TO = 0x2, 0x4, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ONLYDIR, IN_DONT_FOLLOW = 0x4000, 0x8000, 0x1000000, 0x2000000
IN_ISDIR, IN_NONBLOCK, IN_CLOEXEC = 0x40000000, os.O_NONBLOCK, os.O_CLOEXEC
WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE) | (
    IN_DELETE_SELF | IN_MOVE_SELF
)
# envd's names for them (fsnotify's order: create, rename, chmod, write, remove)
EVENT_TYPES = (
    (IN_CREATE | IN_MOVED_TO, "create"),
    (IN_MOVED_FROM | IN_MOVE_SELF, "rename"),
    (IN_ATTRIB, "chmod"),
    (IN_MODIFY, "write"),
    (IN_DELETE | IN_DELETE_SELF, "remove"),
)
MAX_WATCHERS = 8
MAX_WATCH_DIRS = 4096
MAX_WATCH_EVENTS = 10_000
EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len
WATCHERS: dict[str, "Watcher"] = {}  # by id: both kinds, polled and streamed


class WatchOverflow(Exception):
    """Events were lost: the watcher has failed."""


class Watcher:
    def __init__(self, root: str, recursive: bool):
        self.root, self.recursive = root, recursive
        self.dirs: dict[int, str] = {}
        self.fd = _libc().inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise _errno_error("inotify_init1")
        self.events: list[dict] = []  # a polling watcher's, until fetched
        self.failed: str | None = None
        self.task: asyncio.Task | None = None  # a polled watcher's collector
        self.ended = asyncio.Event()

    def start(self) -> None:
        """Watch the root, and (recursive) the directories under it: run in a thread,
        as a big tree takes a while."""
        self._add(self.root, IN_ONLYDIR)
        if self.recursive:
            for path, is_dir in _below(self.root):
                if is_dir:
                    self._add(path, IN_ONLYDIR | IN_DONT_FOLLOW)

    def _add(self, path: str, flags: int) -> None:
        if len(self.dirs) >= MAX_WATCH_DIRS:
            raise Exhausted(f"more than {MAX_WATCH_DIRS} directories to watch")
        wd = _libc().inotify_add_watch(self.fd, os.fsencode(path), WATCH_MASK | flags)
        if wd < 0:
            error = _errno_error(path)
            if error.errno == errno.ENOSPC:
                raise Exhausted("the host's inotify watches are used up")
            if path == self.root:
                raise error
            return  # gone already, or not a directory any more
        self.dirs[wd] = path

    def close(self) -> None:
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            _forget_fd(fd)
        self.ended.set()  # a streamed watch waiting for events ends

    async def batch(self) -> list[dict]:
        """The next events (waits for some); raises WatchOverflow if events were lost."""
        while True:
            fd = self.fd
            if fd < 0:
                raise WatchOverflow("the watch has ended (the sandbox was reset)")
            try:
                data = os.read(fd, CHUNK)
            except BlockingIOError:
                readable = asyncio.ensure_future(_ready(fd, functools.partial(_is, self, "fd", fd)))
                ended = asyncio.ensure_future(self.ended.wait())
                try:
                    await asyncio.wait({readable, ended}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    readable.cancel()
                    ended.cancel()
                continue
            try:
                events = self._parse(data)
            except Exhausted as exc:
                raise WatchOverflow(f"events lost: {exc}") from None
            if events:
                return events

    def _parse(self, data: bytes) -> list[dict]:
        events: list[dict] = []
        offset = 0
        while offset + EVENT_HEADER.size <= len(data):
            wd, mask, _, length = EVENT_HEADER.unpack_from(data, offset)
            name = data[offset + EVENT_HEADER.size : offset + EVENT_HEADER.size + length]
            offset += EVENT_HEADER.size + length
            if mask & IN_Q_OVERFLOW:
                raise WatchOverflow("events lost: the kernel's queue overflowed")
            if mask & IN_IGNORED:
                self.dirs.pop(wd, None)
                continue
            directory = self.dirs.get(wd)
            if directory is None:
                continue
            if mask & (IN_DELETE_SELF | IN_MOVE_SELF) and directory != self.root:
                continue  # a subdirectory's: its parent's watch told it already
            path = os.path.join(directory, os.fsdecode(name.rstrip(b"\0")))
            events.extend(self._named(path, mask))
            if self.recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                events.extend(self._new_dir(path))
            elif self.recursive and mask & IN_ISDIR and mask & IN_MOVED_FROM:
                self._gone_dir(path)
        return events

    def _named(self, path: str, mask: int) -> list[dict]:
        name = os.path.relpath(path, self.root)
        return [{"name": name, "type": kind} for bits, kind in EVENT_TYPES if mask & bits]

    def _new_dir(self, path: str) -> list[dict]:
        """Watch a new directory, and report what it already holds as created."""
        self._add(path, IN_ONLYDIR | IN_DONT_FOLLOW)
        created: list[dict] = []
        for below, is_dir in _below(path):
            if is_dir:
                self._add(below, IN_ONLYDIR | IN_DONT_FOLLOW)
            created.extend(self._named(below, IN_CREATE))
            if len(created) > MAX_WATCH_EVENTS:
                raise WatchOverflow(
                    f"events lost: a new directory of over {MAX_WATCH_EVENTS} entries"
                )
        return created

    def _gone_dir(self, path: str) -> None:
        """A directory moved away: its watches would name it by its old path."""
        inside = path + "/"
        for wd, directory in list(self.dirs.items()):
            if directory == path or directory.startswith(inside):
                _libc().inotify_rm_watch(self.fd, wd)
                del self.dirs[wd]

    async def collect(self) -> None:
        """A polling watcher's: hold events until fetched, at most MAX_WATCH_EVENTS."""
        try:
            while True:
                found = await self.batch()  # (self.events may be another list by then)
                self.events.extend(found)
                await asyncio.sleep(0)  # a flood of events: the agent's other work goes on
                if len(self.events) > MAX_WATCH_EVENTS:
                    raise WatchOverflow(f"events lost: more than {MAX_WATCH_EVENTS} not fetched")
        except (WatchOverflow, OSError) as exc:
            self.failed = str(exc) or type(exc).__name__
            self.events = []
            self.close()


def _below(top: str):
    """(path, is a directory) of everything under `top`, one at a time (no directory's whole
    listing held), symlinks not followed; what vanishes meanwhile is skipped."""
    stack = [top]
    while stack:
        try:
            with os.scandir(stack.pop()) as found:
                for entry in found:
                    is_dir = entry.is_dir(follow_symlinks=False)
                    if is_dir:
                        stack.append(entry.path)
                    yield entry.path, is_dir
        except OSError:
            continue


_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    return _LIBC


def _errno_error(what: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, os.strerror(code), what)


async def _new_watcher(request: dict, base_env: dict) -> tuple[str, Watcher]:
    if len(WATCHERS) >= MAX_WATCHERS:
        raise Exhausted(f"a sandbox has at most {MAX_WATCHERS} watchers")
    root = _path(request, base_env)
    if not stat.S_ISDIR(os.stat(root).st_mode):  # (not found: ENOENT)
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", root)
    watcher = Watcher(root, bool(request.get("recursive")))
    watcher_id = "w" + secrets.token_hex(12)
    WATCHERS[watcher_id] = watcher  # counted while it starts
    try:
        await asyncio.to_thread(watcher.start)
    except BaseException:
        WATCHERS.pop(watcher_id, None)
        watcher.close()
        raise
    return watcher_id, watcher


async def _watch(request: dict, base_env: dict, reader, writer) -> None:
    """envd's WatchDir: a stream of batches of events until the client goes away."""
    watcher_id, watcher = await _new_watcher(request, base_env)
    gone = asyncio.ensure_future(reader.read(1))
    try:
        await _send(writer, {"event": "started"})
        while True:
            batch = asyncio.ensure_future(watcher.batch())
            await asyncio.wait({gone, batch}, return_when=asyncio.FIRST_COMPLETED)
            if not batch.done():
                batch.cancel()
                return
            await _send(writer, {"event": "fs", "events": batch.result()})
    except WatchOverflow as exc:
        await _send(writer, {"ok": False, "error": str(exc), "kind": "overflow"})
    finally:
        gone.cancel()
        WATCHERS.pop(watcher_id, None)
        watcher.close()


async def _watcher_add(request: dict, base_env: dict, reader, writer) -> None:
    """envd's CreateWatcher: events are held (bounded) until GetWatcherEvents."""
    watcher_id, watcher = await _new_watcher(request, base_env)
    watcher.task = asyncio.get_running_loop().create_task(watcher.collect())
    watcher.task.add_done_callback(_report)
    await _send(writer, {"ok": True, "id": watcher_id})


def _polled(request: dict) -> Watcher:
    watcher = WATCHERS.get(request.get("id"))  # type: ignore[arg-type]
    if watcher is None or watcher.task is None:
        raise FileNotFoundError(errno.ENOENT, f"no watcher {request.get('id')!r}")
    return watcher


async def _watcher_events(request: dict, base_env: dict, reader, writer) -> None:
    watcher = _polled(request)
    if watcher.failed:
        await _send(writer, {"ok": False, "error": watcher.failed, "kind": "overflow"})
        return
    events, watcher.events = watcher.events, []
    await _send(writer, {"ok": True, "events": events})


async def _watcher_remove(request: dict, base_env: dict, reader, writer) -> None:
    watcher = _polled(request)
    WATCHERS.pop(request["id"], None)
    watcher.close()
    await _send(writer, {"ok": True})


def _forget_envd() -> None:
    """A reset: the next claimant sees none of the last one's watchers or exits."""
    Kept.generation += 1
    ENDED.clear()
    for watcher in list(WATCHERS.values()):
        watcher.close()
    WATCHERS.clear()


async def _envd(op, request: dict, base_env: dict, reader, writer) -> None:
    try:
        await op(request, base_env, reader, writer)
    except (Exhausted, WatchOverflow) as exc:
        kind = "exhausted" if isinstance(exc, Exhausted) else "overflow"
        await _send(writer, {"ok": False, "error": str(exc), "kind": kind})


ENVD_OPS = {
    "start": _start,
    "connect": _connect,
    "tty_input": _tty_input,
    "resize": _resize,
    "watch": _watch,
    "watcher_add": _watcher_add,
    "watcher_events": _watcher_events,
    "watcher_remove": _watcher_remove,
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
                _forget_envd()
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
            elif op in ("freeze", "thaw"):
                await _send(writer, _freeze(signal.SIGSTOP if op == "freeze" else signal.SIGCONT))
            elif op == "signal":
                await _send(writer, _signal(request))
            elif op in ("input", "close_stdin"):
                await _send(writer, await _input(request))
            elif op in ENVD_OPS:
                await _envd(ENVD_OPS[op], request, base_env, reader, writer)
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
