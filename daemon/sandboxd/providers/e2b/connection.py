"""How a claimant uses a claimed E2B sandbox: the e2b SDK straight to the sandbox's envd (the
daemon is not in the path), with what the claim handed over and nothing else.

A claimant has no E2B API key and needs none: the record's handle names the sandbox (its E2B
id, envd domain and version) and its `secrets` hold envd's access token for that one
sandbox, which the claim script returns only to the holder of the claim. With it a claimant
runs commands and moves files in that sandbox; it cannot list, create, pause, extend or
kill any sandbox of the account. The daemon resumes a claimed sandbox of an `idle: pause`
pool and keeps its timeout in line with the lease; until it has resumed it, the first call
waits (RESUME_WAIT_S).

The token is a secret: it goes only into the `X-Access-Token` header of requests to envd
and is cut out of every error this module raises.
"""

import asyncio
import re
import shlex
import time
import uuid
from typing import Any

import httpx
from e2b import AsyncSandbox, CommandExitException, ConnectionConfig
from e2b.exceptions import (
    AuthenticationException,
    SandboxException,
    SandboxNotRunningException,
    SandboxUnreachableException,
    TimeoutException,
)
from e2b.sandbox_domains import is_supported_sandbox_domain
from packaging.version import InvalidVersion, Version

from sandboxd.providers.base import ExecResult, OutputCallback
from sandboxd.providers.e2b.errors import describe

TIMED_OUT_EXIT = 124  # what timeout(1) exits with
ENDPOINTS = ("api_url", "sandbox_url", "domain")  # non-secret settings of a client's own
SECRETS = "secrets"  # the handle's entry the store keeps apart (store/records.py SECRETS)
ACCESS_TOKEN = "envd_access_token"  # in `secrets`: envd's access token of this sandbox
DEFAULT_ENVD_VERSION = "0.4.0"  # a handle without one (made before handles said it)
RESUME_WAIT_S = 60.0  # how long a claimant waits for the daemon to resume a paused sandbox
E2B_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,99}$")
TOKEN = re.compile(r"^[\x21-\x7e]{1,512}$")  # printable, no spaces: it goes in a header


class E2BUnreachable(ConnectionError):
    """The sandbox cannot be reached (gone, paused, wrong token, network): one line, no
    token in it. `client.connections` turns it into `UnreachableSandbox`."""


