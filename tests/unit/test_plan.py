from hypothesis import given
from hypothesis import strategies as st

from sandboxd.plan import Observed, plan
from sandboxd.spec import PoolSpec

NOW = 10_000.0


def sandboxes(pool: str, state: str, n: int, start: float = 0) -> list[Observed]:
    return [Observed(f"{pool}-{state}-{i}", pool, state, NOW - 100 + start + i) for i in range(n)]


def test_empty_pool_creates_min_ready():
    (p,) = plan([PoolSpec(name="a", min_ready=3)], [], create_slots=5, now=NOW)
    assert (p.create, p.terminate) == (3, [])


def test_creating_counts_toward_ready():
    obs = sandboxes("a", "creating", 2) + sandboxes("a", "ready", 1)
    (p,) = plan([PoolSpec(name="a", min_ready=3)], obs, create_slots=5, now=NOW)
    assert not p.changes


def test_surplus_terminates_oldest_ready_first():
    obs = sandboxes("a", "ready", 4)
    (p,) = plan([PoolSpec(name="a", min_ready=1)], obs, create_slots=5, now=NOW)
    assert p.terminate == [
        ("a-ready-0", "scaled_down"),
        ("a-ready-1", "scaled_down"),
        ("a-ready-2", "scaled_down"),
    ]
    assert p.create == 0


def test_claimed_never_terminated_and_cap_respected():
    obs = sandboxes("a", "claimed", 4) + sandboxes("a", "ready", 1)
    (p,) = plan([PoolSpec(name="a", min_ready=3, max_total=5)], obs, create_slots=5, now=NOW)
    assert p.create == 0 and p.terminate == []


def test_lowered_max_total_stops_ready_over_the_cap():
    obs = sandboxes("a", "ready", 4) + sandboxes("a", "claimed", 2)
    (p,) = plan([PoolSpec(name="a", min_ready=4, max_total=5)], obs, create_slots=5, now=NOW)
    assert len(p.terminate) == 1 and p.create == 0


def test_removed_pool_is_drained():
    obs = sandboxes("gone", "ready", 2) + sandboxes("gone", "claimed", 1)
    (p,) = plan([], obs, create_slots=5, now=NOW)
    assert p.pool == "gone" and {r for _, r in p.terminate} == {"drained"}
    assert len(p.terminate) == 2 and p.create == 0


def test_expired_sandboxes_replaced():
    old = [Observed("old", "a", "ready", NOW - 7200)]
    (p,) = plan([PoolSpec(name="a", min_ready=1, timeout_s=3600)], old, create_slots=5, now=NOW)
    assert p.terminate == [("old", "timeout")] and p.create == 1


def test_create_slots_are_shared_round_robin():
    pools = [PoolSpec(name="a", min_ready=5), PoolSpec(name="b", min_ready=5)]
    plans = plan(pools, [], create_slots=3, now=NOW)
    assert [p.create for p in plans] == [2, 1]


pool_specs = st.builds(
    lambda name, lo, extra: PoolSpec(name=name, min_ready=lo, max_total=max(1, lo + extra)),
    st.sampled_from(["a", "b", "c"]),
    st.integers(0, 12),
    st.integers(0, 6),
)
observed = st.lists(
    st.builds(
        lambda i, pool, state, age: Observed(f"s{i}", pool, state, NOW - age),
        st.integers(0, 10_000),
        st.sampled_from(["a", "b", "c", "d"]),
        st.sampled_from(["creating", "ready", "claimed", "terminating"]),
        st.floats(0, 8000),
    ),
    max_size=40,
    unique_by=lambda o: o.id,
)


@given(st.lists(pool_specs, max_size=3, unique_by=lambda p: p.name), observed, st.integers(0, 10))
def test_plan_invariants(pools, obs, slots):
    plans = plan(pools, obs, create_slots=slots, now=NOW)
    specs = {p.name: p for p in pools}
    by_id = {o.id: o for o in obs}
    assert sum(p.create for p in plans) <= slots
    for p in plans:
        members = [o for o in obs if o.pool == p.pool]
        for sandbox_id, _ in p.terminate:
            assert by_id[sandbox_id].state == "ready" and by_id[sandbox_id].pool == p.pool
        spec = specs.get(p.pool)
        if spec is None:
            assert p.create == 0
            continue
        # Never over the cap because of us: creates only fit below max_total.
        if p.create:
            assert len(members) - len(p.terminate) + p.create <= spec.max_total
        ready_after = sum(1 for o in members if o.state == "ready") - len(p.terminate)
        assert 0 <= ready_after <= spec.min_ready  # surplus always goes


@given(st.lists(pool_specs, max_size=3, unique_by=lambda p: p.name), observed)
def test_plan_converges_when_creates_are_unlimited(pools, obs):
    for p in plan(pools, obs, create_slots=1000, now=NOW):
        spec = next((s for s in pools if s.name == p.pool), None)
        if spec is None:
            continue
        members = [o for o in obs if o.pool == p.pool]
        ready_after = sum(1 for o in members if o.state == "ready") - len(p.terminate)
        creating = sum(1 for o in members if o.state == "creating")
        total_after = len(members) - len(p.terminate) + p.create
        assert ready_after + creating + p.create >= spec.min_ready or total_after >= spec.max_total
