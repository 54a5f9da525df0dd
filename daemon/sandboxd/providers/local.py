"""The embedded `local` provider: each sandbox is an isolated process tree on this machine.

With bubblewrap: new pid/ipc/uts/mount(/net) namespaces, read-only system directories, a
private writable /workspace and /tmp, and the agent as the namespace's PID 1 — killing it
tears the whole sandbox down. Without bubblewrap: a plain process group with rlimits.
Sandboxes are not tied to the daemon's life, so a restarted daemon can adopt them.
"""

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from sandboxd import agent as agent_module
from sandboxd import supervisor as supervisor_module
from sandboxd.agentclient import AgentClient, AgentError
from sandboxd.config import LocalProviderConfig, LocalTemplate
from sandboxd.providers.base import CreateError, Probe, ProviderSandbox, ResetError
from sandboxd.providers.cgroups import CgroupLimiter
from sandboxd.spec import HealthSpec, PoolSpec

log = logging.getLogger(__name__)

AGENT_PATH_INSIDE = "/opt/sandboxd/agent.py"
RUN_INSIDE = "/run/sandboxd"
READY_TIMEOUT_S = 15.0
# /etc entries a sandbox needs to run ordinary programs; never the whole /etc (shadow, keys).
ETC_ENTRIES = (
    "passwd",
    "group",
    "hosts",
    "nsswitch.conf",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "alternatives",
    "ssl",
    "ca-certificates",
    "mime.types",
    "os-release",
    "debian_version",
    "profile",
    "bash.bashrc",
    "inputrc",
    "resolv.conf",
)
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64")


