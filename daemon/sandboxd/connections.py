"""How a client reaches a claimed sandbox, per provider.

A provider's record `handle` carries what is needed; `connect` turns it into an object with
`exec`, `write` and `read` (the AgentClient's interface). Credentials are the client's own
(`credentials[provider]`, else the provider's usual environment variable): a handle in
Redis never holds one.
"""

import os
import stat
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


def _local(handle: dict[str, Any], credential: str | None, lease_expires_ms: int) -> Connection:
    # The agent's Unix socket: reachable on the daemon's host by its user (or root).
    return AgentClient(trusted_socket(handle.get("socket")))


def trusted_socket(path: Any) -> str:
    """A local sandbox's agent socket, checked before a client sends it a command (with the
    caller's env and secrets): `<registry>/<id>/agent.sock`, a socket, no symlink on the
    way, owned with its directory by root or this user and writable by nobody else. A Redis
    record naming another socket gets an error, not a connection."""
    if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
        raise UnreachableSandbox("the sandbox record names no agent socket")
    if os.path.basename(path) != "agent.sock" or os.path.realpath(path) != os.path.normpath(path):
        raise UnreachableSandbox(f"refusing agent socket {path!r}: not a sandboxd socket path")
    trusted = {0, os.geteuid()}
    try:
        sock, parent = os.lstat(path), os.lstat(os.path.dirname(path))
    except OSError as exc:
        raise UnreachableSandbox(f"agent socket {path!r}: {exc.strerror}") from None
    if (
        not stat.S_ISSOCK(sock.st_mode)
        or sock.st_uid not in trusted
        or parent.st_uid not in trusted
        or parent.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    ):
        raise UnreachableSandbox(f"refusing agent socket {path!r}: not owned by sandboxd")
    return path


def _e2b(handle: dict[str, Any], credential: str | None, lease_expires_ms: int) -> Connection:
    try:
        from sandboxd.e2bconnection import E2BConnection
    except ImportError as exc:
        raise UnreachableSandbox(
            f"an e2b sandbox needs the e2b SDK ({exc}): pip install 'sandboxd[e2b]'"
        ) from None
    return E2BConnection(handle, api_key=credential, lease_expires_ms=lease_expires_ms)


CONNECTORS: dict[str, Callable[[dict[str, Any], str | None, int], Connection]] = {
    "local": _local,
    "e2b": _e2b,
}


def connect(
    provider: str,
    handle: dict[str, Any],
    *,
    credentials: dict[str, str] | None = None,
    lease_expires_ms: int = 0,
) -> Connection:
    factory = CONNECTORS.get(provider)
    if factory is None:
        raise UnreachableSandbox(f"no client connection for provider {provider!r}")
    return factory(handle, (credentials or {}).get(provider), lease_expires_ms)
