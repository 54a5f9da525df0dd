"""How a client reaches a claimed sandbox, per provider.

A provider's record `handle` (and for e2b its `secrets`, which only the claim's holder gets)
carries what is needed; `connect` turns it into an object with `exec`, `write` and `read`
(the AgentClient's interface). A local sandbox is reached through its agent's socket; an
e2b sandbox through its envd, with the envd access token the claim returned: no provider
API key is needed or used. Endpoints are the client's own, never a record's.
"""

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sandboxd.providers.base import ExecResult, OutputCallback
from sandboxd.providers.local.agentclient import AgentClient


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


def _local(target: "Target") -> Connection:
    # The agent's Unix socket: reachable on the daemon's host by its user (or root).
    return AgentClient(trusted_socket(target.handle.get("socket"), target.sandbox_id))


def trusted_socket(path: Any, sandbox_id: str) -> str:
    """A local sandbox's agent socket, checked before a client sends it a command (with the
    caller's env and secrets): `<registry>/<sandbox_id>/agent.sock` — the directory named by
    the record's own id, so a record cannot send a client to another sandbox's agent — a
    socket, no symlink on the way, owned with its directory and the registry by root or
    this user and writable by nobody else. Anything else gets an error, not a connection."""
    if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
        raise UnreachableSandbox("the sandbox record names no agent socket")
    box = os.path.dirname(path)
    if (
        os.path.basename(path) != "agent.sock"
        or os.path.basename(box) != sandbox_id
        or os.path.realpath(path) != os.path.normpath(path)
    ):
        raise UnreachableSandbox(f"refusing agent socket {path!r}: not {sandbox_id}'s")
    trusted = {0, os.geteuid()}
    try:
        infos = [os.lstat(path), os.lstat(box), os.lstat(os.path.dirname(box))]
    except OSError as exc:
        raise UnreachableSandbox(f"agent socket {path!r}: {exc.strerror}") from None
    writable_by_others = stat.S_IWGRP | stat.S_IWOTH
    if not stat.S_ISSOCK(infos[0].st_mode) or any(
        info.st_uid not in trusted or (info.st_mode & writable_by_others and i > 0)
        for i, info in enumerate(infos)
    ):
        raise UnreachableSandbox(f"refusing agent socket {path!r}: not owned by sandboxd")
    return path


def _e2b(target: "Target") -> Connection:
    try:
        from sandboxd.providers.e2b.connection import (
            ACCESS_TOKEN,
            E2BConnection,
            E2BUnreachable,
        )
    except ImportError as exc:
        raise UnreachableSandbox(
            f"an e2b sandbox needs the e2b SDK ({exc}): pip install 'sandboxd[e2b]'"
        ) from None
    token = target.secrets.get(ACCESS_TOKEN)
    try:
        connection = E2BConnection(target.handle, access_token=token, endpoints=target.endpoints)
    except E2BUnreachable as exc:
        raise UnreachableSandbox(str(exc)) from None
    return Translated(connection, E2BUnreachable)


class Translated:
    """A connection whose provider-specific "cannot reach it" error is `UnreachableSandbox`,
    so callers (the CLI) catch one error for every provider."""

    def __init__(self, inner: Connection, unreachable: type[BaseException]):
        self._inner = inner
        self._unreachable = unreachable

    def __getattr__(self, name: str) -> Any:  # e.g. E2BConnection.connect_ms
        return getattr(self._inner, name)

    async def _call(self, call: Any) -> Any:
        try:
            return await call
        except self._unreachable as exc:
            raise UnreachableSandbox(str(exc)) from None

    async def exec(self, command: list[str] | str, **kwargs: Any) -> ExecResult:
        result: ExecResult = await self._call(self._inner.exec(command, **kwargs))
        return result

    async def write(self, path: str, data: bytes, mode: int | None = None) -> None:
        await self._call(self._inner.write(path, data, mode))

    async def read(self, path: str) -> bytes:
        data: bytes = await self._call(self._inner.read(path))
        return data


def check_reachable(provider: str) -> None:
    """Raise UnreachableSandbox if this client cannot reach any sandbox of `provider` (an
    unknown provider, the e2b SDK not installed): asked before a claim, not after it."""
    if provider not in CONNECTORS:
        raise UnreachableSandbox(f"no client connection for provider {provider!r}")
    if provider == "e2b":
        try:
            import sandboxd.providers.e2b.connection  # noqa: F401
        except ImportError as exc:
            raise UnreachableSandbox(
                f"an e2b sandbox needs the e2b SDK ({exc}): pip install 'sandboxd[e2b]'"
            ) from None


@dataclass(frozen=True)
class Target:
    """What a client knows of a claimed sandbox: the record's id, handle and secrets (from
    Redis, so checked before use) and the client's own credential and endpoints for its
    provider (no provider needs a credential: e2b's claimants use the claim's envd token)."""

    sandbox_id: str
    handle: dict[str, Any]
    credential: str | None = field(default=None, repr=False)
    endpoints: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict, repr=False)


CONNECTORS: dict[str, Callable[[Target], Connection]] = {
    "local": _local,
    "e2b": _e2b,
}


def connect(
    provider: str,
    handle: dict[str, Any],
    *,
    sandbox_id: str,
    credentials: dict[str, str] | None = None,
    endpoints: dict[str, dict[str, str]] | None = None,
    secrets: dict[str, str] | None = None,
) -> Connection:
    """A connection to a claimed sandbox. `secrets`: the record's, from the claim (e2b: the
    envd access token). Endpoints (e2b: domain, sandbox_url) are the client's own, never a
    record's: a forged record cannot send a client's commands (or a token) anywhere but to
    the sandbox it names."""
    factory = CONNECTORS.get(provider)
    if factory is None:
        raise UnreachableSandbox(f"no client connection for provider {provider!r}")
    return factory(
        Target(
            sandbox_id=sandbox_id,
            handle=handle,
            credential=(credentials or {}).get(provider),
            endpoints=dict((endpoints or {}).get(provider) or {}),
            secrets=dict(secrets or {}),
        )
    )
