"""Redis chaos (issue 15): a stateful hypothesis test of the real daemon against a real
redis-server that is corrupted at random between claims and releases.

Each example starts its own redis-server (a free port, `--save '' --appendonly no`, so a
restart loses everything) and the real daemon (`python -m sandboxd run`) with one local pool
(`min_ready` 2, `max_total` 6, `reuse: never`, a long lease) and fast loops (reconcile,
heartbeat, janitor and lease checks every 0.3 s). Steps, in an order hypothesis picks:

- `claim` through `sandboxd.client.Client` (the test keeps each claim's token), `release`
  with the token;
- corruption: `delete_key` (the ready list, member set, lease index, pool settings, id set,
  spec, spec in force, event stream, or one sandbox record), `wrong_type` (the same keys
  rewritten as another type: `SET` a hash or a set, `HSET` a list or the spec, ...),
  `garbage_field` (a record field set to text of the wrong type, non-UTF-8 bytes, `nan`,
  `[` nested 1000 deep, nothing, or 70 KB), `bad_spec` (deep JSON, Latin-1, UTF-16, a lower
  revision, NUL in an env value, not JSON);
- `settle`: corruption pauses and the pool must converge (below);
- with data loss only (`test_redis_chaos_with_data_loss`): `flushdb`, and `restart_redis`
  (SIGTERM and a fresh redis-server on the same port: empty).

Invariants after every step: the daemon process is alive and its log has no "Traceback"; a
claim either succeeds or fails with `ClaimError` / `ClaimTimeout`, and a release by a holder
the test vouches for succeeds. Converged (at `settle` and at the end, polled with a
deadline): the ready list holds `min_ready` ids, every record is readable and the live
sandbox processes are exactly the records', the heartbeat's revision is the applied one, and
every claim the test vouches for is still claimed, its process running. The test vouches for
every claim whose sandbox record it never corrupted itself — so every claim held through a
FLUSHDB or a Redis restart must survive it, and at the end its holder execs in it and
releases it with its token (after a data loss the release may say `not_claimed` until the
daemon has written its records back, so it is retried until a deadline). Then the pool is
back at `min_ready` with nothing else running, SIGTERM stops the daemon with exit 0, and
"Redis unavailable" is logged only if Redis was restarted.

Bounded for `make test`: 5 examples of up to 12 steps per test, derandomized, no example
database, no shrinking (every example starts a real daemon; a failure prints all its steps).
Soak run (random, many more steps; a failure prints a `@reproduce_failure` blob):

    SANDBOXD_SOAK=1 .venv/bin/pytest -p no:cacheprovider tests/integration/test_redis_chaos.py

(`SANDBOXD_SOAK_EXAMPLES`, default 40, and `SANDBOXD_SOAK_STEPS`, default 60, size it; the
timeout is then 30 min per test.)
"""

import asyncio
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis

from sandboxd.client import ClaimError, Client, Sandbox
from sandboxd.store.connection import open_redis
from sandboxd.store.localredis import find_redis_server, start, wait_until_answering
from sandboxd.store.records import SandboxRecord, SandboxStore
from tests.support import (
    KEYS,
    DaemonProcess,
    apply,
    eventually,
    free_port,
    sandbox_processes,
    toml_config,
)

# Read at import: the autouse fixture of conftest removes SANDBOXD_* from the environment.
SOAK = os.environ.get("SANDBOXD_SOAK") == "1"
SOAK_EXAMPLES = int(os.environ.get("SANDBOXD_SOAK_EXAMPLES", "40"))
SOAK_STEPS = int(os.environ.get("SANDBOXD_SOAK_STEPS", "60"))

POOL = "p"
MIN_READY = 2
MAX_TOTAL = 6
LEASE_S = 600  # no lease runs out during a run: a claim lost is a claim taken away
MAX_HELD = 3  # claims held at once (plus min_ready stays within max_total)
CLAIM_WAIT_S = 1.0
CONVERGE_S = 15.0
LOOP_S = 0.3

DEEP = "[" * 1000 + "]" * 1000

