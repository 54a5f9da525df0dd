"""The embedded `local` provider: each sandbox is an isolated, unprivileged process tree.

Under bubblewrap a sandbox gets its own user namespace (root inside, one unprivileged host
uid per sandbox outside, from `uid_base`), pid/ipc/uts/mount/net namespaces, a seccomp
filter (providers/seccomp.py), no capabilities, read-only system directories, and sized
tmpfs mounts for /workspace, /tmp and /dev/shm; its cgroup (providers/cgroups.py) bounds
processes, memory and CPU of the whole tree. The agent is the namespace's PID 1.

The control path is out of the sandbox's reach: the daemon makes the agent's listening
socket in the sandbox's registry directory (`workspace_root/<id>`, root-only, never mounted
into the sandbox) and hands the agent the descriptor; the environment and the agent's code
come in through descriptors too. That directory's `meta.json` is the provider's registry:
every kill and delete is checked against it (and the sandbox's cgroup), never against a
Redis record, so a forged or stale record cannot make the daemon touch another process or
path. A reset stops everything and starts the sandbox afresh from the host side.
Sandboxes are not tied to the daemon's life, so a restarted daemon adopts them.
"""

import asyncio
import contextlib
import json
import logging
import os
import re
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from sandboxd.config import LocalProviderConfig, LocalTemplate
from sandboxd.providers import supervisor as supervisor_module
from sandboxd.providers.base import CreateError, IsolationError, Probe, ProviderSandbox, ResetError
from sandboxd.providers.local import agent as agent_module
from sandboxd.providers.local import netfilter, seccomp
from sandboxd.providers.local.agentclient import AgentClient, AgentError
from sandboxd.providers.local.cgroups import CgroupError, Cgroups, Limits
from sandboxd.spec import HealthSpec, PoolSpec

log = logging.getLogger(__name__)

AGENT_PATH_INSIDE = "/opt/sandboxd/agent.py"
SUPERVISOR_PATH_INSIDE = "/opt/sandboxd/supervisor.py"
READY_TIMEOUT_S = 15.0
SANDBOX_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
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
SLIRP_RESOLV = b"nameserver 10.0.2.3\n"
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64")
# The launcher: join the sandbox's cgroups (as root, before anything of the sandbox exists),
# then exec the rest (setpriv to the sandbox's uid, then bubblewrap).
JOIN_AND_EXEC = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
# Where /proc has mounts on it (systemd's ProtectKernelTunables=, a container's read-only
# /proc/sys), the kernel refuses a new proc mount inside a user namespace ("too revealing").
# The launcher then runs in a private mount namespace of its own with a fresh, whole proc
# mounted first; the sandbox never sees either (it gets its own proc of its pid namespace).
FRESH_PROC = "mount -t proc -o nosuid,nodev,noexec proc /proc || exit 125; "


