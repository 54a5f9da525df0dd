"""Inside a sandbox: keep the pool's `run:` program running, as systemd or supervisord would.

Standard library only: it runs inside the sandbox, where the daemon's virtualenv is not
visible — loaded by the local agent (agent.py), or on its own in an E2B sandbox (`main`
below: started in the background through envd, it appends its news to a journal file that
the daemon reads back with `read`, from its cursor). Restarts follow the policy
(on-failure, always, never) with a growing, capped, jittered delay that starts over after
a stable run; too many restarts within the window and it gives up (state `failed`), and
the daemon replaces the sandbox.
Every lifecycle event and output line gets a sequence number, so the daemon fetches
exactly what it has not seen yet (`since`).
"""

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections import deque

MAX_LINES = 1000  # output lines kept (the daemon copies them to Redis as it polls)
MAX_EVENTS = 200
MAX_LINE_CHARS = 4096


class Supervisor:
    def __init__(self, run: dict, env: dict, cwd: str, owned, sink=None, preexec=None):
        self.owned = owned  # the agent's Children: pids its orphan reaper leaves to asyncio
        self.sink = sink  # called with every event (a dict) and line (a list) as it comes
        self.preexec = preexec  # run in the program's process before exec
        self.run = run
        self.env = env
        self.cwd = cwd
        # Starts at the clock (ms), or past `seq_after` (its predecessor's last number, from
        # a reset): a supervisor started anew numbers past its predecessor, so the daemon's
        # cursor never hides its news.
        after = run.get("seq_after")
        self.seq = max(int(time.time() * 1000), after if isinstance(after, int) else 0)
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
        if self.sink is not None:
            self.sink(self.events[-1])

    def _line(self, text: str) -> None:
        self.seq += 1
        self.lines.append([self.seq, time.time(), text[:MAX_LINE_CHARS]])
        if self.sink is not None:
            self.sink(self.lines[-1])

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
                    preexec_fn=self.preexec,
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


# -- on its own, in an E2B sandbox ---------------------------------------------------------
#
#   python3 -I -S supervisor.py run DIR           keeps DIR/run.json's program running; prints
#                                                 READY once it has started (or could not)
#   python3 -I -S supervisor.py read DIR SINCE [MAX_BYTES]
#                                                 one JSON object: status() after SINCE, from
#                                                 the journal, at most MAX_BYTES of news
#   python3 -I -S supervisor.py stop DIR          kills the supervisor and its program;
#                                                 prints the journal's last number
#
# DIR holds run.json (the RunSpec, and `seq_after`: number past it), status.json (state,
# program pid, the supervisor's pid) and the journal: one JSON value a line, an event (an
# object) or an output line (a list [seq, time, text]), numbered without gaps. It is
# rotated once past JOURNAL_BYTES, so up to twice that is kept while nobody reads it.

JOURNAL, ROTATED, STATUS, RUN = "journal", "journal.1", "status.json", "run.json"
JOURNAL_BYTES = 1 << 20
READ_BYTES = 256 * 1024
READY = "sandboxd-supervisor-ready"  # said once the program has started (or could not)
READ_ENTRIES, READ_EVENTS = 1000, 100  # per read, at most (the daemon takes no more)
FINAL = ("exited", "failed", "stopped")
STATE_AFTER = {  # the state written with each event (the last one at the end of the loop)
    "agent.started": "running",
    "agent.exited": "backoff",  # not final yet: killed now, it must read as gone
    "agent.restarting": "backoff",
    "agent.failed": "failed",
}


class _Unowned:
    """Outside the agent nothing reaps orphans behind asyncio's back."""

    @contextlib.contextmanager
    def starting(self):
        yield

    def add(self, pid) -> None:
        pass

    def discard(self, pid) -> None:
        pass


class Journal:
    def __init__(self, directory: str):
        self.path = os.path.join(directory, JOURNAL)
        self.rotated = os.path.join(directory, ROTATED)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def last_seq(self) -> int:
        """The highest number a predecessor wrote (a supervisor started again numbers on)."""
        last = 0
        for entry in _entries([self.rotated, self.path]):
            last = max(last, _seq(entry))
        return last

    def append(self, entry) -> None:
        data = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        if os.fstat(self.fd).st_size + len(data) > JOURNAL_BYTES:
            os.replace(self.path, self.rotated)
            os.close(self.fd)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(self.fd, data)


def _seq(entry) -> int:
    seq = entry.get("seq") if isinstance(entry, dict) else entry[0]
    return seq if isinstance(seq, int) else 0


def _quick_seq(raw: bytes) -> int | None:
    """The number of an entry as this supervisor writes it (`[N,` or `{"seq":N,`), without
    parsing the rest; None for anything else."""
    head = raw[:40].split(b",", 1)[0]
    head = (head[7:] if head.startswith(b'{"seq":') else head[1:]).strip()
    return int(head) if head.isdigit() else None


def _entries(paths: list, after: int = -1):
    """Complete lines of the files, in order, numbered after `after` (skipped unparsed); a
    line being written (no newline yet) and anything that is not a journal entry are
    skipped."""
    files: list = []
    for path in reversed(paths):  # the newest first: a rotation in between reads one twice
        try:
            files.append(open(path, "rb"))
        except FileNotFoundError:
            files.append(None)
    for handle in reversed(files):
        if handle is None:
            continue
        with handle:
            for raw in handle:
                if not raw.endswith(b"\n"):
                    break
                quick = _quick_seq(raw)
                if quick is not None and quick <= after:
                    continue
                try:
                    entry = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(entry, dict) or (isinstance(entry, list) and entry):
                    yield entry


