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

import re

import httpx

ENVD_PORT = 49983
DEFAULT_DOMAIN = "e2b.app"
TIMEOUT_S = 10.0
E2B_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")


class InitFailed(Exception):
    pass


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
    them."""
    url = envd_url(e2b_id, sandbox_url=sandbox_url, domain=domain) + "/init"
    headers = {"E2b-Sandbox-Id": e2b_id, "E2b-Sandbox-Port": str(ENVD_PORT)}
    body: dict[str, object] = {"envVars": env_vars}
    if token:  # the one it has (envd keeps it); none: envd has none, and keeps none
        headers["X-Access-Token"] = token
        body["accessToken"] = token
    try:
        answer = await http.post(url, json=body, headers=headers, timeout=TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise InitFailed(f"envd of sandbox {e2b_id} not reached: {type(exc).__name__}") from None
    if answer.status_code // 100 != 2:
        raise InitFailed(f"envd of sandbox {e2b_id} answered {answer.status_code}")
