"""A pool's `run:` program in an E2B sandbox: the supervisor (`providers/supervisor.py`,
standard library only) is uploaded into the sandbox with its settings and the pool's
`run.files`, started in the background through envd, and asked for its news with a command
that prints what its journal holds after the daemon's cursor.

Everything that comes back is the sandbox's word: its code runs as root in the VM and can
rewrite the supervisor, its journal, python3 or envd itself. So the output of every command
is bounded as it streams in, and the news is validated here entry by entry: only the four
`agent.*` event types with their own fields (the pool and sandbox are the record's, never
the news'), lines of bounded length, a bounded number of each per read. A forged entry can
only say something about this sandbox's own program, which its code could do anyway.
"""

import asyncio
import json
from pathlib import Path
from typing import Any, Literal

from e2b import AsyncSandbox
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sandboxd.providers import supervisor as supervisor_module
from sandboxd.spec import RunSpec

DIR = "/tmp/.sandboxd"  # E2B's default user can write there; a reset wipes it too
PYTHON = "python3 -I -S"  # the template's python3, isolated: no site, no user paths
START = f"{PYTHON} {DIR}/supervisor.py run {DIR}"
STOP = f"{PYTHON} {DIR}/supervisor.py stop {DIR}"
READ_BYTES = 256 * 1024  # news per read, as the supervisor counts it
OUTPUT_BYTES = 2 * READ_BYTES  # what the daemon takes from any command it runs in there
# Per read: what an honest supervisor gives at most (it stops there and says so with its
# `seq`); more is forged, and dropped.
MAX_EVENTS = supervisor_module.READ_EVENTS
MAX_LINES = supervisor_module.READ_ENTRIES
MAX_SEQ = 2**62
START_TIMEOUT_S = 30.0

_SUPERVISOR = Path(supervisor_module.__file__).read_bytes()


class OutputTooLarge(RuntimeError):
    """A command in the sandbox wrote more than the daemon takes."""


