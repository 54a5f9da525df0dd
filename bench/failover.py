"""Failover: kill -9 of the active daemon -> the standby acting, claims, the pool whole again.

    .venv/bin/python bench/failover.py [--ttl 5] [--rounds 20] [--clean-rounds 10]
                                       [--claim-every SECONDS]

One private redis-server, one shared workspace and two real daemons for the same node: one
active, one hot standby. One local pool, `min_ready: 4`, `reuse: never`. A round kills the
active daemon with SIGKILL and measures, from the kill:
- takeover: the standby's line in `<prefix>:daemons` says `active` at the next epoch (and,
  to split that time, when Redis shows the node's lease taken at that epoch);
- the first successful claim through `sandboxd.client.Client`. Claims go straight to Redis,
  so they should not stop while no daemon acts: one is made at the kill and then one every
  `--claim-every` seconds (default (TTL + 2 s) / 3: slow enough that the 4 ready sandboxes
  outlast the failover, so a long gap means the claim path stalled, not that the pool ran
  dry); the longest gap between successful claims is reported;
- the pool back at min_ready (its ready list), once the new active daemon replaced what was
  claimed.
The killed daemon is then started again: it is the next round's standby. Each stop comes a
random time (0 to TTL) after the state is steady, so at any phase of the active daemon's
renewals and of the standby's polls, as a crash would.

Baseline, same run and same measurements: a clean stop (SIGTERM) of the active daemon, which
gives the lease back and announces it, so the standby takes over at once. Both daemons run with
`on_shutdown = keep`, so a clean stop hands the sandboxes over as a kill does. The lease TTL
is printed next to the figures; the target is takeover <= TTL + 1 s.
"""

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from redis.asyncio import Redis
from tests.support import free_port

from bench.common import line, pct
from sandboxd.client import ClaimTimeout, Client, Sandbox
from sandboxd.config import LocalProviderConfig
from sandboxd.providers.local.provider import LocalProvider
from sandboxd.spec import PoolSpec, Spec
from sandboxd.store.keys import Keys
from sandboxd.store.localredis import find_redis_server, wait_until_answering
from sandboxd.store.records import SandboxStore
from sandboxd.store.specs import SpecStore

KEYS = Keys()
NODE = "bench-node"
POOL = "ha"
MIN_READY = 4
LEASE = KEYS.node_lease(NODE)