class LocalProvider:
    name = "local"

    def __init__(self, config: LocalProviderConfig):
        self._config = config
        self._templates = config.all_templates()
        self._bwrap = _find_bwrap(config)
        self._cgroups = CgroupLimiter.detect(config.cgroup_parent)
        # Cleanups of failed or cancelled create attempts, by sandbox id: a retry (same id)
        # waits for its predecessor's, or that one's rmtree would pull the box from under it.
        self._cleanups: dict[str, asyncio.Task[None]] = {}
        self.root = Path(config.workspace_root)

    @property
    def isolation(self) -> str:
        return "bwrap" if self._bwrap else "none"

    @property
    def limits(self) -> str:
        return "cgroup" if self._cgroups else "rlimit"

    async def create(self, sandbox_id: str, pool: PoolSpec, *, revision: int = 0) -> dict[str, Any]:
        template = self._templates.get(pool.template)
        if template is None:
            raise CreateError(f"unknown local template {pool.template!r}", retryable=False)
        box = self.root / sandbox_id
        if sandbox_id in self._cleanups:
            await asyncio.shield(self._cleanups[sandbox_id])
        handle: dict[str, Any] = {}
        try:
            handle = await self._launch(sandbox_id, pool, template, box)
            await _wait_for_agent(handle["socket"], handle["pid"])
            if template.setup:
                await _run_setup(handle["socket"], template.setup)
            if pool.run is not None:
                await AgentClient(handle["socket"]).supervise(pool.run.model_dump())
        except BaseException:
            cleanup = asyncio.ensure_future(self.terminate(sandbox_id, handle or {"dir": str(box)}))
            self._cleanups[sandbox_id] = cleanup
            cleanup.add_done_callback(lambda _: self._forget_cleanup(sandbox_id, cleanup))
            await asyncio.shield(cleanup)
            raise
        return handle

    def _forget_cleanup(self, sandbox_id: str, cleanup: asyncio.Task[None]) -> None:
        if self._cleanups.get(sandbox_id) is cleanup:
            del self._cleanups[sandbox_id]

    async def _launch(
        self, sandbox_id: str, pool: PoolSpec, template: LocalTemplate, box: Path
    ) -> dict[str, Any]:
        for sub in ("workspace", "tmp", "run"):
            (box / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(box / "tmp", 0o1777)
        inside = self._bwrap is not None
        env = _base_env(sandbox_id, pool, template, box, inside)
        (box / "run" / "env.json").write_text(json.dumps(env))
        socket_inside = f"{RUN_INSIDE}/agent.sock" if inside else str(box / "run" / "agent.sock")
        argv = self._argv(sandbox_id, pool, template, box, socket_inside)
        with open(box / "agent.log", "ab") as logfile:  # noqa: ASYNC230 (local, tiny)
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logfile,
                stderr=logfile,
                start_new_session=True,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                pass_fds=(),
            )
        pid = await self._sandbox_pid(proc, box)
        limits = "rlimit"
        if self._cgroups and self._cgroups.apply(sandbox_id, pid, pool.cpu, pool.memory_mb):
            limits = "cgroup"
        handle = {
            "pid": pid,
            "create_time": psutil.Process(pid).create_time(),
            "launcher_pid": proc.pid,
            "dir": str(box),
            "socket": str(box / "run" / "agent.sock"),
            "isolation": self.isolation,
            "limits": limits,
        }
        (box / "meta.json").write_text(json.dumps({"id": sandbox_id, "pool": pool.name, **handle}))
        return handle

    def _argv(
        self, sandbox_id: str, pool: PoolSpec, template: LocalTemplate, box: Path, socket: str
    ) -> list[str]:
        python = os.path.realpath(sys.executable)
        agent = [python, "-I", "-S"]
        memory = ["--memory-mb", str(pool.memory_mb)]
        if self._bwrap is None:
            env_file = str(box / "run" / "env.json")
            return [
                *agent,
                agent_module.__file__,
                "--socket",
                socket,
                "--env-file",
                env_file,
                *memory,
            ]
        env_file = f"{RUN_INSIDE}/env.json"
        return [
            *_bwrap_args(self._bwrap, sandbox_id, pool, template, box, python),
            *agent,
            AGENT_PATH_INSIDE,
            "--socket",
            socket,
            "--env-file",
            env_file,
            *memory,
        ]

    async def _sandbox_pid(self, proc: asyncio.subprocess.Process, box: Path) -> int:
        """The host pid of the sandbox's first process (the agent)."""
        if self._bwrap is None:
            return proc.pid
        # bwrap forks the namespace's PID 1 as its only child; find it.
        deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_S
        while asyncio.get_running_loop().time() < deadline:
            children = _children(proc.pid)
            if children:
                return children[0]
            if proc.returncode is not None:
                break
            await asyncio.sleep(0.005)
        log_tail = (box / "agent.log").read_text(errors="replace")[-500:]
        raise CreateError(f"bubblewrap did not start the sandbox: {log_tail.strip()}")

    async def kill(self, sandbox_id: str, handle: dict[str, Any]) -> None:
        """SIGKILL every process of the sandbox and wait until they are gone; the sandbox's
        files stay (terminate frees those). A sudden death, as a crash would be."""
        if handle.get("pid"):
            procs = _live_tree(handle)
        else:
            procs = _launched_in(handle.get("dir") or str(self.root / sandbox_id))
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(psutil.wait_procs, procs, 5.0)

    async def terminate(self, sandbox_id: str, handle: dict[str, Any]) -> None:
        await self.kill(sandbox_id, handle)
        if self._cgroups:
            self._cgroups.remove(sandbox_id)
        box = Path(handle.get("dir") or self.root / sandbox_id)
        if box.parent == self.root:
            await asyncio.to_thread(shutil.rmtree, box, True)

    async def reset(self, sandbox_id: str, handle: dict[str, Any], pool: PoolSpec) -> None:
        agent = AgentClient(handle["socket"])
        try:
            await agent.reset()
            result = await agent.exec(pool.reset_command)
            if result.exit_code == 0 and pool.run is not None:
                await agent.supervise(pool.run.model_dump())
        except AgentError as exc:
            raise ResetError(str(exc)) from exc
        if result.exit_code != 0:
            detail = (result.stderr or result.stdout).decode(errors="replace")[-300:].strip()
            raise ResetError(f"reset command exited {result.exit_code}: {detail}")

    async def probe(
        self, sandbox_id: str, handle: dict[str, Any], health: HealthSpec | None, since: int
    ) -> Probe:
        if _process(handle) is None:
            return Probe(ok=False, alive=False, detail="agent gone: the sandbox's first process")
        agent = AgentClient(handle["socket"])
        command, timeout = (health.command, health.timeout_s) if health else (None, 5.0)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout + 1.0):
                reply = await agent.health(command, timeout, since)
        except (AgentError, TimeoutError, OSError) as exc:
            return Probe(ok=False, alive=True, latency_ms=_ms(started), detail=_unreachable(exc))
        return Probe(
            ok=_check_passed(reply.get("check")),
            alive=True,
            latency_ms=_ms(started),
            detail=_check_detail(reply.get("check"), timeout),
            program=reply.get("program"),
        )

    async def is_alive(self, sandbox_id: str, handle: dict[str, Any]) -> bool:
        return _process(handle) is not None

    def usage(self, handle: dict[str, Any]) -> tuple[float, int] | None:
        """CPU seconds and resident bytes of the sandbox's live processes (blocking: /proc)."""
        cpu, rss = 0.0, 0
        tree = _live_tree(handle)
        for proc in tree:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                cpu += times.user + times.system
                rss += proc.memory_info().rss
        return (cpu, rss) if tree else None

    async def list_sandboxes(self) -> list[ProviderSandbox]:
        if not self.root.is_dir():
            return []
        found = []
        for meta_file in self.root.glob("*/meta.json"):
            with contextlib.suppress(OSError, ValueError):
                meta = json.loads(meta_file.read_text())
                if _process(meta) is not None:
                    found.append(ProviderSandbox(id=meta["id"], pool=meta["pool"], handle=meta))
        return found

    async def cleanup_leftovers(self, keep: set[str]) -> list[str]:
        """Remove sandbox directories not in `keep` (left by a daemon killed mid-create)."""
        if not self.root.is_dir():
            return []
        removed = []
        for box in self.root.iterdir():
            if box.is_dir() and box.name not in keep:
                meta = _read_meta(box)
                await self.terminate(box.name, meta or {"dir": str(box)})
                removed.append(box.name)
        return removed


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def _unreachable(exc: BaseException) -> str:
    return f"agent unreachable: {exc or type(exc).__name__}"


