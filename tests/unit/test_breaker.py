from hypothesis import given
from hypothesis import strategies as st

from sandboxd.control.breaker import CircuitBreaker
from sandboxd.control.slowstart import SlowStart
from sandboxd.spec import BreakerSpec

SPEC = BreakerSpec(failures=3, cooldown_s=10, max_cooldown_s=25)


def test_opens_after_n_consecutive_failures_with_the_last_error():
    breaker = CircuitBreaker(SPEC)
    assert breaker.failed("a", now=0) is None
    assert breaker.failed("b", now=1) is None
    opened = breaker.failed("c", now=2)
    assert opened is not None and (opened.state, opened.error) == ("open", "c")
    assert breaker.allowed(now=11.9) == 0 and breaker.retry_in(now=10) == 2


def test_a_success_resets_the_count():
    breaker = CircuitBreaker(SPEC)
    breaker.failed("a", now=0)
    breaker.failed("a", now=0)
    assert breaker.succeeded() is None
    assert breaker.failed("a", now=0) is None and breaker.allowed(now=0) is None


def test_a_permanent_error_opens_at_once():
    breaker = CircuitBreaker(SPEC)
    assert breaker.failed("bad template", now=0, permanent=True).state == "open"


def test_half_open_allows_one_trial_then_closes_or_reopens_with_longer_cooldown():
    breaker = CircuitBreaker(SPEC)
    for _ in range(3):
        breaker.failed("x", now=0)
    assert breaker.allowed(now=10) == 1 and breaker.state == "half_open"
    breaker.started()
    assert breaker.allowed(now=10) == 0  # only one trial at a time
    assert breaker.failed("x", now=10).state == "open"
    assert breaker.allowed(now=29) == 0 and breaker.allowed(now=30) == 1  # cooldown 20
    breaker.started()
    breaker.failed("x", now=30)
    assert breaker.cooldown_s == 25  # capped
    assert breaker.allowed(now=55) == 1
    breaker.started()
    assert breaker.succeeded().state == "closed"
    assert breaker.allowed(now=55) is None and breaker.cooldown_s == 10


def test_slow_start_grows_by_one_per_success_up_to_max_surge_and_halves_on_failure():
    surge = SlowStart(max_surge=4)
    assert surge.allowed(inflight=0) == 1
    surge.succeeded()
    surge.succeeded()
    assert surge.allowed(inflight=1) == 2
    for _ in range(10):
        surge.succeeded()
    assert surge.allowed(inflight=0) == 4
    surge.failed()
    assert surge.allowed(inflight=0) == 2
    surge.reconfigure(1)
    assert surge.allowed(inflight=0) == 1


@given(st.lists(st.sampled_from(["ok", "fail", "start"]), max_size=60))
def test_never_more_than_one_trial_in_flight_while_not_closed(steps):
    breaker = CircuitBreaker(SPEC)
    now, running, trials = 0.0, [], 0
    for step in steps:
        now += 3
        allowed = breaker.allowed(now)
        if step == "start" and allowed != 0:
            breaker.started()
            running.append(allowed is not None)  # a trial if the breaker limited it
            trials += allowed is not None
            assert trials <= 1
        elif step in ("ok", "fail") and running:
            trials -= running.pop(0)
            breaker.succeeded() if step == "ok" else breaker.failed("e", now)