class LocalProvider:
    name = "local"
    gone_reason = "died"  # a local sandbox that vanished: its processes died

    def __init__(self, config: LocalProviderConfig):
        self._config = config
        self._templates = config.all_templates()
        self.root = Path(config.workspace_root)
        self._bwrap = _find_bwrap(config)
        self._setpriv = shutil.which(config.setpriv_path)
        self._python = _agent_python(config)
        self._code = {
            "agent": Path(agent_module.__file__).read_bytes(),
            "supervisor": Path(supervisor_module.__file__).read_bytes(),
        }
        self._cgroups: Cgroups | None = None
        self.weaknesses = self._check_host()
        if self.weaknesses:
            message = "local sandboxes are weakly isolated: " + "; ".join(self.weaknesses)
            if not config.allow_weaker_isolation:
                raise IsolationError(
                    message + ". Fix the host, or set local.allow_weaker_isolation = true to "
                    "run with what is there."
                )
            log.warning(message, extra={"weaknesses": self.weaknesses})
        self._lock = asyncio.Lock()  # uid allocation and registry writes
        # Cleanups of failed or cancelled create attempts, by sandbox id: a retry (same id)
        # waits for its predecessor's, or that one's rmtree would pull the box from under it.
        self._cleanups: dict[str, asyncio.Task[None]] = {}
        # Sandboxes whose death is told as it happens: a pidfd of the first process, read
        # by the event loop (`watch`). Bounded by half the open-files limit.
        self._watched: dict[str, tuple[int, Callable[[str], None]]] = {}
        self._max_watched = max(0, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2 - 64)
        # The host's addresses each networked sandbox's egress filter holds, by sandbox id
        # (empty after a restart: every filter is then installed afresh at its first probe).
        self._filtered: dict[str, tuple[frozenset[str], frozenset[str]]] = {}

    # -- what this host offers -------------------------------------------------------------

    def _check_host(self) -> list[str]:
        """Which protections this host gives, each set once here: `_userns` (bubblewrap run
        as a sandbox uid with its own user namespace), `_seccomp`, `_cgroups`. Whatever is
        missing or switched off (`local.disable`) is returned, for the log and `status`."""
        weak: list[str] = []
        off = set(self._config.disable)
        _private_dir(self.root)
        self._unshare = shutil.which("unshare") or "unshare"
        self._fresh_proc = self._bwrap is not None and os.geteuid() == 0 and _proc_overmounted()
        self._drop_uid = os.geteuid() == 0 and self._setpriv is not None and "userns" not in off
        self._userns = False
        self._seccomp = False
        if self._bwrap is None:
            weak.append("no bubblewrap: no namespaces, no seccomp, no private filesystem")
        if "userns" in off:
            weak.append("user namespaces switched off (local.disable): sandboxes run as root")
        elif os.geteuid() != 0:
            weak.append("the daemon is not root: sandboxes run as the daemon's own uid")
        elif self._setpriv is None:
            weak.append(f"no {self._config.setpriv_path!r} (util-linux): sandboxes run as root")
        elif self._bwrap is not None:
            self._userns = self._userns_works()
            if not self._userns:
                self._drop_uid = False
                weak.append("unprivileged user namespaces unavailable: sandboxes run as root")
        if self._bwrap is not None:
            missing = "switched off (local.disable)" if "seccomp" in off else seccomp.available()
            if missing:
                weak.append(f"no seccomp filter: {missing}")
            self._seccomp = not missing
        if "cgroups" in off:
            weak.append("cgroup limits switched off (local.disable): rlimits per process only")
            return weak
        cgroups = Cgroups.detect(
            self._config.cgroup_group(), self._config.cgroup_parent, self._config.cgroup_root
        )
        if isinstance(cgroups, str):
            weak.append(f"no cgroup limits ({cgroups}): rlimits per process only")
        else:
            self._cgroups = cgroups
        return weak

    def _userns_works(self) -> bool:
        """Can bubblewrap, run as a sandbox uid, make a user namespace with its own proc?"""
        uid = str(self._config.first_uid())
        argv = [self._setpriv or "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        argv += ["--", self._bwrap or "bwrap", "--unshare-user", "--uid", "0", "--gid", "0"]
        argv += ["--unshare-pid", "--ro-bind", "/", "/", "--proc", "/proc", "true"]
        try:
            done = subprocess.run(
                self._launcher("sandboxd-check", [], argv), capture_output=True, timeout=60, cwd="/"
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("bubblewrap with a user namespace could not be tried: %s", exc)
            return False
        if done.returncode != 0:
            log.warning("bubblewrap with a user namespace failed: %s", done.stderr[-300:])
        return done.returncode == 0

    @property
    def isolation(self) -> str:
        if self._bwrap is None:
            return "none"
        parts = ["bwrap"]
        if self._userns:
            parts.append("userns")
        if self._seccomp:
            parts.append("seccomp")
        return "+".join(parts)

    @property
    def limits(self) -> str:
        return self._cgroups.describe if self._cgroups else "NONE (rlimit per process)"

    def security_summary(self) -> dict[str, Any]:
        """What is enforced, for `status` and `daemon.started`."""
        return {
            "isolation": self.isolation,
            "limits": self.limits,
            "uids": f"{self._config.first_uid()}+{self._config.uid_count}"
            if self._drop_uid
            else "daemon's own",
            "weaknesses": list(self.weaknesses),
        }

    def _launcher(self, name: str, procs_files: list[Path], argv: list[str]) -> list[str]:
        """`argv`, started in the sandbox's cgroups (joined as root before it runs) and, where
        /proc is overmounted, in a private mount namespace with a whole proc."""
        if not procs_files and not self._fresh_proc:
            return argv
        script = (FRESH_PROC if self._fresh_proc else "") + JOIN_AND_EXEC
        launcher = ["/bin/sh", "-c", script, name, *map(str, procs_files), "--", *argv]
        if self._fresh_proc:
            launcher = [self._unshare, "--mount", "--propagation", "private", "--", *launcher]
        return launcher

    # -- registry --------------------------------------------------------------------------

    def _box(self, sandbox_id: str) -> Path | None:
        """The sandbox's registry directory, if `sandbox_id` is an id this provider could have
        made and the path is a real directory of ours (no symlink on the way)."""
        if not isinstance(sandbox_id, str) or not SANDBOX_ID.match(sandbox_id):
            return None
        return self.root / sandbox_id

    def _entry(self, sandbox_id: str) -> dict[str, Any] | None:
        """The registry's record of a sandbox this provider launched, or None."""
        box = self._box(sandbox_id)
        if box is None:
            return None
        entry = _read_private_json(box / "meta.json")
        if entry is None or entry.get("id") != sandbox_id:
            return None
        return entry

    def _used_uids(self) -> set[int]:
        used = set()
        for box in _subdirs(self.root):
            entry = _read_private_json(box / "meta.json")
            if entry and isinstance(entry.get("uid"), int):
                used.add(entry["uid"])
        return used

    def _allocate_uid(self, sandbox_id: str) -> int:
        if not self._drop_uid:
            return os.geteuid()
        entry = self._entry(sandbox_id)
        if entry and isinstance(entry.get("uid"), int):
            return entry["uid"]
        used = self._used_uids()
        first = self._config.first_uid()
        for uid in range(first, first + self._config.uid_count):
            if uid not in used:
                return uid
        raise CreateError("no free sandbox uid left in local.uid_base/uid_count", retryable=True)

    # -- lifecycle -------------------------------------------------------------------------

    async def create(self, sandbox_id: str, pool: PoolSpec, *, revision: int = 0) -> dict[str, Any]:
        template = self._templates.get(pool.template)
        if template is None:
            raise CreateError(f"unknown local template {pool.template!r}", retryable=False)
        box = self._box(sandbox_id)
        if box is None:
            raise CreateError(f"invalid sandbox id {sandbox_id!r}", retryable=False)
        if sandbox_id in self._cleanups:
            await asyncio.shield(self._cleanups[sandbox_id])
        try:
            handle = await self._start(sandbox_id, pool, template, box)
        except BaseException:
            cleanup = asyncio.ensure_future(self.terminate(sandbox_id, {}))
            self._cleanups[sandbox_id] = cleanup
            cleanup.add_done_callback(lambda _: self._forget_cleanup(sandbox_id, cleanup))
            await asyncio.shield(cleanup)
            raise
        return handle

    def _forget_cleanup(self, sandbox_id: str, cleanup: asyncio.Task[None]) -> None:
        if self._cleanups.get(sandbox_id) is cleanup:
            del self._cleanups[sandbox_id]

    async def _start(
        self,
        sandbox_id: str,
        pool: PoolSpec,
        template: LocalTemplate,
        box: Path,
        *,
        program: bool = True,
    ) -> dict[str, Any]:
        """Launch, wait for the agent, run the template's setup and (unless not `program`)
        the `run:` program."""
        handle = await self._launch(sandbox_id, pool, template, box)
        socket_path = handle["socket"]
        await _wait_for_agent(socket_path, lambda: self._alive_entry(sandbox_id) is not None)
        if template.setup:
            await _run_setup(socket_path, template.setup)
        if program:
            await _start_program(socket_path, pool)
        return handle

    async def _launch(
        self, sandbox_id: str, pool: PoolSpec, template: LocalTemplate, box: Path
    ) -> dict[str, Any]:
        async with self._lock:
            uid = self._allocate_uid(sandbox_id)
            _private_dir(box)
            # Claim the uid at once: a concurrent create must not pick it too.
            _write_private_json(
                box / "meta.json",
                {"id": sandbox_id, "pool": pool.name, "uid": uid, "cgroup": bool(self._cgroups)},
            )
        inside = self._bwrap is not None
        limits = "none"
        procs_files: list[Path] = []
        if self._cgroups:
            try:
                procs_files = await asyncio.to_thread(
                    self._cgroups.prepare,
                    sandbox_id,
                    Limits(cpu=pool.cpu, memory_mb=pool.memory_mb, pids_max=pool.pids_max),
                )
            except CgroupError as exc:
                raise CreateError(str(exc)) from exc
            limits = self._cgroups.describe
        workdir = None if inside else _host_workdir(box, uid)
        env = _base_env(sandbox_id, pool, template, inside, workdir)
        socket_path = box / "agent.sock"
        listener = _listen(socket_path)
        fds = _Fds()
        try:
            fds.add("listen", listener.detach())
            fds.add("env", _memfd("env", json.dumps(env).encode()))
            fds.add("agent", _memfd("agent", self._code["agent"]))
            fds.add("supervisor", _memfd("sup", self._code["supervisor"]))
            if inside and pool.network:  # slirp4netns's DNS forwarder
                fds.add("resolv", _memfd("resolv", SLIRP_RESOLV))
            if inside and self._seccomp:
                fds.add(
                    "seccomp",
                    _memfd(
                        "seccomp",
                        seccomp.program(pool.security.allow_syscalls, pool.security.nested_userns),
                    ),
                )
            argv = self._argv(sandbox_id, pool, template, uid, fds, use_rlimit=not self._cgroups)
            argv = self._launcher(f"sandboxd:{sandbox_id}", procs_files, argv)
            proc = await _spawn(argv, box / "agent.log", fds.all())
        finally:
            fds.close()
        pid = await self._sandbox_pid(proc, box)
        entry = {
            "id": sandbox_id,
            "pool": pool.name,
            "uid": uid,
            "pid": pid,
            "create_time": psutil.Process(pid).create_time(),
            "launcher_pid": proc.pid,
            "launcher_create_time": _create_time(proc.pid),
            "cgroup": bool(self._cgroups),
            "isolation": self.isolation,
            "limits": limits,
            "network": "none",
        }
        _write_private_json(box / "meta.json", entry)
        if pool.network and inside:
            entry["network_private"] = pool.network_private
            entry["network"] = await self._network(sandbox_id, entry, box)
            _write_private_json(box / "meta.json", entry)
        return _handle(entry, box)

    def _argv(
        self,
        sandbox_id: str,
        pool: PoolSpec,
        template: LocalTemplate,
        uid: int,
        fds: "_Fds",
        *,
        use_rlimit: bool,
    ) -> list[str]:
        agent_args = ["--listen-fd", str(fds["listen"]), "--env-fd", str(fds["env"])]
        if use_rlimit:
            agent_args += ["--memory-mb", str(pool.memory_mb)]
        drop: list[str] = []
        if self._drop_uid:
            assert self._setpriv is not None  # checked at start: uids are dropped with it
            drop = [self._setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
        if self._bwrap is None:
            return [
                *drop,
                self._python,
                "-I",
                "-S",
                f"/proc/self/fd/{fds['agent']}",
                "--supervisor",
                f"/proc/self/fd/{fds['supervisor']}",
                *agent_args,
            ]
        return [
            *drop,
            *_bwrap_args(
                self._bwrap,
                sandbox_id,
                pool,
                template,
                fds,
                self._python,
                userns=self._userns,
            ),
            self._python,
            "-I",
            "-S",
            AGENT_PATH_INSIDE,
            *agent_args,
        ]

    async def _network(self, sandbox_id: str, entry: dict[str, Any], box: Path) -> str:
        """User-mode networking into the sandbox's own network namespace: NAT to the outside,
        with the host's loopback refused (`--disable-host-loopback`). The helper must enter
        the sandbox's namespaces, so it starts as root, then confines itself
        (`--enable-sandbox`: an empty root and no capabilities; `--enable-seccomp`); it runs
        in the sandbox's cgroup and dies with it.

        The egress filter (netfilter.py: no host address, link-local, slirp's gateway or,
        by default, private range) goes into that namespace first, and the helper joins the
        very namespace the filter was installed in (one descriptor for both): no route out
        ever exists without it. No filter, no sandbox."""
        helper = shutil.which(self._config.network_helper)
        if helper is None:
            raise CreateError(
                f"network: true needs {self._config.network_helper!r} (apt install slirp4netns)",
                retryable=False,
            )
        try:
            netns_fd = netfilter.open_netns(entry["pid"], entry["create_time"])
        except (netfilter.FilterError, OSError) as exc:
            raise CreateError(f"egress filter: {exc}") from exc
        try:
            return await self._filter_and_connect(sandbox_id, entry, box, helper, netns_fd)
        finally:
            os.close(netns_fd)

    async def _filter_and_connect(
        self, sandbox_id: str, entry: dict[str, Any], box: Path, helper: str, netns_fd: int
    ) -> str:
        addresses = netfilter.host_addresses()
        try:
            await netfilter.apply(
                netns_fd,
                netfilter.ruleset(addresses, allow_private=bool(entry.get("network_private"))),
            )
        except netfilter.FilterError as exc:
            raise CreateError(
                f"egress filter not installed, no network: {exc}", retryable=not exc.missing
            ) from exc
        self._filtered[sandbox_id] = addresses
        read_fd, write_fd = os.pipe()
        argv = [
            helper,
            "--configure",
            "--mtu=65520",
            "--disable-host-loopback",
            f"--ready-fd={write_fd}",
            "--enable-sandbox",
            "--enable-seccomp",
            "--netns-type=path",  # join the network namespace only, as root (not its userns)
            f"/proc/self/fd/{netns_fd}",  # the one the filter is in
            "tap0",
        ]
        if self._cgroups:
            files = [str(f) for f in self._cgroups.procs_files(sandbox_id)]
            argv = [
                "/bin/sh",
                "-c",
                JOIN_AND_EXEC,
                f"sandboxd-net:{sandbox_id}",
                *files,
                "--",
                *argv,
            ]
        try:
            proc = await _spawn(argv, box / "network.log", (write_fd, netns_fd))
        finally:
            os.close(write_fd)
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):  # not wait_for: see loops.wait_event
                ready = await asyncio.to_thread(os.read, read_fd, 1)
        except TimeoutError:
            ready = b""
        finally:
            os.close(read_fd)
        if ready != b"1":
            detail = _tail(box / "network.log")
            raise CreateError(f"{self._config.network_helper} did not come up: {detail}")
        return f"{self._config.network_helper}:{proc.pid}"

    async def _sandbox_pid(self, proc: asyncio.subprocess.Process, box: Path) -> int:
        """The host pid of the sandbox's first process (the agent)."""
        if self._bwrap is None:
            return proc.pid
        # bwrap forks the namespace's PID 1 as its only child; find it. (The launcher shell
        # and setpriv exec bwrap in place, so bwrap is `proc`.) With a user namespace bwrap
        # forks twice: the agent is the deepest process of the chain.
        deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_S
        while asyncio.get_running_loop().time() < deadline:
            chain = _chain(proc.pid)
            if chain and _is_agent(chain[-1]):
                return chain[-1]
            if proc.returncode is not None:
                break
            await asyncio.sleep(0.005)
        raise CreateError(f"bubblewrap did not start the sandbox: {_tail(box / 'agent.log')}")

    def watch(self, sandbox_id: str, on_exit: Callable[[str], None]) -> bool:
        """`on_exit(sandbox_id)` from the event loop when the sandbox's first process (the
        one its registry entry names, pid and start time) exits. False when it is gone
        already, the kernel has no pidfd, or too many are watched (the tick still checks)."""
        if sandbox_id in self._watched:
            return True
        pidfd_open = getattr(os, "pidfd_open", None)
        entry = self._entry(sandbox_id)
        if (
            not self._config.watch_deaths
            or pidfd_open is None
            or entry is None
            or len(self._watched) >= self._max_watched
        ):
            return False
        try:
            fd = pidfd_open(entry.get("pid"))
        except (OSError, TypeError, ValueError):
            return False
        if _process(entry) is None:  # checked after opening: the pid was not reused since
            os.close(fd)
            return False
        asyncio.get_running_loop().add_reader(fd, self._exited, sandbox_id)
        self._watched[sandbox_id] = (fd, on_exit)
        return True

    def unwatch(self, sandbox_id: str) -> None:
        watched = self._watched.pop(sandbox_id, None)
        if watched is not None:
            asyncio.get_running_loop().remove_reader(watched[0])
            os.close(watched[0])

    def _exited(self, sandbox_id: str) -> None:
        on_exit = self._watched[sandbox_id][1]
        self.unwatch(sandbox_id)
        on_exit(sandbox_id)

    def _alive_entry(self, sandbox_id: str) -> dict[str, Any] | None:
        entry = self._entry(sandbox_id)
        if entry is None or _process(entry) is None:
            return None
        return entry

    async def kill(self, sandbox_id: str, handle: dict[str, Any]) -> None:
        """SIGKILL every process of the sandbox and wait until they are gone; its registry
        entry stays (terminate frees it). A sudden death, as a crash would be. Only processes
        of the sandbox's own cgroup, or of the tree of the pid the registry recorded, are
        touched: never a pid from `handle` (a Redis record)."""
        await asyncio.to_thread(self._kill_all, sandbox_id)

    def _kill_all(self, sandbox_id: str) -> None:
        entry = self._entry(sandbox_id)
        if entry is None:
            # No registry entry (its meta.json lost) but its directory in this registry
            # (made before anything is started): no pid of it is trusted, but the sandbox's
            # own cgroup, named by the id in this registry's group, holds every process of
            # it. Without that directory the id is not ours, whatever runs by that name.
            box = self._box(sandbox_id)
            if box is not None and self._cgroups and _real_dir(box):
                if self._cgroups.exists(sandbox_id):
                    self._cgroups.kill(sandbox_id)
            return
        if self._cgroups and entry.get("cgroup") and self._cgroups.exists(sandbox_id):
            self._cgroups.kill(sandbox_id)
        procs = _live_tree(entry)
        # The launcher (bubblewrap's parent) only if it is still that process: its pid may
        # have been reused since it exited.
        started = entry.get("launcher_create_time")
        launcher = (
            _same_process(entry.get("launcher_pid"), started)
            if isinstance(started, (int, float))
            else None
        )
        if launcher is not None:
            procs.append(launcher)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, 5.0)

    async def terminate(self, sandbox_id: str, handle: dict[str, Any]) -> None:
        self.unwatch(sandbox_id)  # an end we make is no death to report
        box = self._box(sandbox_id)
        if box is None:
            log.warning(
                "not a sandbox id; nothing terminated", extra={"sandbox": str(sandbox_id)[:80]}
            )
            return
        if self._entry(sandbox_id) is None and not await asyncio.to_thread(os.path.lexists, box):
            return  # nothing of ours by that id
        await self.kill(sandbox_id, handle)
        self._filtered.pop(sandbox_id, None)
        entry = self._entry(sandbox_id)
        if self._cgroups and (
            (entry or {}).get("cgroup") or (_real_dir(box) and self._cgroups.exists(sandbox_id))
        ):
            self._cgroups.remove(sandbox_id)
        await asyncio.to_thread(_remove_box, self.root, box)

    async def reset(
        self, sandbox_id: str, handle: dict[str, Any], pool: PoolSpec
    ) -> dict[str, Any]:
        """From the host side: every process of the sandbox is killed and its namespaces,
        tmpfs mounts (/workspace, /tmp, /dev/shm, /run) and socket go with them; the sandbox
        is then started afresh under the same id and uid, the reset command runs, and the
        `run:` program starts again (its news numbered past its predecessor's). Nothing the
        last holder did inside survives, and nothing it says is trusted."""
        template = self._templates.get(pool.template)
        box = self._box(sandbox_id)
        if template is None or box is None or self._entry(sandbox_id) is None:
            raise ResetError("not a sandbox of this provider's registry")
        try:
            last = await _last_news(box / "agent.sock") if pool.run is not None else 0
            await self.kill(sandbox_id, handle)
            if self._bwrap is None:
                await asyncio.to_thread(_wipe_host_workdir, box)
            fresh = await self._start(sandbox_id, pool, template, box, program=False)
            result = await AgentClient(str(box / "agent.sock")).exec(pool.reset_command, timeout=60)
            if result.exit_code != 0:
                detail = (result.stderr or result.stdout).decode(errors="replace")[-300:].strip()
                raise ResetError(f"reset command exited {result.exit_code}: {detail}")
            # After the reset command, which would delete the program's files from $HOME.
            await _start_program(fresh["socket"], pool, after=last)
        except (CreateError, AgentError, OSError) as exc:
            raise ResetError(str(exc)) from exc
        return fresh

    async def probe(
        self, sandbox_id: str, handle: dict[str, Any], health: HealthSpec | None, since: int
    ) -> Probe:
        entry = self._alive_entry(sandbox_id)
        if entry is None:
            return Probe(ok=False, alive=False, detail="agent gone: the sandbox's first process")
        if entry.get("network", "none") != "none":
            try:
                await self._refresh_filter(sandbox_id, entry)
            except (netfilter.FilterError, OSError) as exc:
                log.warning(
                    "egress filter not updated", extra={"sandbox": sandbox_id, "error": str(exc)}
                )
                return Probe(ok=False, alive=True, detail=f"egress filter not updated: {exc}")
        agent = AgentClient(str(self.root / sandbox_id / "agent.sock"))
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

    async def _refresh_filter(self, sandbox_id: str, entry: dict[str, Any]) -> None:
        """An address the host gained since the sandbox's filter was installed (a new
        interface, DHCP, a VPN) is refused from now on: the whole table is installed again,
        in one transaction. A daemon restarted (or upgraded) installs every filter afresh."""
        addresses = netfilter.host_addresses()
        if self._filtered.get(sandbox_id) == addresses:
            return
        netns_fd = netfilter.open_netns(entry["pid"], entry["create_time"])
        try:
            script = netfilter.ruleset(addresses, allow_private=bool(entry.get("network_private")))
            await netfilter.apply(netns_fd, script)
        finally:
            os.close(netns_fd)
        self._filtered[sandbox_id] = addresses

    async def is_alive(self, sandbox_id: str, handle: dict[str, Any]) -> bool:
        return self._alive_entry(sandbox_id) is not None

    def usage(self, handle: dict[str, Any]) -> tuple[float, int] | None:
        """CPU seconds and resident bytes of the sandbox's live processes (blocking: /proc)."""
        entry = self._entry(str(handle.get("id", "")))
        if entry is None:
            return None
        cpu, rss = 0.0, 0
        tree = _live_tree(entry)
        for proc in tree:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                cpu += times.user + times.system
                rss += proc.memory_info().rss
        return (cpu, rss) if tree else None

    async def list_sandboxes(self) -> list[ProviderSandbox]:
        found = []
        for box in _subdirs(self.root):
            entry = self._entry(box.name)
            if entry and _process(entry) is not None:
                found.append(
                    ProviderSandbox(
                        id=box.name, pool=str(entry.get("pool", "")), handle=_handle(entry, box)
                    )
                )
        return found

    async def cleanup_leftovers(self, keep: set[str]) -> list[str]:
        """Free the registry entries (and processes) of sandboxes not in `keep` (left by a
        daemon killed mid-create)."""
        removed = []
        for box in _subdirs(self.root):
            if box.name not in keep:
                await self.terminate(box.name, {})
                removed.append(box.name)
        return removed


def _real_dir(path: Path) -> bool:
    """A directory, not a symlink to one."""
    return path.is_dir() and not path.is_symlink()


class _Fds:
    """Descriptors handed to the launched sandbox, by role; closed in the daemon after."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def add(self, role: str, fd: int) -> None:
        self._fds[role] = fd

    def __getitem__(self, role: str) -> int:
        return self._fds[role]

    def __contains__(self, role: str) -> bool:
        return role in self._fds

    def all(self) -> tuple[int, ...]:
        return tuple(self._fds.values())

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


async def _spawn(argv: list[str], log: Path, fds: tuple[int, ...]) -> asyncio.subprocess.Process:
    """Start a sandbox's process (launcher or network helper): its own session, a clean
    environment, only `fds` inherited, output appended to its private log."""
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            start_new_session=True,
            env={"PATH": "/usr/local/bin:/usr/bin:/bin"},
            pass_fds=fds,
            cwd="/",
        )
    finally:
        os.close(log_fd)


def _handle(entry: dict[str, Any], box: Path) -> dict[str, Any]:
    """What the daemon records in Redis: for display and for clients on this host. The
    provider itself never acts on it."""
    return {
        "id": entry["id"],
        "pid": entry.get("pid"),
        "uid": entry.get("uid"),
        "dir": str(box),
        "socket": str(box / "agent.sock"),
        "isolation": entry.get("isolation", ""),
        "limits": entry.get("limits", ""),
        "network": entry.get("network", "none"),
    }


def _private_dir(path: Path) -> None:
    """A directory only root (the daemon's user) may enter, whatever the umask; refuses a
    symlink or a directory of another owner at that path."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise CreateError(f"{path} is not a directory owned by the daemon's user", retryable=False)
    if stat.S_IMODE(info.st_mode) & 0o066:  # 0700, or 0711 for a sandbox without bubblewrap
        os.chmod(path, 0o700)


def _write_private_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(data, out)
    os.replace(tmp, path)


def _read_private_json(path: Path) -> dict[str, Any] | None:
    """A registry file: a regular file of ours, not a symlink, parsed; else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_size > 65536:
            return None
        try:
            data = json.loads(handle.read())
        except ValueError:
            return None
    return data if isinstance(data, dict) else None


def _subdirs(root: Path) -> list[Path]:
    """The registry's sandbox directories: real directories with a sandbox-id name."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    return [
        Path(e.path)
        for e in entries
        if SANDBOX_ID.match(e.name) and e.is_dir(follow_symlinks=False)
    ]


def _remove_box(root: Path, box: Path) -> None:
    """Delete `root/<id>` only: a real directory directly under the registry root."""
    if box.parent != root:
        return
    try:
        info = os.lstat(box)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid():
        shutil.rmtree(box, ignore_errors=True)  # rmtree never follows symlinks inside


def _host_workdir(box: Path, uid: int) -> Path:
    """Without bubblewrap: a host directory for HOME and TMPDIR, the sandbox uid's own."""
    work = box / "work"
    work.mkdir(mode=0o700, exist_ok=True)
    (work / "tmp").mkdir(mode=0o700, exist_ok=True)
    if os.geteuid() == 0:
        for path in (work, work / "tmp"):
            os.lchown(path, uid, uid)
    # The sandbox uid must pass through to its work directory (it cannot list either).
    os.chmod(box.parent, 0o711)
    os.chmod(box, 0o711)
    return work


def _wipe_host_workdir(box: Path) -> None:
    work = box / "work"
    if work.is_dir() and not work.is_symlink():
        shutil.rmtree(work, ignore_errors=True)


def _listen(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(f"sandboxd-{name}", 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-500:].strip()
    except OSError:
        return ""


def _proc_overmounted() -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4].startswith("/proc/") for line in f)
    except (OSError, IndexError):
        return False


