"""Idle pools are healed a window at a time: a tick's cost follows the sandboxes."""

from unittest.mock import MagicMock

from sandboxd.control.repair import IDLE_WINDOW, Healer
from sandboxd.store.keys import Keys


def test_busy_pools_every_time_idle_pools_in_turn_until_all_were_seen():
    healer = Healer(MagicMock(), Keys(), MagicMock())
    pools = [f"p{i:05d}" for i in range(2 * IDLE_WINDOW + 10)]
    busy = {"p00007", "p01500"}
    seen: set[str] = set()
    for _ in range(3):
        window = healer._window("heal", pools, busy)
        assert busy <= set(window)
        assert len(window) == len(busy) + IDLE_WINDOW
        seen |= set(window)
    assert seen == set(pools)
    few = healer._window("types", pools[:10], set())
    assert few == pools[:10]