def _check_passed(check: dict[str, Any] | None) -> bool:
    return check is None or (not check["timed_out"] and check["exit_code"] == 0)


def _check_detail(check: dict[str, Any] | None, timeout: float) -> str:
    if check is None or _check_passed(check):
        return ""
    if check["timed_out"]:
        return f"probe timed out after {timeout}s"
    output = check["output"].strip().splitlines()
    return f"probe exited {check['exit_code']}" + (f": {output[-1][:200]}" if output else "")


def _read_meta(box: Path) -> dict[str, Any] | None:
    try:
        return json.loads((box / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _process(handle: dict[str, Any]) -> psutil.Process | None:
    """The sandbox's first process, if it is still the same process (pids get reused)."""
    pid = handle.get("pid")
    if not pid:
        return None
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - float(handle.get("create_time", 0))) > 0.05:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def _live_tree(handle: dict[str, Any]) -> list[psutil.Process]:
    root = _process(handle)
    if root is None:
        return []
    tree = [root]
    for pid in _descendants(root.pid):
        with contextlib.suppress(psutil.Error):
            tree.append(psutil.Process(pid))
    return tree


def _launched_in(box: str) -> list[psutil.Process]:
    """Without a handle (a daemon killed between starting a sandbox and writing its
    meta.json): the processes whose command line names the sandbox's directory — bwrap's
    launcher, or the agent itself — and everything under them. Scans the process table, so
    only for such leftovers."""
    roots = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any(box in part for part in p.info["cmdline"] or ())
    ]
    found = []
    for pid in roots + [d for root in roots for d in _descendants(root)]:
        with contextlib.suppress(psutil.Error):
            found.append(psutil.Process(pid))
    return found