def _agent_python(config: LocalProviderConfig) -> str:
    if config.agent_python:
        return config.agent_python
    if os.path.exists("/usr/bin/python3"):
        return "/usr/bin/python3"
    return os.path.realpath(sys.executable)


async def _start_program(socket_path: str, pool: PoolSpec, *, after: int = 0) -> None:
    """The pool's `run.files` written below $HOME (/workspace), then its program started,
    its news numbered past `after` (the last number of a predecessor)."""
    if pool.run is None:
        return
    agent = AgentClient(socket_path)
    for path, text in pool.run.files.items():
        await agent.write(path, text.encode())
    await agent.supervise({**pool.run.model_dump(exclude={"files"}), "seq_after": after})


async def _last_news(socket_path: Path) -> int:
    """The number of the program's newest news, so that the program started after a reset
    numbers past it (its numbers start at the clock in ms, which a program that printed
    more than a line a millisecond has run ahead of); 0 if the agent cannot say."""
    try:
        async with asyncio.timeout(5.0):
            reply = await AgentClient(str(socket_path)).health(None, 1.0, 2**62)
    except (AgentError, TimeoutError, OSError):
        return 0
    seq = (reply.get("program") or {}).get("seq")
    return seq if isinstance(seq, int) and 0 <= seq <= 2**62 else 0


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


