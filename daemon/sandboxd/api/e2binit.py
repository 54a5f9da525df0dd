"""A claim's `envVars` for a warm E2B sandbox: set through the sandbox's own envd, as E2B's
orchestrator sets a new sandbox's (envd's `POST /init`: `{"envVars", "accessToken"}`, the
access token it already has, so nothing else changes). envd adds them to the environment
of every command started after, under a command's own `envs`. The sandbox serves this one
claim only (the API serves e2b pools with `reuse: never`), so they end with it.

envd is reached as the SDK reaches it: `sandbox_url` (self-hosted E2B, a test server) with
the sandbox named in headers, else `https://49983-<id>.<domain>`. The id comes from a
record (Redis is input): it must look like an E2B id before it goes into a host name, and
the domain is this server's configuration, never a record's, so a damaged record cannot
send a claim's environment (or its token) anywhere else.
"""

import asyncio
import re
from http.cookiejar import DefaultCookiePolicy
from typing import Any

import httpx

ENVD_PORT = 49983  # envd's, in every E2B sandbox (and sandboxd's envd for local ones)
DEFAULT_DOMAIN = "e2b.app"
TIMEOUT_S = 10.0
E2B_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")


class InitFailed(Exception):
    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable  # a retry may succeed (envd unreachable or busy)


def client(**options: Any) -> httpx.AsyncClient:
    """A client that keeps no cookies: one envd's answer must not reach another's."""
    http = httpx.AsyncClient(follow_redirects=False, **options)
    http.cookies.jar.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    return http


def envd_url(e2b_id: str, *, sandbox_url: str | None, domain: str | None) -> str:
    if not E2B_ID.fullmatch(e2b_id):
        raise InitFailed(f"{e2b_id[:40]!r} is not an E2B sandbox id")
    if sandbox_url:
        return sandbox_url.rstrip("/")
    return f"https://{ENVD_PORT}-{e2b_id}.{domain or DEFAULT_DOMAIN}"


async def set_env_vars(
    http: httpx.AsyncClient,
    e2b_id: str,
    token: str,
    env_vars: dict[str, str],
    *,
    sandbox_url: str | None,
    domain: str | None,
) -> None:
    """Raises InitFailed (its message safe to show: no token, no values) unless envd took
    them, within TIMEOUT_S in all (its answer's body is never read)."""
    url = envd_url(e2b_id, sandbox_url=sandbox_url, domain=domain) + "/init"
    if len(token) > 512 or not (token.isascii() and token.isprintable()):
        raise InitFailed(f"sandbox {e2b_id}'s envd access token is not one")
    headers = {"E2b-Sandbox-Id": e2b_id, "E2b-Sandbox-Port": str(ENVD_PORT)}
    body: dict[str, object] = {"envVars": env_vars}
    if token:  # the one it has (envd keeps it); none: envd has none, and keeps none
        headers["X-Access-Token"] = token
        body["accessToken"] = token
    try:
        async with asyncio.timeout(TIMEOUT_S):
            async with http.stream("POST", url, json=body, headers=headers) as answer:
                status = answer.status_code
    except (httpx.HTTPError, httpx.InvalidURL, TimeoutError) as exc:
        raise InitFailed(
            f"envd of sandbox {e2b_id} not reached: {type(exc).__name__}", retryable=True
        ) from None
    if status // 100 != 2:
        raise InitFailed(
            f"envd of sandbox {e2b_id} answered {status}",
            retryable=status == 429 or status >= 500,
        )
