"""The resource sampler measures at most `per_sample` local sandboxes a sample, in turn:
a sample's cost is bounded whatever N is, every sandbox is measured within ceil(N / share)
samples, its CPU % is over the time since its own last measure, and what is gone is
dropped."""

import asyncio
from typing import Any

import pytest

from sandboxd.config import Config
from sandboxd.outputs.resources import ResourceSampler
from sandboxd.spec import PoolSpec
from sandboxd.store.records import PassSnapshot
from tests.support import a_record

pytestmark = pytest.mark.timeout(20)


class Meter:
    """A local provider that can be measured: counts what it measured."""

    name = "local"

    def __init__(self) -> None:
        self.measured: list[str] = []
        self.cpu_s = 0.0

    def usage(self, handle: dict[str, Any]) -> tuple[float, int]:
        self.measured.append(handle["id"])
        return self.cpu_s, 1024


class Events:
    async def publish(self, *args: Any, **kwargs: Any) -> None:
        pass


def sampler(records, meter: Meter, per_sample: int) -> ResourceSampler:
    snapshot = PassSnapshot(records=records, specs={"p": PoolSpec(name="p")})
    s = ResourceSampler(
        config=Config(), events=Events(), providers={"local": meter}, snapshot=lambda: snapshot
    )
    s.per_sample = per_sample
    return s


async def test_each_sample_measures_its_share_and_all_are_measured_in_turn():
    records = [a_record(f"sb-{i}", handle={"id": f"sb-{i}"}) for i in range(25)]
    meter = Meter()
    s = sampler(records, meter, per_sample=10)
    seen: set[str] = set()
    for _ in range(3):  # ceil(25 / 10)
        meter.measured.clear()
        await s.sample()
        assert len(meter.measured) == 10
        seen |= set(meter.measured)
    assert seen == {r.id for r in records}
    assert set(s.sandboxes) == seen  # each one's last measure is kept between its turns


async def test_cpu_is_over_each_sandboxs_own_interval_and_the_gone_are_dropped():
    records = [a_record(f"sb-{i}", handle={"id": f"sb-{i}"}) for i in range(4)]
    meter = Meter()
    s = sampler(records, meter, per_sample=100)
    await s.sample()
    meter.cpu_s = 1.0
    await asyncio.sleep(0.05)
    await s.sample()
    assert all(box["cpu_percent"] > 100 for box in s.sandboxes.values())  # 1 s in ~0.05 s
    s._snapshot = lambda: PassSnapshot(records=records[:1], specs={})
    await s.sample()
    assert set(s.sandboxes) == {"sb-0"}
