"""Schedule windows: when they are active, when the next change is, how sizes ramp."""

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandboxd.control.schedule import PoolSchedules, active_window, next_change
from sandboxd.spec import PoolSpec, ScheduleWindow, SpecError, validate_spec

NY = ZoneInfo("America/New_York")
MARKET = {"days": ["mon-fri"], "from": "09:30", "to": "16:00", "timezone": "America/New_York"}


def window(**overrides) -> ScheduleWindow:
    return ScheduleWindow.model_validate({**MARKET, "min_ready": 20, **overrides})


def test_market_hours_in_new_york_whatever_the_season():
    market = window()
    # 2026-11-23 is a Monday (EST, UTC-5); 2026-07-06 a Monday (EDT, UTC-4).
    assert market.active(datetime(2026, 11, 23, 14, 30, tzinfo=UTC))  # 09:30 EST
    assert not market.active(datetime(2026, 11, 23, 14, 29, 59, tzinfo=UTC))
    assert not market.active(datetime(2026, 11, 23, 21, 0, tzinfo=UTC))  # 16:00 EST: ended
    assert market.active(datetime(2026, 7, 6, 13, 30, tzinfo=UTC))  # 09:30 EDT
    assert not market.active(datetime(2026, 11, 28, 15, 0, tzinfo=UTC))  # Saturday


def test_a_window_past_midnight_belongs_to_the_day_it_starts():
    night = window(days=["fri"], **{"from": "22:00", "to": "02:00"}, timezone="UTC")
    assert night.active(datetime(2026, 11, 28, 1, 0, tzinfo=UTC))  # Saturday 01:00
    assert not night.active(datetime(2026, 11, 29, 1, 0, tzinfo=UTC))  # Sunday 01:00


def test_next_change_is_the_next_start_or_end():
    market = [window()]
    friday_close = datetime(2026, 11, 27, 16, 0, tzinfo=NY)
    assert next_change(market, friday_close - timedelta(hours=1)) == friday_close
    assert next_change(market, friday_close) == datetime(2026, 11, 30, 9, 30, tzinfo=NY)


def test_bad_windows_are_rejected_with_field_and_reason():
    with pytest.raises(SpecError) as err:
        validate_spec({"name": "p", "schedule": [{**MARKET, "timezone": "Mars/Olympus"}]}, PoolSpec)
    assert "unknown time zone" in str(err.value) and "schedule" in str(err.value)
    with pytest.raises(SpecError, match="not a day"):
        validate_spec(
            {"name": "p", "schedule": [{**MARKET, "days": ["funday"], "min_ready": 1}]}, PoolSpec
        )
    with pytest.raises(SpecError, match="sets min_ready, max_total or both"):
        validate_spec({"name": "p", "schedule": [MARKET]}, PoolSpec)
    with pytest.raises(SpecError, match=r"schedule\[0\].*must not exceed max_total \(10\)"):
        validate_spec({"name": "p", "schedule": [{**MARKET, "min_ready": 11}]}, PoolSpec)


def test_windows_survive_a_round_trip_through_json():
    pool = PoolSpec.model_validate({"name": "p", "schedule": [{**MARKET, "min_ready": 3}]})
    again = PoolSpec.model_validate_json(pool.model_dump_json())
    assert again == pool and '"from":"09:30:00"' in pool.model_dump_json()


class Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_sizes_ramp_linearly_to_the_window_and_back():
    clock = Clock(datetime(2026, 11, 23, 9, 0, tzinfo=NY))
    pool = PoolSpec.model_validate(
        {
            "name": "p",
            "min_ready": 2,
            "max_total": 30,
            "schedule_ramp_s": 100,
            "schedule": [{**MARKET, "min_ready": 22}],
        }
    )
    schedules = PoolSchedules(clock)
    [now], changes = schedules.apply([pool])
    assert (now.min_ready, changes) == (2, [])
    clock.now = datetime(2026, 11, 23, 9, 30, tzinfo=NY)
    [now], changes = schedules.apply([pool])
    assert now.min_ready == 2 and changes[0].target == (22, 30)
    clock.now += timedelta(seconds=50)
    assert schedules.apply([pool])[0][0].min_ready == 12
    clock.now += timedelta(seconds=50)
    assert schedules.apply([pool])[0][0].min_ready == 22
    status = schedules.status([pool])["p"]
    assert status["window"] == "mon,tue,wed,thu,fri 09:30:00-16:00:00 America/New_York"
    assert status["next_change_at"] == "2026-11-23T21:00:00+00:00"
    clock.now = datetime(2026, 11, 23, 16, 0, tzinfo=NY)
    [now], changes = schedules.apply([pool])
    assert changes[0].window is None and now.min_ready == 22
    clock.now += timedelta(seconds=100)
    assert schedules.apply([pool])[0][0].min_ready == 2


@given(
    origin=st.tuples(st.integers(0, 50), st.integers(50, 100)),
    target=st.tuples(st.integers(0, 50), st.integers(50, 100)),
    elapsed=st.floats(0, 200),
)
def test_a_ramp_stays_between_its_ends_and_min_never_exceeds_max(origin, target, elapsed):
    from sandboxd.control.schedule import Ramp

    start = datetime(2026, 1, 1, tzinfo=UTC)
    low, high = Ramp(origin, target, start, 100).at(start + timedelta(seconds=elapsed))
    assert low <= high
    assert min(origin[1], target[1]) <= high <= max(origin[1], target[1])
    if elapsed >= 100:
        assert (low, high) == (min(target), target[1])


def test_the_first_active_window_wins():
    early = window(min_ready=5)
    all_week = window(days=["mon-sun"], **{"from": "00:00", "to": "00:00"}, min_ready=1)
    monday_ten = datetime(2026, 11, 23, 10, 0, tzinfo=NY)
    assert active_window([early, all_week], monday_ten) is early
    assert active_window([early, all_week], monday_ten + timedelta(hours=8)) is all_week
