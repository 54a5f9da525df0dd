"""How a client reaches a claimed sandbox, per provider.

A provider's record `handle` carries what is needed; `connect` turns it into an object with
`exec`, `write` and `read` (the AgentClient's interface). A provider that runs elsewhere
(e2b) adds its own connection here.
"""

from collections.abc import Callable
from typing import Any, Protocol

from sandboxd.agentclient import AgentClient, ExecResult, OutputCallback


class Connection(Protocol):
    async def exec(
        self,
        command: list[str] | str,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult: ...

    async def write(self, path: str, data: bytes, mode: int | None = None) -> None: ...

    async def read(self, path: str) -> bytes: ...


class UnreachableSandbox(RuntimeError):
    """The sandbox's provider offers no way for this client to reach it."""


def _local(handle: dict[str, Any]) -> Connection:
    # The agent's Unix socket: reachable on the daemon's host by its user (or root).
    return AgentClient(handle["socket"])


CONNECTORS: dict[str, Callable[[dict[str, Any]], Connection]] = {"local": _local}


def connect(provider: str, handle: dict[str, Any]) -> Connection:
    factory = CONNECTORS.get(provider)
    if factory is None:
        raise UnreachableSandbox(f"no client connection for provider {provider!r}")
    return factory(handle)