class ProgramError(RuntimeError):
    """The program could not be started. `retryable`: False when the supervisor ended at
    once (no python3 in the template: another sandbox of it would fail the same way)."""

    def __init__(self, message: str, *, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


class AgentEvent(BaseModel):
    """One of the supervisor's events, as local sandboxes' agent reports them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: int = Field(ge=0, le=MAX_SEQ)
    type: Literal["agent.started", "agent.exited", "agent.restarting", "agent.failed"]
    pid: int | None = Field(default=None, ge=0, le=2**32)
    restarts: int | None = Field(default=None, ge=0, le=10**9)
    exit_code: int | None = Field(default=None, ge=-(2**31), le=2**31)
    signal: int | None = Field(default=None, ge=0, le=128)
    ran_s: float | None = Field(default=None, ge=0, le=1e9)
    delay_s: float | None = Field(default=None, ge=0, le=1e6)
    reason: str | None = Field(default=None, max_length=500)


class OutputLine(BaseModel):
    model_config = ConfigDict(frozen=True)

    seq: int = Field(ge=0, le=MAX_SEQ)
    time: float = Field(ge=0, le=1e11)
    text: str = Field(max_length=4096)


class Status(BaseModel):
    """The top of the supervisor's answer; its entries are checked one by one."""

    state: Literal["starting", "running", "backoff", "exited", "failed", "stopped"]
    reason: str = Field(default="", max_length=500)
    pid: int | None = Field(default=None, ge=0, le=2**32)
    restarts: int = Field(default=0, ge=0, le=10**9)
    seq: int = Field(ge=0, le=MAX_SEQ)
    events: list[Any] = Field(default_factory=list)
    lines: list[Any] = Field(default_factory=list)


def uploads(run: RunSpec, *, after: int = 0) -> list[dict[str, Any]]:
    """What goes into the sandbox before the program starts (e2b's `WriteEntry`s): the
    supervisor, its settings (numbering past `after`), and the pool's files (relative:
    below the user's home)."""
    settings = {**run.model_dump(exclude={"files"}), "seq_after": after}
    return [
        {"path": f"{DIR}/supervisor.py", "data": _SUPERVISOR},
        {"path": f"{DIR}/run.json", "data": json.dumps(settings).encode()},
        *({"path": path, "data": text.encode()} for path, text in run.files.items()),
    ]


def read_command(since: int) -> str:
    return f"{PYTHON} {DIR}/supervisor.py read {DIR} {int(since)} {READ_BYTES}"


def news(stdout: str, since: int) -> dict[str, Any]:
    """The supervisor's answer, validated: what `Probe.program` carries (the shape local
    sandboxes' agent gives). Entries numbered at or before `since`, or malformed, are
    dropped; at most MAX_EVENTS events and MAX_LINES lines are kept. Raises ValueError when
    the answer as a whole is not one."""
    try:
        status = Status.model_validate_json(stdout)
    except ValidationError as exc:
        raise ValueError(f"not the supervisor's answer ({exc.error_count()} errors)") from None
    events: list[dict[str, Any]] = []
    for raw in status.events[:MAX_EVENTS]:
        try:
            event = AgentEvent.model_validate(raw)
        except ValidationError:
            continue
        if event.seq > since:
            events.append(event.model_dump(exclude_unset=True))
    lines: list[list[Any]] = []
    for raw in status.lines[:MAX_LINES]:
        if not (isinstance(raw, list) and len(raw) == 3):
            continue
        try:
            line = OutputLine(seq=raw[0], time=raw[1], text=raw[2])
        except ValidationError:
            continue
        if line.seq > since:
            lines.append([line.seq, line.time, line.text])
    newest = max([since, status.seq, *(e["seq"] for e in events), *(x[0] for x in lines)])
    return {
        "state": status.state,
        "reason": status.reason,
        "pid": status.pid,
        "restarts": status.restarts,
        "seq": newest,
        "events": events,
        "lines": lines,
    }


async def run_bounded(sandbox: AsyncSandbox, command: str, *, timeout: float) -> str:
    """Run `command` through envd and return its stdout; at most OUTPUT_BYTES of output are
    taken (then the command is killed and OutputTooLarge raised), and it ends by `timeout`.
    A non-zero exit raises the SDK's CommandExitException."""
    taken: list[str] = []
    size = 0

    def collect(text: str, keep: bool = True) -> None:
        nonlocal size
        size += len(text)
        if size > OUTPUT_BYTES:
            raise OutputTooLarge(f"the command wrote more than {OUTPUT_BYTES} bytes")
        if keep:
            taken.append(text)

    handle = await sandbox.commands.run(
        command,
        background=True,
        timeout=timeout,  # envd ends the command then
        request_timeout=timeout,
        retain_output=False,
        on_stdout=collect,
        on_stderr=lambda text: collect(text, keep=False),
    )
    try:
        async with asyncio.timeout(timeout + 1.0):
            await handle.wait()
    finally:
        if handle.exit_code is None:
            await _end(handle)
    return "".join(taken)


async def start(sandbox: AsyncSandbox, run: RunSpec, *, after: int = 0) -> None:
    """Upload the supervisor and the pool's files, start the supervisor in the background
    (no timeout: envd would end it) and wait for its READY line. `after`: the last number
    the daemon may have seen of a predecessor (a reset), which it numbers past. Raises
    ProgramError."""
    await sandbox.files.write_files(uploads(run, after=after))  # type: ignore[arg-type]
    ready = asyncio.Event()
    said: list[str] = []

    def heard(text: str) -> None:
        if len(said) < 20:  # enough to say why it failed, and bounded
            said.append(text[:200])
        if supervisor_module.READY in text or supervisor_module.READY in "".join(said):
            ready.set()

    handle = await sandbox.commands.run(
        START,
        background=True,
        timeout=0,  # the supervisor runs as long as the sandbox
        retain_output=False,
        on_stdout=heard,
        on_stderr=lambda text: said.append(text[:200]) if len(said) < 20 else None,
    )
    ended = asyncio.ensure_future(handle.wait())
    waiting = asyncio.ensure_future(ready.wait())
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            await asyncio.wait({ended, waiting}, return_when=asyncio.FIRST_COMPLETED)
    except TimeoutError:
        raise ProgramError(f"the supervisor did not start within {START_TIMEOUT_S:g}s") from None
    finally:
        waiting.cancel()
        if not ended.done():
            await handle.disconnect()  # it keeps running: envd holds it, not this stream
        ended.cancel()
        await asyncio.gather(ended, waiting, return_exceptions=True)
    if not ready.is_set():
        told = "".join(said).strip()[-300:]
        raise ProgramError(
            f"the supervisor ended at once (is python3 in the template?): {told}",
            retryable=False,
        )


async def stop(sandbox: AsyncSandbox) -> int:
    """Kill the supervisor and its program (a reset kills what envd lists next, but not the
    program, in a session of its own); the journal's last number (0: unknown)."""
    said = (await run_bounded(sandbox, STOP, timeout=10.0)).strip()
    return int(said) if said.isdigit() and int(said) <= MAX_SEQ else 0


async def _end(handle: Any) -> None:
    try:
        await handle.kill()
    except Exception:  # gone already, or the sandbox with it: nothing left to end
        pass
    await handle.disconnect()
