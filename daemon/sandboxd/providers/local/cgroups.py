"""Whole-sandbox limits with cgroups: pids, memory (the whole process tree, tmpfs included)
and CPU quota, on cgroup v2 (unified) or v1 (one hierarchy per controller).

Each sandbox gets its own group (`sandbox-<id>`) before its first process exists: the
launcher joins it and then execs bubblewrap, so nothing of the sandbox ever runs outside it.
The group is also how the daemon finds and kills every process of a sandbox (double forks
and daemonized processes included) without trusting anything the sandbox reports.

- v2: groups under `cgroup_parent`, by default the daemon's own cgroup, which systemd
  delegates with `Delegate=yes`; the daemon moves itself into a `daemon` leaf so that its
  cgroup may enable controllers for its children (the "no internal processes" rule).
- v1: groups under `<hierarchy>/<cgroup_name>/` in the pids, memory and cpu hierarchies.
"""

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000
CONTROLLERS = ("pids", "memory", "cpu")


@dataclass(frozen=True)
class Limits:
    cpu: float
    memory_mb: int
    pids_max: int


class CgroupError(RuntimeError):
    """The sandbox's group could not be made; the sandbox is not started."""


class Cgroups:
    """One group per sandbox, on cgroup v1 or v2."""

    def __init__(self, version: str, bases: dict[str, Path]):
        self.version = version
        self._bases = bases  # controller -> parent directory (v2: one parent for all)

    @property
    def describe(self) -> str:
        return f"cgroup {self.version} ({', '.join(CONTROLLERS)})"

    @classmethod
    def detect(cls, name: str, parent: Path | None, root: Path = ROOT) -> "Cgroups | str":
        """Cgroups ready for use, or why not (a string for the operator)."""
        if (root / "cgroup.controllers").exists():
            return _detect_v2(parent or _own_v2_group(root), root)
        bases = {}
        for controller in CONTROLLERS:
            hierarchy = root / controller
            if not (hierarchy / "cgroup.procs").exists():
                return f"cgroup v1 controller {controller!r} not mounted at {hierarchy}"
            bases[controller] = hierarchy / name
        try:
            for base in bases.values():
                base.mkdir(exist_ok=True)
                with contextlib.suppress(OSError):  # v1 memory: limits count children
                    (base / "memory.use_hierarchy").write_text("1")
        except OSError as exc:
            return f"cannot create cgroup v1 groups named {name!r}: {exc.strerror}"
        return cls("v1", bases)

    def _groups(self, sandbox_id: str) -> dict[str, Path]:
        return {ctl: base / f"sandbox-{sandbox_id}" for ctl, base in self._bases.items()}

    def prepare(self, sandbox_id: str, limits: Limits) -> list[Path]:
        """Make the sandbox's group(s) with its limits; returns the `cgroup.procs` files its
        launcher must join."""
        groups = self._groups(sandbox_id)
        try:
            for group in set(groups.values()):
                group.mkdir(exist_ok=True)
            memory = limits.memory_mb * 1024 * 1024
            quota = max(1000, int(limits.cpu * CPU_PERIOD_US))
            if self.version == "v2":
                group = groups["pids"]
                (group / "pids.max").write_text(str(limits.pids_max))
                (group / "memory.max").write_text(str(memory))
                with contextlib.suppress(OSError):
                    (group / "memory.swap.max").write_text("0")
                (group / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
            else:
                (groups["pids"] / "pids.max").write_text(str(limits.pids_max))
                (groups["memory"] / "memory.limit_in_bytes").write_text(str(memory))
                memsw = groups["memory"] / "memory.memsw.limit_in_bytes"
                if memsw.exists():  # swap accounting on: the limit covers swap too
                    memsw.write_text(str(memory))
                (groups["cpu"] / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
                (groups["cpu"] / "cpu.cfs_quota_us").write_text(str(quota))
        except OSError as exc:
            self.remove(sandbox_id)
            raise CgroupError(f"cgroup limits for {sandbox_id}: {exc}") from exc
        return sorted({g / "cgroup.procs" for g in groups.values()})

    def procs_files(self, sandbox_id: str) -> list[Path]:
        """The `cgroup.procs` files of an existing sandbox group (for a helper to join)."""
        return sorted({g / "cgroup.procs" for g in self._groups(sandbox_id).values()})

    def pids(self, sandbox_id: str) -> list[int]:
        """Every process in the sandbox's group (empty if the group is gone)."""
        try:
            text = (self._groups(sandbox_id)["pids"] / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def exists(self, sandbox_id: str) -> bool:
        return self._groups(sandbox_id)["pids"].is_dir()

    def kill(self, sandbox_id: str, timeout: float = 5.0) -> bool:
        """SIGKILL every process of the group until it is empty (blocking; run in a thread).
        A fork racing the kill lands in the same group and is caught by the next round."""
        group = self._groups(sandbox_id)["pids"]
        if self.version == "v2" and (group / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                (group / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.pids(sandbox_id)
            if not pids:
                return True
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.002)
        return not self.pids(sandbox_id)

    def remove(self, sandbox_id: str) -> None:
        for group in set(self._groups(sandbox_id).values()):
            with contextlib.suppress(OSError):
                group.rmdir()

    def memory_peak(self, sandbox_id: str) -> int | None:
        """Most memory the group used (bytes), for tests and status."""
        group = self._groups(sandbox_id)["memory"]
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            with contextlib.suppress(OSError, ValueError):
                return int((group / name).read_text())
        return None


def _own_v2_group(root: Path) -> Path:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return root / line[3:].lstrip("/")
    return root


def _detect_v2(parent: Path, root: Path) -> "Cgroups | str":
    try:
        available = set((parent / "cgroup.controllers").read_text().split())
    except OSError as exc:
        return f"{parent} is not a cgroup v2 directory ({exc.strerror})"
    missing = set(CONTROLLERS) - available
    if missing:
        return f"cgroup v2 controllers {sorted(missing)} not delegated to {parent}"
    try:
        enabled = set((parent / "cgroup.subtree_control").read_text().split())
        if set(CONTROLLERS) - enabled:
            # No internal processes: move ourselves (and any other process here) to a leaf.
            procs = (parent / "cgroup.procs").read_text().split()
            if procs:
                leaf = parent / "daemon"
                leaf.mkdir(exist_ok=True)
                for pid in procs:
                    with contextlib.suppress(ProcessLookupError):
                        (leaf / "cgroup.procs").write_text(pid)
            (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in CONTROLLERS))
    except OSError as exc:
        return f"cannot enable {list(CONTROLLERS)} in {parent}: {exc.strerror} (Delegate=yes?)"
    return Cgroups("v2", dict.fromkeys(CONTROLLERS, parent))
