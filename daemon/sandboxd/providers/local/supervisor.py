"""Inside a sandbox: keep the pool's `run:` program running, as systemd or supervisord would.

Standard library only: it runs next to agent.py inside the sandbox, where the daemon's
virtualenv is not visible. Restarts follow the policy (on-failure, always, never) with a
growing, capped, jittered delay that starts over after a stable run; too many restarts
within the window and it gives up (state `failed`), and the daemon replaces the sandbox.
Every lifecycle event and output line gets a sequence number, so the daemon fetches
exactly what it has not seen yet (`since`).
"""

import asyncio
import contextlib
import os
import random
import signal
import time
from collections import deque

MAX_LINES = 1000  # output lines kept (the daemon copies them to Redis as it polls)
MAX_EVENTS = 200
MAX_LINE_CHARS = 4096


class Supervisor:
    def __init__(self, run: dict, env: dict, cwd: str, owned):
        self.owned = owned  # the agent's Children: pids its orphan reaper leaves to asyncio
        self.run = run
        self.env = env
        self.cwd = cwd
        # Starts at the clock (ms): a supervisor started anew (after a reset) numbers past
        # its predecessor, so the daemon's cursor never hides its news.
        self.seq = int(time.time() * 1000)
        self.events: deque = deque(maxlen=MAX_EVENTS)
        self.lines: deque = deque(maxlen=MAX_LINES)
        self.state = "starting"
        self.reason = ""
        self.pid: int | None = None
        self.restarts = 0
        self._recent: deque = deque()  # monotonic times of restarts within window_s
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = False

    def _emit(self, type_: str, **data) -> None:
        self.seq += 1
        self.events.append({"seq": self.seq, "type": type_, **data})

    def _line(self, text: str) -> None:
        self.seq += 1
        self.lines.append([self.seq, time.time(), text[:MAX_LINE_CHARS]])

    def status(self, since: int) -> dict:
        return {
            "state": self.state,
            "reason": self.reason,
            "pid": self.pid,
            "restarts": self.restarts,
            "seq": self.seq,
            "events": [e for e in self.events if e["seq"] > since],
            "lines": [line for line in self.lines if line[0] > since],
        }

    async def loop(self) -> None:
        delay = self.run["backoff_s"]
        while True:
            started = time.monotonic()
            code = await self._run_once()
            ran = time.monotonic() - started
            self._emit(
                "agent.exited",
                exit_code=code if code >= 0 else None,
                signal=-code if code < 0 else None,
                ran_s=round(ran, 3),
            )
            if self._stopping or not self._should_restart(code):
                self.state = "stopped" if self._stopping else "exited"
                return
            if ran >= self.run["stable_s"]:
                delay = self.run["backoff_s"]
            if self._exhausted():
                self.state = "failed"
                self.reason = (
                    f"exited with {code} after {self.restarts} restarts, "
                    f"{self.run['max_restarts']} allowed within {self.run['window_s']}s"
                )
                self._emit("agent.failed", reason=self.reason, restarts=self.restarts)
                return
            wait = round(delay * random.uniform(0.5, 1.0), 3)
            self._emit("agent.restarting", delay_s=wait, restarts=self.restarts + 1, exit_code=code)
            self.state = "backoff"
            await asyncio.sleep(wait)
            delay = min(delay * 2, self.run["max_backoff_s"])
            self.restarts += 1
            self._recent.append(time.monotonic())

    def _should_restart(self, code: int) -> bool:
        policy = self.run["restart"]
        return policy == "always" or (policy == "on-failure" and code != 0)

    def _exhausted(self) -> bool:
        now = time.monotonic()
        while self._recent and now - self._recent[0] > self.run["window_s"]:
            self._recent.popleft()
        return len(self._recent) >= self.run["max_restarts"]

    async def _run_once(self) -> int:
        try:
            with self.owned.starting():
                proc = self._proc = await asyncio.create_subprocess_exec(
                    "/bin/sh",
                    "-c",
                    self.run["command"],
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                    env=self.env,
                    cwd=self.cwd,
                    start_new_session=True,
                )
                self.owned.add(proc.pid)
        except OSError as exc:
            self._line(f"cannot start: {exc}")
            return 127
        self.pid = proc.pid
        self.state = "running"
        self._emit("agent.started", pid=self.pid, restarts=self.restarts)
        assert proc.stdout is not None  # stdout=PIPE
        try:
            while raw := await proc.stdout.readline():
                self._line(raw.decode(errors="replace").rstrip("\n"))
            return await proc.wait()
        finally:
            if proc.returncode is None:  # cancelled: take the program down with us
                self._kill()
                await proc.wait()
            self.owned.discard(self.pid)

    def _kill(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)

    async def stop(self, task: "asyncio.Task | None") -> None:
        """Stop the program for good (no restart): for a reset or a new `supervise`."""
        self._stopping = True
        self._kill()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.state = "stopped"
