"""What an E2B SDK error means for the daemon: try again later, give up, or the sandbox is
gone. Kept apart from the provider so the rules are tested one by one."""

from collections.abc import Iterable

import httpx
from e2b import CommandExitException
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
MIN_SECRET_CHARS = 6  # shorter values (`1`, `true`) are not cut out: they are everywhere
DESCRIBE_CHARS = 500
COMMAND_OUTPUT_CHARS = 1500


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


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every secret (API key, envd token, a pool's env values) cut out."""
    for secret in sorted({s for s in secrets if s and len(s) >= MIN_SECRET_CHARS}, key=len)[::-1]:
        text = text.replace(secret, "***")
    return text


def describe(exc: BaseException, *secrets: str | None) -> str:
    """One line for events and logs: every line of the error (not only the first), joined,
    at most DESCRIBE_CHARS, with the secrets cut out should they ever appear."""
    lines = [line.strip() for line in f"{type(exc).__name__}: {exc}".splitlines()]
    return _bounded(redact(" | ".join(line for line in lines if line), secrets), DESCRIBE_CHARS)


def command_failure(what: str, exc: BaseException, *secrets: str | None) -> str:
    """Why a command the daemon ran in a sandbox failed, for the event that ends it: its exit
    code and what it wrote to stderr (stdout if nothing), its last COMMAND_OUTPUT_CHARS
    characters (the end says why), lines kept, secrets cut out."""
    if not isinstance(exc, CommandExitException):
        return describe(exc, *secrets)
    output = redact((exc.stderr or exc.stdout or "").strip(), secrets)
    if len(output) > COMMAND_OUTPUT_CHARS:
        output = "…" + output[-COMMAND_OUTPUT_CHARS:]
    return f"{what} exited {exc.exit_code}" + (f": {output}" if output else "")


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
