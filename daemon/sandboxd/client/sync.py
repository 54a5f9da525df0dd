"""A blocking wrapper of `client.Client` for scripts that do not use asyncio.

    with SyncClient("redis://127.0.0.1:6379/0") as client:
        with client.claim("default") as sandbox:
            print(sandbox.exec("echo hi").stdout)

One event loop per SyncClient; use a SyncClient from one thread at a time.
"""

import asyncio
from collections.abc import Coroutine
from datetime import datetime
from typing import Any, TypeVar

from sandboxd.client.aio import Client, Sandbox
from sandboxd.providers.base import ExecResult

T = TypeVar("T")


class SyncSandbox:
    def __init__(self, sandbox: Sandbox, runner: asyncio.Runner):
        self._sandbox = sandbox
        self._runner = runner

    def __getattr__(self, name: str) -> Any:  # id, pool, claim_id, claim_token, lease_expires…
        return getattr(self._sandbox, name)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coro)

    def exec(self, command: list[str] | str, **kwargs: Any) -> ExecResult:
        return self._run(self._sandbox.exec(command, **kwargs))

    def write(self, path: str, data: bytes | str, mode: int | None = None) -> None:
        self._run(self._sandbox.write(path, data, mode))

    def read(self, path: str) -> bytes:
        return self._run(self._sandbox.read(path))

    def renew(self, lease_s: int | None = None) -> datetime:
        return self._run(self._sandbox.renew(lease_s))

    def release(self) -> None:
        self._run(self._sandbox.release())

    def __enter__(self) -> "SyncSandbox":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._run(self._sandbox.__aexit__(*exc_info))


class SyncClient:
    def __init__(self, url: str, **kwargs: Any):
        self._runner = asyncio.Runner()
        self._client = self._runner.run(_make_client(url, kwargs))

    def claim(
        self,
        pool: str,
        lease_s: int | None = None,
        timeout_s: float | None = None,
        owner: str | None = None,
    ) -> SyncSandbox:
        request = self._client.claim(pool, lease_s=lease_s, timeout_s=timeout_s, owner=owner)
        return SyncSandbox(self._runner.run(_await(request)), self._runner)

    def attach(self, sandbox_id: str, token: str) -> SyncSandbox:
        return SyncSandbox(self._runner.run(self._client.attach(sandbox_id, token)), self._runner)

    def release(
        self, sandbox_id: str, token: str = "", *, force: bool = False, operator: str | None = None
    ) -> None:
        self._runner.run(self._client.release(sandbox_id, token, force=force, operator=operator))

    def renew(self, sandbox_id: str, token: str, lease_s: int | None = None) -> int:
        return self._runner.run(self._client.renew(sandbox_id, token, lease_s))

    def close(self) -> None:
        self._runner.run(self._client.aclose())
        self._runner.close()

    def __enter__(self) -> "SyncClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def _make_client(url: str, kwargs: dict[str, Any]) -> Client:
    return Client.from_url(url, **kwargs)  # inside the runner: bound to its loop


async def _await(request: Any) -> Sandbox:
    return await request