class E2BConnection:
    def __init__(
        self,
        handle: dict[str, Any],
        *,
        access_token: str | None,
        endpoints: dict[str, str] | None = None,
        request_timeout_s: float | None = None,
    ):
        """`handle` and `access_token` come from the claim's record (Redis), so they are
        checked before use. `endpoints`: the client's own `sandbox_url` and `domain` (else
        the SDK's defaults and E2B_* variables); a record's domain is used only when it is
        one of E2B's own, so a forged record cannot send a command or the token elsewhere."""
        e2b_id = handle.get("e2b_id")
        if not isinstance(e2b_id, str) or not E2B_ID.match(e2b_id):
            raise E2BUnreachable("the sandbox record names no valid E2B sandbox id")
        if access_token is not None and not (
            isinstance(access_token, str) and TOKEN.match(access_token)
        ):
            raise E2BUnreachable(f"sandbox {e2b_id}: the record's envd access token is invalid")
        self.e2b_id = e2b_id
        self._handle = handle
        self._token = access_token
        self._endpoints = {k: v for k, v in (endpoints or {}).items() if k in ENDPOINTS and v}
        self._request_timeout_s = request_timeout_s
        self._sandbox: AsyncSandbox | None = None
        self.connect_ms: float | None = None  # what reaching it cost (waiting for a resume)

    def _domain(self) -> str | None:
        own = self._endpoints.get("domain")
        recorded = self._handle.get("domain")
        if own:
            return own
        if isinstance(recorded, str) and is_supported_sandbox_domain(recorded):
            return recorded
        return None  # the SDK's default (E2B_DOMAIN, else e2b.app)

    def _envd_version(self) -> Version:
        try:
            return Version(str(self._handle.get("envd_version") or DEFAULT_ENVD_VERSION))
        except InvalidVersion:
            return Version(DEFAULT_ENVD_VERSION)

    def _build(self) -> AsyncSandbox:
        """The SDK's sandbox object, built from what the claim gave (the SDK's `connect`
        would ask E2B's API, which needs the account's key)."""
        headers = {
            "E2b-Sandbox-Id": self.e2b_id,
            "E2b-Sandbox-Port": str(ConnectionConfig.envd_port),
        }
        if self._token:
            headers["X-Access-Token"] = self._token
        config = ConnectionConfig(
            domain=self._domain(),
            sandbox_url=self._endpoints.get("sandbox_url"),
            request_timeout=self._request_timeout_s,
            extra_sandbox_headers=headers,
        )
        return AsyncSandbox(
            sandbox_id=self.e2b_id,
            sandbox_domain=self._domain(),
            envd_version=self._envd_version(),
            envd_access_token=self._token,
            traffic_access_token=None,
            connection_config=config,
        )

    async def sandbox(self) -> AsyncSandbox:
        if self._sandbox is None:
            started = time.perf_counter()
            sandbox = self._build()
            if self._handle.get("paused"):
                await self._until_resumed(sandbox)
            self._sandbox = sandbox
            self.connect_ms = round((time.perf_counter() - started) * 1000, 1)
        return self._sandbox

    async def _until_resumed(self, sandbox: AsyncSandbox) -> None:
        """A paused pool's sandbox runs once the daemon has resumed it for the claim."""
        deadline = time.monotonic() + RESUME_WAIT_S
        pause = 0.005
        while not await self._guard(sandbox.is_running()):
            if time.monotonic() > deadline:
                raise E2BUnreachable(
                    f"sandbox {self.e2b_id} is still paused after {RESUME_WAIT_S:g}s (the "
                    "daemon resumes a claimed sandbox: is it running?)"
                )
            await asyncio.sleep(pause)  # polling envd with backoff: no event to wait on
            pause = min(0.25, pause * 1.5)

    async def _guard(self, call: Any, *, command: bool = False) -> Any:
        """Await an SDK call; what means the sandbox cannot be reached becomes one line. For
        a `command`, its exit and its own timeout are results, raised as the SDK's."""
        try:
            return await call
        except (SandboxNotRunningException, SandboxUnreachableException) as exc:
            raise self._unreachable(exc) from None
        except (CommandExitException, TimeoutException) as exc:
            if command:
                raise
            raise self._unreachable(exc) from None
        except (SandboxException, AuthenticationException, httpx.HTTPError, OSError) as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: BaseException) -> E2BUnreachable:
        why = describe(exc, self._token)
        if not self._token:
            why += (
                " (its record holds no envd access token: a sandbox made by a sandboxd from "
                "before claimants got one; release it and claim another)"
            )
        return E2BUnreachable(f"sandbox {self.e2b_id}: {why}")

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
    ) -> ExecResult:
        sandbox = await self.sandbox()
        shell = command if isinstance(command, str) else shlex.join(command)
        if stdin is not None:  # staged as a file: one upload instead of a stdin stream
            staged = f"/tmp/.sandboxd-stdin-{uuid.uuid4().hex}"
            await self._guard(sandbox.files.write(staged, stdin))
            shell = f"({shell}) < {staged}; status=$?; rm -f {staged}; exit $status"
        try:
            result = await self._guard(
                sandbox.commands.run(
                    shell,
                    envs=env,
                    cwd=cwd,
                    timeout=timeout or 0,
                    on_stdout=_bytes(on_stdout),
                    on_stderr=_bytes(on_stderr),
                ),
                command=True,
            )
        except CommandExitException as exc:
            return ExecResult(exc.exit_code, exc.stdout.encode(), exc.stderr.encode())
        except TimeoutException:
            return ExecResult(TIMED_OUT_EXIT, b"", b"", timed_out=True)
        return ExecResult(result.exit_code, result.stdout.encode(), result.stderr.encode())

    async def write(self, path: str, data: bytes, mode: int | None = None) -> None:
        sandbox = await self.sandbox()
        await self._guard(sandbox.files.write(path, data))
        if mode is not None:
            await self._guard(sandbox.commands.run(f"chmod {mode:o} {shlex.quote(path)}"))

    async def read(self, path: str) -> bytes:
        sandbox = await self.sandbox()
        return bytes(await self._guard(sandbox.files.read(path, format="bytes")))


def _bytes(callback: OutputCallback | None):
    if callback is None:
        return None
    return lambda text: callback(text.encode())
