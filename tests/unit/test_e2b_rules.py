"""The e2b provider's pure rules: which SDK errors are retried, what a pool spec allows,
how pools share a plan's concurrency, when a pool gives up, and the create limiter."""

import asyncio
import time

import httpx
import pytest
from e2b.exceptions import (
    AuthenticationException,
    InvalidArgumentException,
    RateLimitException,
    SandboxException,
    SandboxNotFoundException,
    ServiceBusyException,
    TemplateException,
)
from e2b.exceptions import TimeoutException as SdkTimeout

from sandboxd.control.pacing import PoolPacing
from sandboxd.control.plan import Observed, plan
from sandboxd.providers.e2b.errors import (
    COMMAND_OUTPUT_CHARS,
    command_failure,
    describe,
    is_gone,
    is_retryable,
    is_throttle,
)
from sandboxd.providers.e2b.ratelimit import CreateLimiter
from sandboxd.spec import PoolSpec, SpecError, validate_spec


def status_error(status: int) -> SandboxException:
    error = SandboxException(f"{status}: message")
    error.status_code = status
    return error


@pytest.mark.parametrize(
    "error",
    [
        RateLimitException("429"),
        ServiceBusyException("503"),
        status_error(500),
        status_error(502),
        SdkTimeout("slow"),
        httpx.ConnectError("refused"),
        ConnectionError("reset"),
    ],
)
def test_retryable_errors(error):
    assert is_retryable(error)


@pytest.mark.parametrize(
    "error",
    [
        AuthenticationException("401"),
        status_error(400),  # e.g. a timeout over the plan's cap
        status_error(404),  # an unknown template
        TemplateException("old envd"),
        InvalidArgumentException("bad idempotency key"),
    ],
)
def test_permanent_errors(error):
    assert not is_retryable(error)


def test_throttles_and_gone():
    assert is_throttle(RateLimitException("x")) and is_throttle(ServiceBusyException("x"))
    assert not is_throttle(status_error(500))
    assert is_gone(SandboxNotFoundException("gone"))
    assert is_gone(SandboxException("The sandbox i1 was not found"))
    assert not is_gone(status_error(500))


def test_describe_cuts_out_the_key():
    text = describe(AuthenticationException("bad key e2b_secret given"), "e2b_secret")
    assert "e2b_secret" not in text and "AuthenticationException" in text


def test_describe_keeps_every_line_on_one_bounded_line():
    text = describe(
        RuntimeError("first\nsecond secret-value\n\nthird" + "x" * 1000), "secret-value"
    )
    assert text.startswith("RuntimeError: first | second *** | third") and "\n" not in text
    assert len(text) == 500


def test_a_failed_command_says_its_exit_code_and_the_end_of_its_stderr_without_secrets():
    from e2b import CommandExitException

    stderr = "find: '': No such file or directory\n" + "y" * 5000 + "\nleaked tok3n-abcdef\nbye\n"
    exc = CommandExitException(stderr=stderr, stdout="", exit_code=1, error="exit status 1")
    text = command_failure("reset command", exc, "tok3n-abcdef", None, "1")
    assert text.startswith("reset command exited 1: …") and text.endswith("leaked ***\nbye")
    assert len(text) <= COMMAND_OUTPUT_CHARS + 30 and "tok3n" not in text
    quiet = CommandExitException(stderr="", stdout="", exit_code=3, error=None)
    assert command_failure("reset command", quiet) == "reset command exited 3"
    assert command_failure("x", OSError("down")) == "OSError: down"


def test_e2b_settings_are_only_for_e2b_pools_and_run_works_on_both_providers():
    with pytest.raises(SpecError, match=r"e2b: settings only apply"):
        validate_spec({"name": "a", "e2b": {"timeout_s": 60}}, PoolSpec)
    run = {"command": "python3 -u bot.py", "files": {"bot.py": "print(1)", "lib/x.py": ""}}
    pool = validate_spec({"name": "a", "provider": "e2b", "run": run}, PoolSpec)
    assert pool.run is not None and pool.run.files["lib/x.py"] == ""
    for bad in ("/etc/passwd", "../up", "a//b", "a/../../b", ""):
        with pytest.raises(SpecError, match=r"relative path below"):
            validate_spec({"name": "a", "run": {"command": "x", "files": {bad: ""}}}, PoolSpec)
    big = {"command": "x", "files": {"a": "x" * 200_000, "b": "x" * 100_000}}
    with pytest.raises(SpecError, match=r"more than 262144"):
        validate_spec({"name": "a", "run": big}, PoolSpec)
    with pytest.raises(SpecError, match=r"keepalive"):
        validate_spec({"name": "a", "provider": "e2b", "e2b": {"keepalive": "x"}}, PoolSpec)


def test_recycling_pools_age_out_at_half_the_e2b_timeout():
    extend = PoolSpec(name="a", provider="e2b", e2b={"timeout_s": 300})
    recycle = PoolSpec(name="b", provider="e2b", e2b={"timeout_s": 300, "keepalive": "recycle"})
    assert extend.recycle_after_s() is None
    assert recycle.recycle_after_s() == 150
    assert recycle.model_copy(update={"idle_ttl_s": 100}).recycle_after_s() == 100


def test_pools_of_a_provider_share_its_remaining_concurrency():
    pools = [
        PoolSpec(name="a", provider="e2b", min_ready=5, max_total=5),
        PoolSpec(name="b", provider="e2b", min_ready=5, max_total=5),
        PoolSpec(name="c", min_ready=2, max_total=2),
    ]
    observed = [Observed("x", "a", "ready", 0.0)]
    plans = {
        p.pool: p
        for p in plan(pools, observed, create_slots=50, now=1.0, provider_slots={"e2b": 3})
    }
    assert plans["a"].create + plans["b"].create == 3
    assert plans["b"].create >= 1  # round-robin: one pool cannot take it all
    assert plans["c"].create == 2  # other providers are not capped


def test_a_pool_fails_after_two_permanent_errors_in_a_row_and_a_new_spec_clears_it():
    spec = PoolSpec(name="a", provider="e2b")
    pacing = PoolPacing(spec)
    pacing.attempt_failed("401", 0.0, permanent=True)
    assert not pacing.failed
    pacing.attempt_failed("429", 1.0, permanent=False)  # a retryable one breaks the row
    pacing.attempt_failed("401", 2.0, permanent=True)
    assert not pacing.failed
    pacing.attempt_failed("401", 3.0, permanent=True)
    assert pacing.failed == "401" and pacing.limit(100.0) == 0
    assert pacing.status(100.0)["state"] == "failed"
    pacing.reconfigure(spec)  # the same spec: still failed
    assert pacing.failed
    pacing.reconfigure(spec.model_copy(update={"template": "fixed"}))
    assert not pacing.failed and pacing.limit(100.0) >= 1


async def test_the_limiter_paces_creates_and_pauses_longer_after_each_throttle():
    limiter = CreateLimiter(per_s=20, burst=2)
    started = time.monotonic()
    for _ in range(6):
        await limiter.acquire()
    # 2 at once, then 20/s: 4 more take at least ~0.2 s.
    assert time.monotonic() - started >= 0.15
    assert limiter.throttled() == 1.0 and limiter.throttled() == 2.0
    assert limiter.paused_for() > 1.0
    limiter.succeeded()
    assert limiter.throttled() == 1.0
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await limiter.acquire()  # still paused
