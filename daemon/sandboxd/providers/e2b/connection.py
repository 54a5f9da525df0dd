"""How a client uses a claimed E2B sandbox: the e2b SDK, straight to E2B (the daemon is not
in the path). Connecting resumes a paused sandbox and sets its timeout to the lease left.
"""

import shlex
import time
import uuid
from typing import Any

from e2b import AsyncSandbox, CommandExitException
from e2b.exceptions import (
    SandboxNotRunningException,
    SandboxUnreachableException,
    TimeoutException,
)

from sandboxd.providers.base import ExecResult, OutputCallback

TIMED_OUT_EXIT = 124  # what timeout(1) exits with
ENDPOINTS = ("api_url", "sandbox_url", "domain")  # non-secret settings a handle carries


class E2BConnection:
    def __init__(
        self,
        handle: dict[str, Any],
        *,
        api_key: str | None,
        lease_expires_ms: int,
        endpoints: dict[str, str] | None = None,
    ):
        """`endpoints`: the client's own E2B endpoints (else the SDK's defaults and E2B_*
        variables); a handle's are never used, since a Redis writer could forge them."""
        self._handle = handle
        self._opts: dict[str, Any] = {
            name: value for name, value in (endpoints or {}).items() if name in ENDPOINTS
        }
        if api_key:
            self._opts["api_key"] = api_key  # else the SDK reads E2B_API_KEY
        self._lease_expires_ms = lease_expires_ms
        self._sandbox: AsyncSandbox | None = None
        self.connect_ms: float | None = None  # what connecting (resuming) cost

    async def sandbox(self) -> AsyncSandbox:
        if self._sandbox is None:
            started = time.perf_counter()
            self._sandbox = await AsyncSandbox.connect(
                self._handle["e2b_id"], timeout=self._timeout(), **self._opts
            )
            self.connect_ms = round((time.perf_counter() - started) * 1000, 1)
        return self._sandbox

    def _timeout(self) -> int:
        if self._lease_expires_ms:
            return max(1, int(self._lease_expires_ms / 1000 - time.time()))
        return int(self._handle.get("timeout_s", 300))

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
        staged = None
        if stdin is not None:  # staged as a file: one upload instead of a stdin stream
            staged = f"/tmp/.sandboxd-stdin-{uuid.uuid4().hex}"
            await sandbox.files.write(staged, stdin)
            shell = f"({shell}) < {staged}; status=$?; rm -f {staged}; exit $status"
        try:
            result = await sandbox.commands.run(
                shell,
                envs=env,
                cwd=cwd,
                timeout=timeout or 0,
                on_stdout=_bytes(on_stdout),
                on_stderr=_bytes(on_stderr),
            )
        except CommandExitException as exc:
            return ExecResult(exc.exit_code, exc.stdout.encode(), exc.stderr.encode())
        except (SandboxNotRunningException, SandboxUnreachableException):
            raise  # the sandbox is gone, not the command slow
        except TimeoutException:
            return ExecResult(TIMED_OUT_EXIT, b"", b"", timed_out=True)
        return ExecResult(result.exit_code, result.stdout.encode(), result.stderr.encode())

    async def write(self, path: str, data: bytes, mode: int | None = None) -> None:
        sandbox = await self.sandbox()
        await sandbox.files.write(path, data)
        if mode is not None:
            await sandbox.commands.run(f"chmod {mode:o} {shlex.quote(path)}")

    async def read(self, path: str) -> bytes:
        sandbox = await self.sandbox()
        return bytes(await sandbox.files.read(path, format="bytes"))


def _bytes(callback: OutputCallback | None):
    if callback is None:
        return None
    return lambda text: callback(text.encode())
