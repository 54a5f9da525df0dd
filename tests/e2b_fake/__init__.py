"""A local server that speaks E2B's HTTP API (control plane and envd) on 127.0.0.1, so the
real e2b SDK runs end to end in tests without the internet.

    with FakeE2B(api_key="k") as fake:
        AsyncSandbox.create(api_url=fake.url, sandbox_url=fake.url, api_key="k")

It runs uvicorn in a thread with its own event loop; `fake.call(fn)` runs `fn(world)` on
that loop, for changes that must not race a request (a sandbox vanishing).
"""

import asyncio
import contextlib
import shutil
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import uvicorn
from starlette.applications import Starlette

from tests.e2b_fake import controlplane, envd
from tests.e2b_fake.state import Account, FakeSandbox, World

T = TypeVar("T")
EXPIRY_TICK_S = 0.05

__all__ = ["FakeE2B", "FakeSandbox", "World"]


class FakeE2B:
    def __init__(
        self,
        api_key: str = "e2b_test_key",
        *,
        templates: set[str] | None = None,
        max_timeout_s: int = 3600,
        max_concurrent: int = 100,
        creates_per_s: float = 1000.0,
        burst: int = 1000,
    ):
        self.world = World(
            Account(
                api_key,
                templates=templates or {"base"},
                max_timeout_s=max_timeout_s,
                max_concurrent=max_concurrent,
                creates_per_s=creates_per_s,
                burst=burst,
            )
        )
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.url = ""

    @property
    def faults(self):
        return self.world.faults

    @property
    def ledger(self):
        return self.world.ledger

    def _app(self) -> Any:
        api = Starlette(
            routes=controlplane.routes(self.world) + envd.routes(self.world),
            lifespan=self._lifespan,
        )
        rpc = envd.process_app(self.world)

        async def app(scope, receive, send):
            if scope["type"] == "http" and scope["path"].startswith("/process.Process/"):
                await rpc(scope, receive, send)
            else:
                await api(scope, receive, send)

        return app

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self.loop = asyncio.get_running_loop()
        expiry = asyncio.create_task(self._expire_forever())
        try:
            yield
        finally:
            expiry.cancel()
            for sandbox_id in list(self.world.sandboxes):
                for task in self.world.remove(sandbox_id).tasks:  # type: ignore[union-attr]
                    task.cancel()
            shutil.rmtree(self.world.root, ignore_errors=True)

    async def _expire_forever(self) -> None:
        while True:
            self.world.expire()
            await asyncio.sleep(EXPIRY_TICK_S)

    def start(self) -> "FakeE2B":
        config = uvicorn.Config(
            self._app(),
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="on",
            loop="asyncio",  # its commands are subprocesses started from a thread
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fake-e2b", daemon=True)
        self._thread.start()
        started = threading.Event()
        for _ in range(1000):
            if self._server.started:
                started.set()
                break
            threading.Event().wait(0.01)
        if not started.is_set():
            raise RuntimeError("the fake E2B server did not start")
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            # Every sandbox killed first: the streams watching their commands end, so the
            # server's shutdown does not wait for them.
            with contextlib.suppress(Exception):  # a server that died has none running
                removed = self.call(lambda w: [w.remove(i) for i in list(w.sandboxes)])
                # ...and reaped before the loop ends: a process transport dropped while its
                # process runs is a ResourceWarning, an error in whichever test it surfaces.
                tasks = [t for sandbox in removed if sandbox for t in sandbox.tasks]
                if tasks and self.loop is not None:

                    async def settle() -> None:
                        await asyncio.wait(tasks, timeout=5)

                    asyncio.run_coroutine_threadsafe(settle(), self.loop).result(timeout=10)
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "FakeE2B":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def call(self, fn: Callable[[World], T]) -> T:
        """Run `fn(world)` on the server's loop and return its result."""
        assert self.loop is not None

        async def run() -> T:
            return fn(self.world)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=10)

    def vanish(self, sandbox_id: str) -> None:
        """The sandbox disappears on E2B's side, with no word to anyone."""
        self.call(lambda world: world.remove(sandbox_id))

    def ours(self, prefix: str = "sandboxd") -> list[FakeSandbox]:
        return self.call(
            lambda world: [
                s for s in world.sandboxes.values() if s.metadata.get("sandboxd") == prefix
            ]
        )
