"""A finished create asks for a pass that may wait (`claim_coalesce_ms`), as a claim does: at
once, that pass ran just as the pool's next claimant was served. The creates a pool still
owes do not wait for it: each starts as a slot frees."""

from datetime import datetime

import pytest

from tests.support import apply, events_of, wait_ready

pytestmark = pytest.mark.timeout(120)


async def test_a_finished_create_asks_for_a_coalesced_pass_and_owed_creates_start_at_once(
    redis, embedded_daemon
):
    daemon = await embedded_daemon(claim_coalesce_ms=1000, max_concurrent_creates=1)
    reconciler = daemon.wings.reconciler
    asked: list[tuple[str | None, bool]] = []
    nudge = reconciler.nudge

    def recording(pool: str | None = None, *, coalesce: bool = False) -> None:
        asked.append((pool, coalesce))
        nudge(pool, coalesce=coalesce)

    reconciler.nudge = recording
    await apply(redis, [{"name": "fill", "min_ready": 4, "max_total": 4}])
    await wait_ready(redis, "fill", 4, timeout=60)
    assert asked.count(("fill", True)) >= 4  # one per create, none of them urgent
    assert ("fill", False) not in asked
    # One create at a time, each started as the last ended, not at a pass (the tick is
    # 0.5 s here, the coalesced pass 1 s away).
    events = await events_of(redis, "sandbox.creating", "sandbox.ready")
    times = [(e["type"], datetime.fromisoformat(e["time"])) for e in events]
    readies = [t for kind, t in times if kind == "sandbox.ready"]
    creates = [t for kind, t in times if kind == "sandbox.creating"]
    assert len(readies) == len(creates) == 4
    pairs = zip(readies[:-1], creates[1:], strict=True)
    gaps = [(nxt - ready).total_seconds() for ready, nxt in pairs]
    assert all(0 <= gap < 0.3 for gap in gaps), gaps