def _children(pid: int) -> list[int]:
    """Direct children, from /proc/PID/task/*/children: reading the whole process table
    (psutil's children()) per sandbox would make stopping N sandboxes cost N²."""
    found: list[int] = []
    try:
        for task in os.scandir(f"/proc/{pid}/task"):
            with open(f"{task.path}/children") as f:
                found += [int(x) for x in f.read().split()]
    except FileNotFoundError:
        if not os.path.exists(f"/proc/{pid}"):
            return []
        with contextlib.suppress(psutil.Error):  # a kernel without CONFIG_PROC_CHILDREN
            return [c.pid for c in psutil.Process(pid).children()]
    except (OSError, ValueError):
        return []
    return found


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


def _find_bwrap(config: LocalProviderConfig) -> str | None:
    if config.isolation == "none":
        log.warning(
            "local sandboxes run WITHOUT isolation (isolation = none in the config)",
            extra={"isolation": "none"},
        )
        return None
    path = shutil.which(config.bwrap_path)
    if path is None:
        if config.isolation == "bwrap":
            raise RuntimeError(f"isolation = bwrap but {config.bwrap_path!r} is not installed")
        log.warning(
            "bubblewrap not found: local sandboxes run WITHOUT isolation "
            "(isolation: none); install the bubblewrap package",
            extra={"isolation": "none"},
        )
    return path


def _base_env(
    sandbox_id: str, pool: PoolSpec, template: LocalTemplate, box: Path, inside: bool
) -> dict[str, str]:
    pybin = os.path.dirname(os.path.realpath(sys.executable))
    home = "/workspace" if inside else str(box / "workspace")
    return {
        "PATH": f"/usr/local/bin:/usr/bin:/bin:{pybin}",
        "HOME": home,
        "TMPDIR": "/tmp" if inside else str(box / "tmp"),
        "LANG": "C.UTF-8",
        "SANDBOX_ID": sandbox_id,
        "SANDBOX_POOL": pool.name,
        **template.env,
        **pool.env,
    }


def _bwrap_args(
    bwrap: str, sandbox_id: str, pool: PoolSpec, template: LocalTemplate, box: Path, python: str
) -> list[str]:
    args = [bwrap, "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--hostname", sandbox_id]
    if not pool.network:
        args.append("--unshare-net")
    args += ["--new-session", "--as-pid-1", "--cap-drop", "ALL"]
    for path in SYSTEM_DIRS:
        args += ["--ro-bind-try", path, path]
    for entry in ETC_ENTRIES:
        args += ["--ro-bind-try", f"/etc/{entry}", f"/etc/{entry}"]
    prefix = str(Path(python).parent.parent)
    if not prefix.startswith("/usr"):
        args += ["--ro-bind", prefix, prefix]  # an interpreter outside /usr (pyenv, /opt)
    for path in template.ro_binds:
        args += ["--ro-bind-try", path, path]
    args += [
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--bind",
        str(box / "workspace"),
        "/workspace",
        "--bind",
        str(box / "tmp"),
        "/tmp",
        "--bind",
        str(box / "run"),
        RUN_INSIDE,
        "--ro-bind",
        agent_module.__file__,
        AGENT_PATH_INSIDE,
        "--ro-bind",
        supervisor_module.__file__,
        str(Path(AGENT_PATH_INSIDE).parent / "supervisor.py"),
        "--remount-ro",
        "/",
        "--chdir",
        "/workspace",
        "--",
    ]
    return args


async def _wait_for_agent(socket: str, pid: int) -> None:
    client = AgentClient(socket)
    deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_S
    last_error = "no answer"
    while asyncio.get_running_loop().time() < deadline:
        if not psutil.pid_exists(pid):
            raise CreateError("the sandbox's agent exited during start")
        try:
            await client.ping(timeout=1.0)
            return
        except (AgentError, TimeoutError) as exc:
            last_error = str(exc)
        await asyncio.sleep(0.01)
    raise CreateError(f"agent did not answer within {READY_TIMEOUT_S}s: {last_error}")


async def _run_setup(socket: str, command: str) -> None:
    result = await AgentClient(socket).exec(command, timeout=300)
    if result.exit_code != 0:
        detail = (result.stderr or result.stdout).decode(errors="replace")[-300:]
        raise CreateError(f"template setup exited {result.exit_code}: {detail.strip()}")
