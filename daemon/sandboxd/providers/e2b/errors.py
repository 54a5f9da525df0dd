"""What an E2B SDK error means for the daemon: try again later, give up, or the sandbox is
gone. Kept apart from the provider so the rules are tested one by one."""

import httpx
from e2b.exceptions import (
    AuthenticationException,
    InvalidArgumentException,
    NotFoundException,
    RateLimitException,
    SandboxException,
    SandboxNotFoundException,
    ServiceBusyException,
    TemplateException,
    is_sandbox_not_found_message,
)
from e2b.exceptions import TimeoutException as SdkTimeout

PERMANENT_STATUS = {400, 401, 403, 404, 422}


def is_throttle(exc: BaseException) -> bool:
    """The provider asks for fewer requests (429) or has no capacity right now (503)."""
    return isinstance(exc, RateLimitException | ServiceBusyException)


def is_retryable(exc: BaseException) -> bool:
    """Retryable: 429, 503, 5xx, timeouts, transport errors. Permanent: a bad API key,
    a bad request (a timeout over the plan's cap), an unknown template."""
    if is_throttle(exc) or isinstance(exc, SdkTimeout):
        return True
    if isinstance(
        exc, AuthenticationException | TemplateException | InvalidArgumentException
    ) or isinstance(exc, NotFoundException):
        return False
    if isinstance(exc, httpx.TransportError | OSError | TimeoutError):
        return True
    status = getattr(exc, "status_code", None)
    if isinstance(exc, SandboxException) and status is not None:
        return status not in PERMANENT_STATUS
    return True


def is_gone(exc: BaseException) -> bool:
    """The sandbox no longer exists on E2B (killed, expired, or never was)."""
    if isinstance(exc, SandboxNotFoundException):
        return True
    return isinstance(exc, SandboxException) and is_sandbox_not_found_message(str(exc))


def describe(exc: BaseException, secret: str | None) -> str:
    """One line for events and logs, with the API key cut out should it ever appear."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
    return text.replace(secret, "***") if secret else text