# Keys the daemon owns or derives, by the name the steps use.
KEY_NAMES = [
    "ready",
    "members",
    "leases",
    "pools",
    "sandboxes",
    "spec",
    "spec_active",
    "events",
    "record",
]
RECORD_FIELDS = [
    "state",
    "spec_revision",
    "lease_expires_ms",
    "claimed_at_ms",
    "uses",
    "handle",
    "health_checks",
    "claimant",
    "created_at",
    "pool",
]
GARBAGE = [
    b"abc",
    b"nan",
    b"\xff\xfe\xc3garbage",
    DEEP.encode(),
    b"",
    b"x" * 70_000,
]
BAD_SPECS = {
    "deep-json": DEEP.encode(),
    "latin-1": b'{"revision": 999, "pools": [{"name": "caf\xe9"}]}',
    "utf-16": '{"revision": 999, "pools": []}'.encode("utf-16"),
    "lower-revision": json.dumps({"revision": 0, "pools": [{"name": POOL}]}).encode(),
    "nul-in-env": json.dumps(
        {"revision": 999, "pools": [{"name": POOL, "env": {"A": "a\0b"}}]}
    ).encode(),
    "not-json": b"pools: [this is not json",
}

if SOAK:
    SETTINGS = settings(
        max_examples=SOAK_EXAMPLES,
        stateful_step_count=SOAK_STEPS,
        database=None,
        deadline=None,
        print_blob=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    TIMEOUT_S = 1800
else:
    SETTINGS = settings(
        max_examples=5,
        stateful_step_count=12,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    TIMEOUT_S = 150


@dataclass
class Held:
    """A claim the test holds: its sandbox, the token, and whether the test vouches for it."""

    sandbox: Sandbox
    pid: int
    tainted: str = ""  # why the test no longer vouches for it (it corrupted its record)
    losses: int = 0  # data losses (FLUSHDB, Redis restarts) it was held through

    @property
    def id(self) -> str:
        return self.sandbox.id


def checked(method):
    """Records each step (with its arguments) and the first failure of an example: a
    failing example is run again by hypothesis to report it, and with a real daemon the
    rerun may go otherwise (hypothesis then reports it as flaky), so the test reports the
    first run's steps and error itself. A failed example's teardown only cleans up (its
    convergence checks would hide the real failure behind a timeout)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if method.__name__ != "daemon_alive_without_traceback":
            shown = ", ".join(f"{k}={_short(v)}" for k, v in kwargs.items() if k != "data")
            self.steps.append(f"{method.__name__}({shown})")
        try:
            return method(self, *args, **kwargs)
        except BaseException as exc:
            self._failed(exc)
            raise

    return wrapper


def _live_pids(workspace: Path) -> set[int]:
    return {p.pid for p in sandbox_processes(workspace)}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}...({len(value)} long)"


class RedisChaos(RuleBasedStateMachine):
    base: Path  # the test's tmp_path, set by the test

    examples = 0
    failures: list  # (example, steps, error) of every failed example, first run

    def __init__(self):
        super().__init__()
        self.failed = False
        self.steps: list[str] = []
        self.restarted = False
        self.unseen = False  # a claim or release the daemon may not have seen in a pass yet
        self.held: dict[str, Held] = {}
        self.tainted_ids: set[str] = set()
        type(self).examples += 1
        self.dir = self.base / f"example-{type(self).examples}"
        self.dir.mkdir()
        self.runner = asyncio.Runner()
        self.short: Path | None = None
        self.redis_proc: subprocess.Popen | None = None
        self.daemon: DaemonProcess | None = None
        self.redis: Redis | None = None
        self.raw: Redis | None = None
        self.client: Client | None = None
        try:
            self._start()
        except BaseException:
            self._clean_up()
            raise

    # -- setup and plumbing ------------------------------------------------------------

    def run(self, coro):
        return self.runner.run(coro)

    def _start(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._start_redis()
        self._connect()
        # Sandboxes' sockets live under the workspace: keep its path short (AF_UNIX limit).
        self.short = Path(tempfile.mkdtemp(prefix="sbx-chaos-"))
        workspace = self.short / "ws"
        config = {
            "redis_url": self.url,
            "reconcile_interval_s": LOOP_S,
            "heartbeat_interval_s": LOOP_S,
            "janitor_interval_s": LOOP_S,
            "lease_check_interval_s": LOOP_S,
            "state_dir": str(self.short / "state"),  # the daemon's journal, this example's own
        }
        path = self.dir / "sandboxd.toml"
        path.write_text(toml_config(config, {"workspace_root": str(workspace)}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXD_")}
        self.daemon = DaemonProcess(path, workspace, env, log_path=self.dir / "daemon.log")
        self.daemon.start()
        pool = {
            "name": POOL,
            "min_ready": MIN_READY,
            "max_total": MAX_TOTAL,
            "reuse": "never",
            "lease_s": LEASE_S,
            "max_lease_s": LEASE_S,
        }
        self.revision = self.run(apply(self.redis, [pool]))
        self.run(eventually(self._ready_is_full, timeout=CONVERGE_S, what="the first fill"))

    def _start_redis(self) -> None:
        binary = find_redis_server()
        assert binary is not None, "no redis-server"
        self.redis_proc = start(binary, self.port, self.dir / "redis", daemonize=False)
        wait_until_answering("127.0.0.1", self.port)

    def _connect(self) -> None:
        self.redis = open_redis(self.url)  # as the daemon reads: bad bytes never raise
        self.raw = Redis.from_url(self.url)  # bytes as they are
        self.client = Client.from_url(self.url, owner="chaos")

    def _disconnect(self) -> None:
        for conn in (self.client, self.redis, self.raw):
            if conn is not None:
                with contextlib.suppress(Exception):
                    self.run(conn.aclose())
        self.client = self.redis = self.raw = None

    def _log(self) -> str:
        return self.daemon.log_path.read_text(errors="replace")

    def _assert_no_traceback(self) -> None:
        """Fails with each logged traceback's message and last line."""
        found = []
        for line in self._log().splitlines():
            if "Traceback" in line:
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    errors = [
                        text.strip(" |")
                        for text in entry.get("exc_info", "").splitlines()
                        if re.match(r"[\s|]*[\w.]+(Error|Exception)\b", text)
                    ]
                    last = " ".join(errors[-1:])
                    line = f"{entry.get('logger')}: {entry.get('message')} | {last}"
                found.append(line[:600])
        if found:
            raise AssertionError("tracebacks in the daemon's log:\n  " + "\n  ".join(found))

    def _tail(self) -> str:
        return "\n--- daemon log (tail) ---\n" + self._log()[-4000:]

    async def _ready_ids(self) -> list[str] | None:
        if await self.redis.type(KEYS.pool_ready(POOL)) not in ("list", "none"):
            return None
        return await self.redis.lrange(KEYS.pool_ready(POOL), 0, -1)

    async def _ready_is_full(self) -> bool:
        ids = await self._ready_ids()
        return ids is not None and len(ids) == MIN_READY

    async def _record_ids(self) -> list[str]:
        """Ids of the record keys there are now (whatever the id set says)."""
        found = []
        async for key in self.redis.scan_iter(match=KEYS.sandbox("*"), count=1000):
            rest = key.removeprefix(KEYS.sandbox(""))
            if ":" not in rest:
                found.append(rest)
        return sorted(found)

    def _taint(self, sandbox_id: str, why: str) -> None:
        self.tainted_ids.add(sandbox_id)
        if sandbox_id in self.held and not self.held[sandbox_id].tainted:
            self.held[sandbox_id].tainted = why

    def _pick_record(self, data) -> str | None:
        ids = self.run(self._record_ids())
        picked = data.draw(st.sampled_from(ids), label="record") if ids else None
        held = self.held.get(picked or "")
        self.steps[-1] += f" on {picked}" + (" (claimed)" if held else "")
        return picked

    def _failed(self, exc: BaseException) -> None:
        if not self.failed:
            self.failed = True
            type(self).failures.append((self.dir.name, list(self.steps), exc))

    def _key(self, name: str, sandbox_id: str | None) -> str:
        return {
            "ready": KEYS.pool_ready(POOL),
            "members": KEYS.pool_members(POOL),
            "leases": KEYS.leases,
            "pools": KEYS.pools,
            "sandboxes": KEYS.sandboxes,
            "spec": KEYS.spec,
            "spec_active": KEYS.spec_active,
            "events": KEYS.events,
            "record": KEYS.sandbox(sandbox_id or ""),
        }[name]

    def _before_data_loss(self) -> None:
        """Wait until a reconcile pass has begun after the last claim or release, so the
        daemon's journal knows them: "When Redis loses its data" (docs/redis.md) leaves a
        claim made in the last moments before a loss (before the daemon read it) to its
        lease."""
        if not self.unseen:
            return

        async def a_whole_pass():
            first = await self._pass_ending_after(time.time())  # may have begun before
            await self._pass_ending_after(first)

        self.run(a_whole_pass())
        self.unseen = False

    async def _pass_ending_after(self, since: float) -> float:
        """`last_reconcile_at` of the heartbeat, once it is later than `since`."""

        async def probe():
            if await self.redis.type(KEYS.daemon) != "string":
                return None
            beat = json.loads(await self.redis.get(KEYS.daemon) or "{}")
            last = beat.get("last_reconcile_at")
            return last if isinstance(last, int | float) and last > since else None

        return await eventually(probe, timeout=CONVERGE_S, what=f"a reconcile pass after {since}")

    def _data_loss(self) -> None:
        for held in self.held.values():
            held.losses += 1

    # -- invariants --------------------------------------------------------------------

    @invariant()
    @checked
    def daemon_alive_without_traceback(self) -> None:
        assert self.daemon.proc.poll() is None, f"the daemon exited{self._tail()}"
        self._assert_no_traceback()

    # -- clients -----------------------------------------------------------------------

    @precondition(lambda self: len(self.held) < MAX_HELD)
    @rule()
    @checked
    def claim(self) -> None:
        try:
            sandbox = self.run(self._claim())
        except ClaimError as exc:  # ClaimTimeout too: the clear errors a claim may end with
            self.steps[-1] += f" !{exc.reason}"
            return
        except Exception as exc:
            raise AssertionError(
                f"a claim failed with {type(exc).__name__}: {exc} (not ClaimError/ClaimTimeout)"
            ) from exc
        held = Held(sandbox, pid=int(sandbox.connection_info.get("pid", 0)))
        if sandbox.id in self.tainted_ids:
            held.tainted = "its record was corrupted before the claim"
        self.held[sandbox.id] = held
        self.unseen = True
        self.steps[-1] += f" -> {sandbox.id}"

    async def _claim(self) -> Sandbox:
        return await self.client.claim(POOL, timeout_s=CLAIM_WAIT_S)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    @checked
    def release(self, data) -> None:
        sandbox_id = data.draw(st.sampled_from(sorted(self.held)), label="claim")
        held = self.held.pop(sandbox_id)
        self.steps[-1] += f" of {sandbox_id}" + (" (tainted)" if held.tainted else "")
        if held.tainted:
            self.unseen = True
            with contextlib.suppress(ClaimError):
                self.run(self.client.release(held.id, held.sandbox.claim_token))
            return
        self._release_vouched(held)

    def _release_vouched(self, held: Held) -> None:
        """A claim the test vouches for: its process runs and its holder releases it."""
        live = _live_pids(self.daemon.workspace)
        assert held.pid in live, (
            f"claimed sandbox {held.id} (held through {held.losses} data losses) is no longer "
            f"running{self._tail()}"
        )
        self.unseen = True
        # `corrupt`: a key the release writes has the wrong type; the script changed nothing
        # and the daemon repairs the key within a tick. `not_claimed` after a data loss: the
        # daemon is to write the record back.
        transient = {"corrupt"} | ({"not_claimed"} if held.losses else set())

        async def released():
            try:
                await self.client.release(held.id, held.sandbox.claim_token)
            except ClaimError as exc:
                if exc.reason not in transient:
                    raise
                return False
            return True

        self.run(
            eventually(
                released,
                timeout=CONVERGE_S,
                interval=0.1,
                what=f"the holder of {held.id} releasing it after {held.losses} data losses",
            )
        )

    # -- corruption --------------------------------------------------------------------

    @rule(name=st.sampled_from(KEY_NAMES), data=st.data())
    @checked
    def delete_key(self, name: str, data) -> None:
        sandbox_id = None
        if name == "record":
            sandbox_id = self._pick_record(data)
            if sandbox_id is None:
                return
            self._taint(sandbox_id, "its record was deleted")
        self.run(self.redis.delete(self._key(name, sandbox_id)))

    @rule(name=st.sampled_from(KEY_NAMES), data=st.data())
    @checked
    def wrong_type(self, name: str, data) -> None:
        sandbox_id = None
        if name == "record":
            sandbox_id = self._pick_record(data)
            if sandbox_id is None:
                return
            self._taint(sandbox_id, "its record was replaced by a string")
        key = self._key(name, sandbox_id)

        async def rewrite():
            kind = await self.redis.type(key)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                if kind == "hash":
                    pipe.set(key, "not a hash")
                elif kind == "list":
                    pipe.hset(key, "x", "y")
                elif kind in ("set", "zset", "stream"):
                    pipe.set(key, f"not a {kind}")
                else:  # a string, or nothing there: a hash
                    pipe.hset(key, "x", "y")
                await pipe.execute()

        self.run(rewrite())

    @rule(field=st.sampled_from(RECORD_FIELDS), value=st.sampled_from(GARBAGE), data=st.data())
    @checked
    def garbage_field(self, field: str, value: bytes, data) -> None:
        sandbox_id = self._pick_record(data)
        if sandbox_id is None:
            return
        self._taint(sandbox_id, f"its record's {field} was set to garbage")
        key = KEYS.sandbox(sandbox_id)

        async def write():
            if await self.raw.type(key) == b"hash":
                await self.raw.hset(key, field, value)

        self.run(write())

    @rule(kind=st.sampled_from(sorted(BAD_SPECS)))
    @checked
    def bad_spec(self, kind: str) -> None:
        self.run(self.raw.set(KEYS.spec, BAD_SPECS[kind]))
        self.run(self.redis.publish(KEYS.nudge, "chaos"))

    # -- convergence -------------------------------------------------------------------

    @rule()
    @checked
    def settle(self) -> None:
        self._converge()

    def _converge(self) -> None:
        """Poll until the pool is back at the spec with processes == records, every
        vouched-for claim still claimed and running; fail with what is off."""
        self.run(eventually(self._converged, timeout=CONVERGE_S, interval=0.05, what="converged"))

    async def _converged(self) -> bool | None:
        problems = await self._problems()
        self._last_problems = problems
        return not problems

    async def _problems(self) -> list[str]:
        problems = []
        ready = await self._ready_ids()
        if ready is None or len(ready) != MIN_READY:
            problems.append(f"ready: {ready}")
        scan = await SandboxStore(self.redis, KEYS).scan()
        if scan.corrupt:
            problems.append(f"corrupt: {[c.key for c in scan.corrupt]}")
        records = {r.id: r for r in scan.records}
        keys = await self._record_ids()
        if sorted(records) != keys:
            problems.append(f"id set {sorted(records)} != record keys {keys}")
        by_pid = {int(r.handle.get("pid", 0)): r.id for r in records.values()}
        live = _live_pids(self.daemon.workspace)
        if set(by_pid) != live:
            problems.append(f"record pids {sorted(by_pid)} != live sandbox pids {sorted(live)}")
        if {r.state for r in records.values()} - {"ready", "claimed"}:
            problems.append(f"states: {sorted(r.state for r in records.values())}")
        claimed = {r.id for r in records.values() if r.state == "claimed"}
        orphans = claimed - set(self.held) - self.tainted_ids
        if orphans:
            problems.append(f"claimed, but by no claim the test holds: {sorted(orphans)}")
        for held in self.held.values():
            if held.tainted:
                continue
            record: SandboxRecord | None = records.get(held.id)
            if (
                record is None
                or record.state != "claimed"
                or record.claim_id != held.sandbox.claim_id
            ):
                problems.append(
                    f"claim {held.id} (held through {held.losses} data losses) not held: "
                    f"{record and (record.state, record.claim_id)}"
                )
            if held.pid not in live:
                problems.append(f"claimed sandbox {held.id} (pid {held.pid}) is not running")
        beat = (
            await self.redis.get(KEYS.daemon)
            if await self.redis.type(KEYS.daemon) == "string"
            else None
        )
        revision = json.loads(beat).get("revision") if beat else None
        if revision != self.revision:
            problems.append(f"heartbeat revision {revision} != {self.revision}")
        return problems

    # -- the end -----------------------------------------------------------------------

    def teardown(self) -> None:
        print(f"{self.dir.name}: {len(self.steps)} steps: {', '.join(self.steps)}")
        try:
            if not self.failed:
                self.steps.append("(teardown)")
                self._final_checks()
        except BaseException as exc:
            self._failed(exc)
            raise
        finally:
            self._clean_up()

    def _final_checks(self) -> None:
        self._last_problems: list[str] = []
        try:
            self._converge()
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nstill off: {self._last_problems}{self._tail()}") from None
        for held in list(self.held.values()):
            del self.held[held.id]
            if held.tainted:
                with contextlib.suppress(ClaimError):
                    self.run(self.client.release(held.id, held.sandbox.claim_token))
                continue
            result = self.run(held.sandbox.exec(["true"], timeout=10))
            assert result.exit_code == 0, result
            self._release_vouched(held)
        try:
            self._converge()
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nstill off: {self._last_problems}{self._tail()}") from None
        self.daemon.signal(signal.SIGTERM)
        code = self.daemon.wait(15)
        log = self._log()
        assert code == 0, f"the daemon exited {code} on SIGTERM{self._tail()}"
        self._assert_no_traceback()
        if not self.restarted:
            assert "Redis unavailable" not in log, f"'Redis unavailable' logged{self._tail()}"

    def _clean_up(self) -> None:
        if self.daemon is not None and self.daemon.proc is not None:
            if self.daemon.proc.poll() is None:
                self.daemon.signal(signal.SIGTERM)
                try:
                    self.daemon.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.daemon.proc.kill()
                    self.daemon.proc.wait(5)
            with contextlib.suppress(Exception):
                self.daemon.log.close()
            for proc in sandbox_processes(self.daemon.workspace):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        self._disconnect()
        if self.redis_proc is not None and self.redis_proc.poll() is None:
            self.redis_proc.terminate()
            self.redis_proc.wait(10)
        self.runner.close()
        if self.short is not None:
            shutil.rmtree(self.short, ignore_errors=True)


class RedisChaosWithDataLoss(RedisChaos):
    """Also loses Redis's data: FLUSHDB, and a restart of a redis-server that keeps nothing."""

    @rule()
    @checked
    def flushdb(self) -> None:
        self._before_data_loss()
        self.run(self.redis.flushdb())
        self._data_loss()

    @rule()
    @checked
    def restart_redis(self) -> None:
        self._before_data_loss()
        self._disconnect()
        self.redis_proc.terminate()
        self.redis_proc.wait(10)
        self._start_redis()
        self._connect()
        self.restarted = True
        self._data_loss()


def _run(machine: type[RedisChaos], tmp_path: Path) -> None:
    began = time.monotonic()
    test = type(machine.__name__, (machine,), {"base": tmp_path, "failures": []})
    try:
        run_state_machine_as_test(test, settings=SETTINGS)
    except Exception:
        if not test.failures:
            raise
        example, steps, first = test.failures[0]
        raise AssertionError(
            f"{example} failed ({type(first).__name__}) after these steps:\n  "
            + "\n  ".join(steps)
            + f"\n{first}"
        ) from first
    finally:
        print(f"{machine.__name__}: {test.examples} examples in {time.monotonic() - began:.1f}s")


@pytest.mark.timeout(TIMEOUT_S)
def test_redis_chaos(tmp_path: Path) -> None:
    """Corruption of every kind but data loss."""
    _run(RedisChaos, tmp_path)


@pytest.mark.timeout(TIMEOUT_S)
def test_redis_chaos_with_data_loss(tmp_path: Path) -> None:
    """Also FLUSHDB and Redis restarts: claims held through them must survive (the local
    journal, `state.restored`)."""
    _run(RedisChaosWithDataLoss, tmp_path)