class Daemons:
    """The two daemon processes (slots 0 and 1) on one redis-server and one workspace."""

    def __init__(self, root: Path, url: str, ttl: float):
        self.root = root
        self.procs: list[subprocess.Popen | None] = [None, None]
        self.started = 0
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXD_")}
        self.env = {
            **inherited,
            "SANDBOXD_REDIS_URL": url,
            "SANDBOXD_NODE": NODE,
            "SANDBOXD_LEASE_TTL_S": str(ttl),
            "SANDBOXD_ON_SHUTDOWN": "keep",
            "SANDBOXD_LOCAL__WORKSPACE_ROOT": str(root / "boxes"),
        }

    def start(self, slot: int) -> None:
        self.started += 1
        with open(self.root / f"daemon-{self.started}.log", "wb") as log:
            self.procs[slot] = subprocess.Popen(
                [sys.executable, "-m", "sandboxd", "run"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches the bench only; it stops them
            )

    def slot_of(self, pid: int) -> int | None:
        return next((i for i, p in enumerate(self.procs) if p and p.pid == pid), None)

    def check_alive(self, but: int | None = None) -> None:
        for slot, proc in enumerate(self.procs):
            if slot != but and proc is not None and proc.poll() is not None:
                raise RuntimeError(f"daemon {slot} exited {proc.returncode}; logs in {self.root}")

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            if proc is None:
                continue
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@dataclass
class Seen:
    """One look at Redis: the lease's epoch, the daemons' lines, the ready list's length."""

    epoch: int
    lines: list[dict]
    ready: int

    def active_at(self, epoch: int) -> dict | None:
        return next((d for d in self.lines if d["role"] == "active" and d["epoch"] == epoch), None)


async def look(redis: Redis) -> Seen:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.get(LEASE)
        pipe.hgetall(KEYS.daemons)
        pipe.llen(KEYS.pool_ready(POOL))
        lease, lines, ready = await pipe.execute()
    epoch = (lease or "").partition(":")[0]
    parsed = [json.loads(v) for v in lines.values()]
    return Seen(int(epoch) if epoch.isdigit() else 0, parsed, ready)


async def steady(redis: Redis, daemons: Daemons) -> tuple[int, int]:
    """Wait for one daemon active (its line at the lease's epoch), the other standing by
    (a fresh line), the pool at min_ready and nothing else held; the active's slot, epoch."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        daemons.check_alive()
        seen = await look(redis)
        active = seen.active_at(seen.epoch)
        standby = [
            d
            for d in seen.lines
            if d["role"] == "standby" and time.time() - d["heartbeat_at"] < 2.5
        ]
        records = await SandboxStore(redis, KEYS).records()
        if (
            active is not None
            and (slot := daemons.slot_of(active["pid"])) is not None
            and any(daemons.slot_of(d["pid"]) == 1 - slot for d in standby)
            and seen.ready == MIN_READY
            and len(records) == MIN_READY
        ):
            return slot, seen.epoch
        await asyncio.sleep(0.05)
    raise RuntimeError("no steady state (one active, one standby, pool full) within 120 s")


@dataclass
class Claims:
    """Claims made during one failover: when each ended (ok or not) and how long it took."""

    ok_at: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    empty: int = 0
    errors: list[str] = field(default_factory=list)
    held: list[Sandbox] = field(default_factory=list)


async def keep_claiming(
    client: Client, t0: float, every: float, stop: asyncio.Event, out: Claims
) -> None:
    """One claim at t0, then one every `every` seconds (on a fixed schedule) until `stop`."""
    k = 0
    while not stop.is_set():
        started = time.perf_counter()
        try:
            out.held.append(await client.claim(POOL, timeout_s=0))
            out.ok_at.append(time.perf_counter())
        except ClaimTimeout:
            out.empty += 1
        except Exception as exc:  # a failing claim path is what is measured, not a crash
            out.errors.append(f"{type(exc).__name__}: {exc}")
        out.latency.append((time.perf_counter() - started) * 1000)
        k += 1
        with contextlib.suppress(TimeoutError):
            delay = max(0.0, t0 + k * every - time.perf_counter())
            await asyncio.wait_for(stop.wait(), delay)


@dataclass
class Round:
    lease: float  # ms from the stop to Redis showing the lease at the next epoch
    takeover: float  # ... to the new active's line in `<prefix>:daemons`
    first_claim: float  # ... to the first successful claim
    gap: float  # longest time without a successful claim, from the stop on
    pool: float  # ... to the ready list back at min_ready after the takeover
    claims: Claims


async def failover(
    redis: Redis, client: Client, daemons: Daemons, how: signal.Signals, every: float, ttl: float
) -> Round:
    """Stop the active daemon with `how` and measure until the pool is whole again; then
    start it again (the next standby) and release what was claimed."""
    slot, epoch = await steady(redis, daemons)
    # The state turns steady at the new standby's first poll: stopping right then would put
    # every stop just after a poll (first runs did: takeovers of exactly 4.0 or 5.0 s).
    await asyncio.sleep(random.uniform(0, ttl))
    victim = daemons.procs[slot]
    assert victim is not None
    stop, claims = asyncio.Event(), Claims()
    victim.send_signal(how)
    t0 = time.perf_counter()
    claimer = asyncio.create_task(keep_claiming(client, t0, every, stop, claims))
    lease_at = takeover_at = pool_at = None
    try:
        while pool_at is None:
            seen = await look(redis)
            now = time.perf_counter()
            if lease_at is None and seen.epoch == epoch + 1:
                lease_at = now
            if takeover_at is None and seen.active_at(epoch + 1):
                takeover_at = now
            if takeover_at is not None and seen.ready >= MIN_READY:
                pool_at = now
            if now - t0 > 3 * ttl + 60:
                raise RuntimeError(f"no takeover and full pool {now - t0:.0f} s after {how.name}")
            daemons.check_alive(but=slot)
            await asyncio.sleep(0.002)
    finally:
        stop.set()
        await claimer
    await asyncio.to_thread(victim.wait, 30)
    daemons.start(slot)
    await asyncio.gather(*(s.release() for s in claims.held))  # the new active ends them
    assert lease_at is not None and takeover_at is not None
    ok = [t0, *claims.ok_at]  # the gaps count from the stop on
    return Round(
        lease=(lease_at - t0) * 1000,
        takeover=(takeover_at - t0) * 1000,
        first_claim=(claims.ok_at[0] - t0) * 1000 if claims.ok_at else math.inf,
        gap=max(b - a for a, b in itertools.pairwise(ok)) * 1000 if claims.ok_at else math.inf,
        pool=(pool_at - t0) * 1000,
        claims=claims,
    )


def private_redis(port: int, directory: Path) -> subprocess.Popen:
    """A redis-server on loopback without persistence, in its own session: a Ctrl-C reaches
    the bench only, which stops it after the daemons and the sandboxes."""
    directory.mkdir(parents=True)
    argv = [find_redis_server() or "redis-server", "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--save", "", "--appendonly", "no", "--dir", str(directory)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=True)


async def terminate_sandboxes(boxes: Path) -> None:
    """Every sandbox left in the workspace (the daemons keep them at a stop)."""
    config = LocalProviderConfig(workspace_root=boxes, allow_weaker_isolation=True)
    await LocalProvider(config).cleanup_leftovers(set())


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ttl", type=float, default=5.0, help="lease_ttl_s of both daemons")
    parser.add_argument("--rounds", type=int, default=20, help="kill -9 rounds")
    parser.add_argument("--clean-rounds", type=int, default=10, help="SIGTERM rounds (baseline)")
    parser.add_argument("--claim-every", type=float, help="seconds (default (TTL + 2) / 3)")
    args = parser.parse_args()
    if args.rounds < 1 or args.clean_rounds < 1:
        parser.error("--rounds and --clean-rounds need at least 1 each")
    every = args.claim_every or (args.ttl + 2) / 3
    root = Path(tempfile.mkdtemp(prefix="sandboxd-bench-"))
    port = free_port()
    redis_proc = private_redis(port, root / "redis")
    daemons: Daemons | None = None
    try:
        wait_until_answering("127.0.0.1", port)
        url = f"redis://127.0.0.1:{port}/0"
        daemons = Daemons(root, url, args.ttl)
        async with Redis.from_url(url, decode_responses=True) as redis, Client(redis) as client:
            pool = PoolSpec(name=POOL, min_ready=MIN_READY, reuse="never")
            await SpecStore(redis, KEYS).apply(Spec(pools=[pool]))
            daemons.start(0)
            daemons.start(1)
            plan = interleave(args.rounds, args.clean_rounds)
            results: dict[signal.Signals, list[Round]] = {signal.SIGKILL: [], signal.SIGTERM: []}
            for i, how in enumerate(plan, 1):
                done = await failover(redis, client, daemons, how, every, args.ttl)
                results[how].append(done)
                print(
                    f"  round {i:>3}/{len(plan)} {how.name:<7} lease {done.lease:7.0f} ms  "
                    f"takeover {done.takeover:7.0f} ms  pool {done.pool:7.0f} ms",
                    file=sys.stderr,
                    flush=True,
                )
            await steady(redis, daemons)
            heartbeat = json.loads(await redis.get(KEYS.daemon) or "{}")
    finally:
        if daemons is not None:
            daemons.stop_all()
        await terminate_sandboxes(root / "boxes")
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)
    report(args, every, heartbeat.get("isolation", {}).get("local", "?"), results)


def interleave(kills: int, cleans: int) -> list[signal.Signals]:
    """SIGKILL rounds with the SIGTERM rounds spread evenly among them (same machine state)."""
    total = kills + cleans
    due = [round((i + 1) * cleans / total) - round(i * cleans / total) for i in range(total)]
    return [signal.SIGTERM if d else signal.SIGKILL for d in due]


def report(args, every: float, isolation: str, results: dict) -> None:
    kills, cleans = results[signal.SIGKILL], results[signal.SIGTERM]
    print(
        f"lease TTL {args.ttl:g} s (renewed every {args.ttl / 3:.2f} s; the standby looks again "
        f"when it runs out); pool: min_ready {MIN_READY}, reuse never; "
        f"a claim every {every:.2f} s; isolation: {isolation}; {os.cpu_count()} CPUs"
    )
    print(f"{'configured lease TTL':<40} {args.ttl * 1000:15.3f} ms")
    for name, rounds in (("baseline: clean stop (SIGTERM)", cleans), ("kill -9 (SIGKILL)", kills)):
        claims = [r.claims for r in rounds]
        errors = [e for c in claims for e in c.errors]
        print(name)
        print(line("  -> lease taken at the next epoch", [r.lease for r in rounds]))
        print(line("  -> standby active (takeover)", [r.takeover for r in rounds]))
        print(line("     of which lease -> active line", [r.takeover - r.lease for r in rounds]))
        print(line("  -> first successful claim", [r.first_claim for r in rounds]))
        print(line("  longest gap between successful claims", [r.gap for r in rounds]))
        print(line("  -> pool back at min_ready", [r.pool for r in rounds]))
        print(line("  claim latency during the failover", [ms for c in claims for ms in c.latency]))
        print(
            f"  claims made: {sum(len(c.latency) for c in claims)}, found the pool empty: "
            f"{sum(c.empty for c in claims)}, failed: {len(errors)}"
        )
        for error in sorted(set(errors))[:3]:
            print(f"    {error}")
    takeover = [r.takeover / 1000 for r in kills]
    target = args.ttl + 1
    print(
        f"takeover / lease TTL: median {statistics.median(takeover) / args.ttl:.2f}, "
        f"p99 {pct(takeover, 0.99) / args.ttl:.2f}. By design a takeover takes "
        f"{args.ttl * 2 / 3:.2f} s (killed just before a renewal) to {args.ttl:.2f} s (just "
        f"after one), plus a round trip and lease -> active line"
    )
    print(
        f"target takeover <= TTL + 1 s = {target:g} s: met in "
        f"{sum(t <= target for t in takeover)}/{len(takeover)} rounds, "
        f"p99 {(pct(takeover, 0.99) - target) * 1000:+.0f} ms from it"
    )
    gaps = [r.gap / 1000 for r in kills]
    print(f"longest claim gap / claim interval: max {max(gaps) / every:.2f}")
    for what in ("takeover", "first_claim", "pool"):
        kill = statistics.median(getattr(r, what) for r in kills)
        clean = statistics.median(getattr(r, what) for r in cleans)
        print(f"{'ratio kill -9 / clean stop, ' + what:<40} median {kill / clean:8.1f}x")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:  # everything was stopped and removed on the way out
        sys.exit(130)