def _process(entry: dict[str, Any]) -> psutil.Process | None:
    """The sandbox's first process, if it is still the same process (pids get reused)."""
    return _same_process(entry.get("pid"), entry.get("create_time"))


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _same_process(pid: Any, create_time: Any) -> psutil.Process | None:
    """The live, non-zombie process `pid`, if it was started at `create_time` (None: any)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        return None
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - float(create_time)) > 0.005:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.Error, TypeError, ValueError):
        return None


def _live_tree(entry: dict[str, Any]) -> list[psutil.Process]:
    root = _process(entry)
    if root is None:
        return []
    tree = [root]
    for pid in _descendants(root.pid):
        with contextlib.suppress(psutil.Error):
            tree.append(psutil.Process(pid))
    return tree


def _chain(pid: int) -> list[int]:
    """`pid` and its first child, that one's first child, and so on."""
    chain = [pid]
    while True:
        kids = _children(chain[-1])
        if not kids:
            return chain
        chain.append(kids[0])


def _is_agent(pid: int) -> bool:
    """Is `pid` the agent (its interpreter running agent.py), not bubblewrap naming it?"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return len(argv) > 3 and argv[3] == AGENT_PATH_INSIDE.encode() and b"bwrap" not in argv[0]


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
        return None
    path = shutil.which(config.bwrap_path)
    if path is None and config.isolation == "bwrap":
        raise IsolationError(f"isolation = bwrap but {config.bwrap_path!r} is not installed")
    return path


def _base_env(
    sandbox_id: str, pool: PoolSpec, template: LocalTemplate, inside: bool, workdir: Path | None
) -> dict[str, str]:
    home = "/workspace" if inside or workdir is None else str(workdir)
    tmp = "/tmp" if inside or workdir is None else str(workdir / "tmp")
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": tmp,
        "LANG": "C.UTF-8",
        "SANDBOX_ID": sandbox_id,
        "SANDBOX_POOL": pool.name,
        **template.env,
        **pool.env,
    }


def _bwrap_args(
    bwrap: str,
    sandbox_id: str,
    pool: PoolSpec,
    template: LocalTemplate,
    fds: _Fds,
    python: str,
    *,
    userns: bool,
) -> list[str]:
    args = [bwrap]
    if userns:
        # Root inside, the sandbox's own unprivileged uid outside; no further namespaces.
        args += ["--unshare-user", "--uid", "0", "--gid", "0"]
        if not pool.security.nested_userns:
            args.append("--disable-userns")
    args += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net"]
    args += ["--unshare-cgroup-try", "--hostname", sandbox_id]
    args.append("--new-session")
    args += ["--as-pid-1", "--cap-drop", "ALL"]
    for path in SYSTEM_DIRS:
        args += ["--ro-bind-try", path, path]
    for entry in ETC_ENTRIES:
        if entry == "resolv.conf" and "resolv" in fds:
            args += ["--ro-bind-data", str(fds["resolv"]), "/etc/resolv.conf"]
        else:
            args += ["--ro-bind-try", f"/etc/{entry}", f"/etc/{entry}"]
    prefix = str(Path(python).parent.parent)
    if not prefix.startswith("/usr"):
        args += ["--ro-bind", prefix, prefix]  # an interpreter outside /usr (/opt)
    for path in template.ro_binds:
        args += ["--ro-bind-try", path, path]
    size = str(pool.disk_mb * 1024 * 1024)
    args += ["--proc", "/proc", "--dev", "/dev"]
    args += ["--size", size, "--tmpfs", "/dev/shm", "--remount-ro", "/dev"]
    args += ["--size", size, "--tmpfs", "/workspace", "--size", size, "--tmpfs", "/tmp"]
    args += ["--size", "1048576", "--tmpfs", "/run"]
    args += ["--ro-bind-data", str(fds["agent"]), AGENT_PATH_INSIDE]
    args += ["--ro-bind-data", str(fds["supervisor"]), SUPERVISOR_PATH_INSIDE]
    if "seccomp" in fds:
        args += ["--seccomp", str(fds["seccomp"])]
    args += ["--remount-ro", "/", "--chdir", "/workspace", "--"]
    return args


async def _wait_for_agent(socket_path: str, alive) -> None:
    client = AgentClient(socket_path)
    deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_S
    last_error = "no answer"
    while asyncio.get_running_loop().time() < deadline:
        if not alive():
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
