"""cgroup v2 CPU and memory limits for local sandboxes, where a writable cgroup is delegated."""

import contextlib
import logging
from pathlib import Path

log = logging.getLogger(__name__)
CPU_PERIOD_US = 100_000


class CgroupLimiter:
    """Puts each sandbox in `<parent>/sandbox-<id>` with cpu.max and memory.max."""

    def __init__(self, parent: Path):
        self.parent = parent

    @classmethod
    def detect(cls, parent: Path | None) -> "CgroupLimiter | None":
        """A limiter when `parent` is a writable cgroup v2 with cpu and memory enabled."""
        if parent is None:
            return None
        try:
            controllers = (parent / "cgroup.subtree_control").read_text().split()
        except OSError as exc:
            log.warning(
                "cgroup limits off: %s is not a usable cgroup v2 directory (%s)",
                parent,
                exc.strerror,
            )
            return None
        missing = {"cpu", "memory"} - set(controllers)
        if missing:
            log.warning(
                "cgroup limits off: controllers %s not enabled in %s",
                sorted(missing),
                parent / "cgroup.subtree_control",
            )
            return None
        return cls(parent)

    def apply(self, sandbox_id: str, pid: int, cpu: float, memory_mb: int) -> bool:
        group = self.parent / f"sandbox-{sandbox_id}"
        try:
            group.mkdir(exist_ok=True)
            (group / "memory.max").write_text(str(memory_mb * 1024 * 1024))
            (group / "cpu.max").write_text(f"{int(cpu * CPU_PERIOD_US)} {CPU_PERIOD_US}")
            (group / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            log.warning("cgroup limits not applied to %s: %s", sandbox_id, exc)
            return False
        return True

    def remove(self, sandbox_id: str) -> None:
        with contextlib.suppress(OSError):
            (self.parent / f"sandbox-{sandbox_id}").rmdir()
