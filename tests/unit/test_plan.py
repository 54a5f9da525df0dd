from hypothesis import given
from hypothesis import strategies as st

from sandboxd.control.plan import DEFAULT_FROM, FROM_STATES, Observed, plan
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
    lambda name, lo, extra, ttl, replace: PoolSpec(
        name=name,
        min_ready=lo,
        max_total=max(1, lo + extra),
        idle_ttl_s=ttl,
        replace_claimed=replace,
    ),
    st.sampled_from(["a", "b", "c"]),
    st.integers(0, 12),
    st.integers(0, 6),
    st.none() | st.integers(1, 5000),
    st.booleans(),
)
observed = st.lists(
    st.builds(
        lambda i, pool, state, age, health: Observed(f"s{i}", pool, state, NOW - age, health),
        st.integers(0, 10_000),
        st.sampled_from(["a", "b", "c", "d"]),
        st.sampled_from(["creating", "ready", "claimed", "terminating"]),
        st.floats(0, 8000),
        st.sampled_from(["healthy", "degraded", "unhealthy"]),
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
        for sandbox_id, reason in p.terminate:
            assert by_id[sandbox_id].state in FROM_STATES.get(reason, DEFAULT_FROM)
            assert by_id[sandbox_id].pool == p.pool
        assert len({sandbox_id for sandbox_id, _ in p.terminate}) == len(p.terminate)
        ready_gone = sum(1 for i, _ in p.terminate if by_id[i].state == "ready")
        spec = specs.get(p.pool)
        if spec is None:
            assert p.create == 0
            continue
        # Never over the cap because of us: creates only fit below max_total.
        if p.create:
            assert len(members) - len(p.terminate) + p.create <= spec.max_total
        ready_after = sum(1 for o in members if o.state == "ready") - ready_gone
        assert 0 <= ready_after <= spec.min_ready  # surplus always goes


@given(st.lists(pool_specs, max_size=3, unique_by=lambda p: p.name), observed)
def test_plan_converges_when_creates_are_unlimited(pools, obs):
    for p in plan(pools, obs, create_slots=1000, now=NOW):
        spec = next((s for s in pools if s.name == p.pool), None)
        if spec is None:
            continue
        members = [o for o in obs if o.pool == p.pool]
        gone = {i for i, _ in p.terminate}
        ready_after = sum(1 for o in members if o.state == "ready" and o.id not in gone)
        creating = sum(1 for o in members if o.state == "creating")
        total_after = len(members) - len(p.terminate) + p.create
        assert ready_after + creating + p.create >= spec.min_ready or total_after >= spec.max_total


def test_lifetime_cap_ends_claimed_sandboxes_too():
    old = [Observed("held", "a", "claimed", NOW - 4000), Observed("new", "a", "claimed", NOW)]
    (p,) = plan([PoolSpec(name="a", min_ready=0, timeout_s=3600)], old, create_slots=5, now=NOW)
    assert p.terminate == [("held", "timeout")]


def test_unhealthy_ready_is_replaced_claimed_only_when_asked():
    obs = [
        Observed("sick-ready", "a", "ready", NOW - 10, "unhealthy"),
        Observed("sick-held", "a", "claimed", NOW - 10, "unhealthy"),
        Observed("ok", "a", "ready", NOW - 5),
    ]
    (p,) = plan([PoolSpec(name="a", min_ready=2)], obs, create_slots=5, now=NOW)
    assert (p.terminate, p.create) == ([("sick-ready", "unhealthy")], 1)
    spec = PoolSpec(name="a", min_ready=2, replace_claimed=True)
    (p,) = plan([spec], obs, create_slots=5, now=NOW)
    assert sorted(p.terminate) == [("sick-held", "unhealthy"), ("sick-ready", "unhealthy")]
    assert p.create == 1  # the claimed one was not counted as ready


def test_degraded_sandboxes_stay():
    obs = [Observed("slow", "a", "ready", NOW - 10, "degraded")]
    (p,) = plan([PoolSpec(name="a", min_ready=1)], obs, create_slots=5, now=NOW)
    assert not p.changes


def test_idle_ttl_replaces_a_batch_make_before_break():
    spec = PoolSpec(name="a", min_ready=4, max_total=10, idle_ttl_s=60, max_surge=2)
    stale = [Observed(f"old{i}", "a", "ready", NOW - 100 + i) for i in range(3)]
    young = [Observed("young", "a", "ready", NOW - 10)]
    (p,) = plan([spec], stale + young, create_slots=5, now=NOW)
    assert (p.terminate, p.create) == ([], 2)  # replacements first, oldest two
    replacements = [Observed(f"new{i}", "a", "ready", NOW) for i in range(2)]
    (p,) = plan([spec], stale + young + replacements, create_slots=5, now=NOW)
    assert p.terminate == [("old0", "idle_ttl"), ("old1", "idle_ttl")]
    assert p.create == 1  # and the next batch: old2's replacement


def test_idle_ttl_waits_for_a_batch_in_flight():
    spec = PoolSpec(name="a", min_ready=2, max_total=10, idle_ttl_s=60)
    obs = [Observed(f"old{i}", "a", "ready", NOW - 100) for i in range(2)]
    obs.append(Observed("c", "a", "creating", NOW))
    (p,) = plan([spec], obs, create_slots=5, now=NOW)
    assert not p.changes  # the creating one may be a replacement: wait for it


def test_idle_ttl_at_the_cap_breaks_before_making():
    spec = PoolSpec(name="a", min_ready=2, max_total=2, idle_ttl_s=60, max_surge=1)
    obs = [Observed("old", "a", "ready", NOW - 100), Observed("young", "a", "ready", NOW)]
    (p,) = plan([spec], obs, create_slots=5, now=NOW)
    assert (p.terminate, p.create) == ([("old", "idle_ttl")], 1)


def test_limits_cap_creates_but_wanted_tells_the_need():
    (p,) = plan([PoolSpec(name="a", min_ready=5)], [], create_slots=9, now=NOW, limits={"a": 0})
    assert (p.create, p.wanted) == (0, 5)
    (p,) = plan([PoolSpec(name="a", min_ready=5)], [], create_slots=9, now=NOW, limits={"a": 2})
    assert (p.create, p.wanted) == (2, 5)


quiet_pool_specs = st.builds(
    lambda name, lo, extra, reuse: PoolSpec(
        name=name, min_ready=lo, max_total=max(1, lo + extra), reuse=reuse
    ),
    st.sampled_from(["a", "b", "c"]),
    st.integers(0, 12),
    st.integers(0, 6),
    st.sampled_from(["never", "reset"]),
)
quiet_observed = st.lists(
    st.builds(
        lambda i, pool, state: Observed(f"s{i}", pool, state, NOW - 10),
        st.integers(0, 10_000),
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from(["creating", "ready", "claimed", "released", "resetting", "terminating"]),
    ),
    max_size=40,
    unique_by=lambda o: o.id,
)


@given(
    st.lists(quiet_pool_specs, min_size=1, max_size=3, unique_by=lambda p: p.name),
    quiet_observed,
    st.integers(0, 10),
    st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(0, 3)),
    st.dictionaries(st.sampled_from(["a", "b", "c"]), st.none() | st.integers(0, 4)),
)
def test_top_up_from_counts_creates_what_the_plan_creates(pools, obs, slots, waiting, limits):
    """Where the plan has nothing to stop (the case a claim or a release makes), counting
    the records by state gives the very creates of the plan over every record."""
    from collections import Counter

    from sandboxd.control.plan import top_up

    planned = plan(pools, obs, create_slots=slots, now=NOW, waiting=waiting, limits=limits)
    if any(p.terminate for p in planned):
        return  # stopping is the whole passes' (top_up never stops anything)
    counts: dict[str, Counter] = {}
    for o in obs:
        counts.setdefault(o.pool, Counter())[o.state] += 1
    topped = top_up(pools, counts, create_slots=slots, waiting=waiting, limits=limits)
    by_pool = {p.pool: p for p in planned}
    assert [(p.pool, p.create, p.wanted) for p in topped] == [
        (p.pool, by_pool[p.pool].create, by_pool[p.pool].wanted) for p in topped
    ]


def test_top_up_counts_creates_started_since_the_counts():
    from sandboxd.control.plan import top_up

    pool = PoolSpec(name="a", min_ready=5, max_total=6)
    counts = {"a": {"ready": 2, "claimed": 1}}
    assert top_up([pool], counts, create_slots=10)[0].create == 3
    assert top_up([pool], counts, create_slots=10, unseen={"a": 2})[0].create == 1
    assert top_up([pool], counts, create_slots=10, unseen={"a": 3})[0].create == 0
    assert top_up([pool], {"a": {"ready": 2, "claimed": 4}}, create_slots=10)[0].create == 0