def _load(path: str):
    with open(path) as handle:
        return json.load(handle)


def _write_status(directory: str, status: dict) -> None:
    path = os.path.join(directory, STATUS)
    with open(path + ".new", "w") as handle:
        json.dump(status, handle)
    os.replace(path + ".new", path)


def _read_status(directory: str) -> dict:
    try:
        with open(os.path.join(directory, STATUS)) as handle:
            status = json.load(handle)
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _die_with_parent():
    """The program dies with its supervisor (envd kills only the pid it started)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return None
    return lambda: libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _say_ready(directory: str) -> None:
    """The program has started (or could not): the daemon's create waits for this line.
    Nobody reads envd's copy of this process's output after it."""
    print(READY, flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    errors = os.open(os.path.join(directory, "supervisor.err"), os.O_WRONLY | os.O_CREAT, 0o600)
    os.dup2(devnull, 1)
    os.dup2(errors, 2)


async def _supervise(directory: str) -> None:
    run = _load(os.path.join(directory, RUN))
    journal = Journal(directory)
    status = {"state": "starting", "reason": "", "pid": None, "restarts": 0}
    status["supervisor"] = os.getpid()

    def sink(entry) -> None:
        journal.append(entry)
        if isinstance(entry, dict):
            status.update(state=STATE_AFTER.get(entry["type"], status["state"]))
            status.update(pid=sup.pid, restarts=sup.restarts, reason=entry.get("reason", ""))
            _write_status(directory, status)
            if not said:
                _say_ready(directory)
                said.append(True)

    said: list = []
    env = dict(os.environ)
    sup = Supervisor(run, env, env.get("HOME") or os.getcwd(), _Unowned(), sink, _die_with_parent())
    sup.seq = max(sup.seq, journal.last_seq())
    _write_status(directory, status)
    task = asyncio.get_running_loop().create_task(sup.loop())
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stopping.set)
    stop = asyncio.get_running_loop().create_task(stopping.wait())
    await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        await sup.stop(task)
    stop.cancel()
    status.update(state=sup.state, pid=sup.pid, restarts=sup.restarts, reason=sup.reason)
    _write_status(directory, status)


def read(directory: str, since: int, budget: int = READ_BYTES) -> dict:
    """What `status(since)` says inside the agent, from the journal: news numbered after
    `since`, at most `budget` bytes, READ_ENTRIES entries and READ_EVENTS events of it
    (`seq` is then the last one given)."""
    status = _read_status(directory)
    if status.get("state") not in FINAL and "supervisor" in status:
        if not _alive(status["supervisor"]):
            _bury(directory, status)
    state = status.get("state", "starting")
    reason = status.get("reason", "")
    out = {
        "state": state,
        "reason": reason,
        "pid": status.get("pid"),
        "restarts": status.get("restarts", 0),
        "seq": since,
        "events": [],
        "lines": [],
    }
    used = 0
    paths = [os.path.join(directory, ROTATED), os.path.join(directory, JOURNAL)]
    for entry in _entries(paths, since):
        seq = _seq(entry)
        if seq <= out["seq"]:
            continue
        used += len(json.dumps(entry)) + 2
        kind = "events" if isinstance(entry, dict) else "lines"
        full = len(out["events"]) + len(out["lines"]) >= READ_ENTRIES
        if used > budget or full or (kind == "events" and len(out["events"]) >= READ_EVENTS):
            break
        out[kind].append(entry)
        out["seq"] = seq
    return out


def _bury(directory: str, status: dict) -> None:
    """The supervisor died without a word (killed): say `agent.failed` for it, once (the
    status is final from then on)."""
    journal = Journal(directory)
    reason = "the supervisor is gone (killed?)"
    restarts = status.get("restarts", 0)
    journal.append(
        {
            "seq": journal.last_seq() + 1,
            "type": "agent.failed",
            "reason": reason,
            "restarts": restarts,
        }
    )
    status.update(state="failed", reason=reason)
    _write_status(directory, status)


def stop(directory: str) -> int:
    """Kill the supervisor, then its program's process group; returns the journal's last
    number, which a supervisor started after a reset (that wipes the journal) numbers past."""
    status = _read_status(directory)
    for pid, kill in ((status.get("supervisor"), os.kill), (status.get("pid"), os.killpg)):
        if isinstance(pid, int) and pid > 1:
            with contextlib.suppress(OSError):
                kill(pid, signal.SIGKILL)
    paths = [os.path.join(directory, ROTATED), os.path.join(directory, JOURNAL)]
    return max([0, *(_seq(entry) for entry in _entries(paths))])


def main(argv: list) -> int:
    if len(argv) >= 2 and argv[0] == "run":
        asyncio.run(_supervise(argv[1]))
    elif len(argv) in (3, 4) and argv[0] == "read":
        budget = int(argv[3]) if len(argv) == 4 else READ_BYTES
        print(json.dumps(read(argv[1], int(argv[2]), budget)))
    elif len(argv) == 2 and argv[0] == "stop":
        print(stop(argv[1]))
    else:
        print(
            "usage: supervisor.py run DIR | read DIR SINCE [MAX_BYTES] | stop DIR", file=sys.stderr
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
