"""The fake E2B's world: sandboxes with timeouts, the account's limits, injected faults, and
a ledger of every request for tests to check the daemon's manners against."""

import asyncio
import contextlib
import secrets
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil


@dataclass
class Faults:
    """Set from a test (another thread): plain attributes, read per request."""

    create_errors: list[tuple[int, str, dict[str, str]]] = field(default_factory=list)
    errors_left: int = 0  # how many of create_errors' head to still answer (0: none)
    slow_s: float = 0.0  # added to every control-plane response
    lose_create_responses: int = 0  # create, then answer 500 as if the response was lost


HOME = "/home/user"  # E2B's default user and its home


@dataclass
class FakeSandbox:
    """A sandbox's files are `workdir/home` (its /home/user) and `workdir/tmp` (its /tmp):
    commands run under bubblewrap with those mounted there, so what they do to $HOME and
    /tmp stays in the sandbox, as in E2B's VM."""

    id: str
    template: str
    metadata: dict[str, str]
    envs: dict[str, str]
    timeout_s: int
    started_at: float
    end_at: float
    token: str
    workdir: Path
    state: str = "running"
    processes: dict[int, "asyncio.subprocess.Process"] = field(default_factory=dict)
    commands: dict[int, tuple[str, list[str]]] = field(default_factory=dict)
    watched: dict[int, Any] = field(default_factory=dict)  # envd.FakeProcess by pid
    tasks: set["asyncio.Task[None]"] = field(default_factory=set)  # watching the processes

    @property
    def home(self) -> Path:
        return self.workdir / "home"

    @property
    def tmp(self) -> Path:
        return self.workdir / "tmp"

    def run_task(self, coro) -> None:
        """A task of the sandbox's own (watching a process), cancelled when it goes."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def members(self) -> list[psutil.Process]:
        """Every process of the sandbox, as the VM holds them all: its commands and all they
        started (in sessions of their own too), and orphans that outlived their parents
        (found by the E2B_SANDBOX_ID every command's environment carries)."""
        found: dict[int, psutil.Process] = {}
        for process in self.processes.values():
            if process.returncode is not None:
                continue
            with contextlib.suppress(psutil.Error):
                top = psutil.Process(process.pid)
                found[top.pid] = top
                found.update((p.pid, p) for p in top.children(recursive=True))
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if process.environ().get("E2B_SANDBOX_ID") == self.id:
                    found.setdefault(process.pid, process)
        return list(found.values())

    def signal_all(self, signum: int) -> None:
        """To every process of the sandbox: SIGSTOP freezes it whole, as a paused VM."""
        for process in self.members():
            with contextlib.suppress(psutil.Error):
                process.send_signal(signum)

    def end(self) -> None:
        """Killed whole: each command's stream then ends with its exit."""
        self.signal_all(signal.SIGKILL)

    def listed(self) -> dict[str, Any]:
        return {
            "templateID": self.template,
            "sandboxID": self.id,
            "clientID": "fake",
            "startedAt": _iso(self.started_at),
            "endAt": _iso(self.end_at),
            "cpuCount": 2,
            "memoryMB": 512,
            "diskSizeMB": 1024,
            "state": self.state,
            "envdVersion": ENVD_VERSION,
            "metadata": self.metadata,
        }

    def created(self, domain: str) -> dict[str, Any]:
        return {
            "templateID": self.template,
            "sandboxID": self.id,
            "clientID": "fake",
            "envdVersion": ENVD_VERSION,
            "envdAccessToken": self.token,
            "domain": domain,
        }


ENVD_VERSION = "0.4.0"


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


@dataclass
class Ledger:
    requests: list[tuple[float, str, str, int]] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)
    rate_limited: int = 0  # 429s from the account's own rate limit (not injected ones)
    set_timeouts: list[tuple[str, int]] = field(default_factory=list)

    def creates(self) -> list[tuple[float, int]]:
        return [(t, s) for t, m, p, s in self.requests if m == "POST" and p == "/v2/sandboxes"]


class Account:
    """What E2B enforces per team: key, templates, plan caps, creation rate."""

    def __init__(
        self,
        api_key: str,
        *,
        templates: set[str],
        max_timeout_s: int,
        max_concurrent: int,
        creates_per_s: float,
        burst: int,
    ):
        self.api_key = api_key
        self.templates = templates
        self.max_timeout_s = max_timeout_s
        self.max_concurrent = max_concurrent
        self.creates_per_s = creates_per_s
        self.burst = burst
        self._tokens = float(burst)
        self._refilled = time.monotonic()

    def take_create_token(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.creates_per_s)
        self._refilled = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class World:
    def __init__(self, account: Account):
        self.account = account
        self.sandboxes: dict[str, FakeSandbox] = {}
        self.by_idempotency_key: dict[str, str] = {}
        self.faults = Faults()
        self.ledger = Ledger()
        self.root = Path(tempfile.mkdtemp(prefix="fake-e2b-"))
        self.init_calls: list[tuple[str, list[str]]] = []  # envd /init: sandbox, env names

    def new_sandbox(self, template: str, timeout_s: int, metadata: dict, envs: dict) -> FakeSandbox:
        sandbox_id = "i" + secrets.token_hex(9)
        workdir = self.root / sandbox_id
        workdir.mkdir()
        (workdir / "home").mkdir()
        (workdir / "tmp").mkdir()
        now = time.time()
        sandbox = FakeSandbox(
            id=sandbox_id,
            template=template,
            metadata=dict(metadata),
            envs=dict(envs),
            timeout_s=timeout_s,
            started_at=now,
            end_at=now + timeout_s,
            token=secrets.token_hex(16),
            workdir=workdir,
        )
        self.sandboxes[sandbox_id] = sandbox
        return sandbox

    def running(self) -> list[FakeSandbox]:
        return [s for s in self.sandboxes.values() if s.state == "running"]

    def remove(self, sandbox_id: str) -> FakeSandbox | None:
        sandbox = self.sandboxes.pop(sandbox_id, None)
        if sandbox is not None:
            sandbox.end()
            shutil.rmtree(sandbox.workdir, ignore_errors=True)
        return sandbox

    def expire(self) -> None:
        now = time.time()
        for sandbox in list(self.sandboxes.values()):
            if sandbox.state == "running" and sandbox.end_at <= now:
                self.remove(sandbox.id)
                self.ledger.expired.append(sandbox.id)
