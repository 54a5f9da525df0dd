"""A schedule window raises and lowers a pool's sizes, under a clock the test moves."""

import json
from datetime import UTC, datetime, timedelta

from tests.support import apply, cli, eventually, wait_event, wait_ready


class Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def test_a_window_raises_min_ready_and_its_end_lowers_it(
    redis, redis_server, embedded_daemon
):
    clock = Clock(datetime(2026, 11, 23, 14, 29, tzinfo=UTC))  # Monday 09:29 in New York
    daemon = await embedded_daemon(clock=clock)
    market = {
        "days": ["mon-fri"],
        "from": "09:30",
        "to": "16:00",
        "timezone": "America/New_York",
        "min_ready": 4,
    }
    pool = {"name": "trade", "min_ready": 1, "max_total": 6, "schedule": [market]}
    await apply(redis, [{**pool, "schedule_ramp_s": 0}])
    await wait_ready(redis, "trade", 1)
    facts = await eventually(lambda: _schedule(redis_server), what="the schedule in status")
    assert facts["window"] is None and facts["min_ready"] == 1
    assert facts["next_change_at"] == "2026-11-23T14:30:00+00:00"

    clock.now += timedelta(minutes=1)  # the market opens
    daemon.wings.reconciler.nudge()
    started = await wait_event(redis, "pool.schedule_changed", min_ready=4)
    assert started["data"]["window"].startswith("mon,tue,wed,thu,fri 09:30:00-16:00:00")
    await wait_ready(redis, "trade", 4)
    facts = await eventually(
        lambda: _schedule(redis_server, window=True), what="the window in status"
    )
    assert facts["next_change_at"] == "2026-11-23T21:00:00+00:00"

    clock.now = datetime(2026, 11, 23, 21, 0, tzinfo=UTC)  # 16:00: it closes
    daemon.wings.reconciler.nudge()
    await wait_event(redis, "pool.schedule_changed", min_ready=1)
    await wait_ready(redis, "trade", 1)
    scaled = await wait_event(redis, "pool.scaled", to_total=1)
    assert scaled["data"]["min_ready"] == 1


async def _schedule(redis_url: str, window: bool = False) -> dict | None:
    """The pool's schedule facts in `sandboxd status -o json` (once the heartbeat has them)."""
    status = json.loads(cli(redis_url, "status", "-o", "json").stdout)
    facts = status["daemon"].get("pools", {}).get("trade", {}).get("schedule")
    return facts if facts and bool(facts["window"]) == window else None
