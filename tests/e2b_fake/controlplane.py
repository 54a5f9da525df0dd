"""E2B's REST API as the SDK uses it: /v2/sandboxes (create, list), /sandboxes/{id} (info,
kill), timeout, pause, and /v2/sandboxes/{id}/connect (which resumes a paused sandbox)."""

import asyncio
import signal
import time
import urllib.parse
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.e2b_fake.state import World

DEFAULT_TIMEOUT_S = 300
DOMAIN = "fake.e2b.local"


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status, headers=headers)


Handler = Callable[[Request, World], Awaitable[Response]]


def endpoint(world: World, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Auth, injected slowness and the request ledger, around every control-plane call."""

    async def run(request: Request) -> Response:
        if world.faults.slow_s:
            await asyncio.sleep(world.faults.slow_s)
        if request.headers.get("x-api-key") != world.account.api_key:
            response: Response = error(401, "Invalid API key")
        else:
            response = await handler(request, world)
        path = request.url.path
        world.ledger.requests.append((time.time(), request.method, path, response.status_code))
        return response

    return run


async def create(request: Request, world: World) -> Response:
    body = await request.json()
    key = request.headers.get("idempotency-key")
    if key and key in world.by_idempotency_key:
        existing = world.sandboxes.get(world.by_idempotency_key[key])
        if existing is not None:
            return JSONResponse(existing.created(DOMAIN), 201)
    faults, account = world.faults, world.account
    if faults.errors_left > 0 and faults.create_errors:
        faults.errors_left -= 1
        status, message, headers = faults.create_errors[0]
        return error(status, message, headers)
    if not account.take_create_token():
        world.ledger.rate_limited += 1
        return error(429, "Rate limit for sandbox creation exceeded", {"Retry-After": "1"})
    if len(world.running()) >= account.max_concurrent:
        return error(429, f"You have reached the maximum of {account.max_concurrent} sandboxes")
    template = body.get("templateID", "")
    if template not in account.templates:
        return error(404, f"template '{template}' not found")
    timeout = int(body.get("timeout", DEFAULT_TIMEOUT_S))
    if timeout > account.max_timeout_s:
        return error(400, f"Timeout {timeout}s exceeds the plan's {account.max_timeout_s}s")
    sandbox = world.new_sandbox(
        template, timeout, body.get("metadata") or {}, body.get("envVars") or {}
    )
    if key:
        world.by_idempotency_key[key] = sandbox.id
    if faults.lose_create_responses > 0:
        faults.lose_create_responses -= 1
        return error(500, "internal error (the sandbox was created, the answer lost)")
    return JSONResponse(sandbox.created(DOMAIN), 201)


def _matches(meta: dict[str, str], wanted: dict[str, str]) -> bool:
    return all(meta.get(k) == v for k, v in wanted.items())


async def list_sandboxes(request: Request, world: World) -> Response:
    params = request.query_params
    wanted = {
        urllib.parse.unquote(k): urllib.parse.unquote(v)
        for k, v in urllib.parse.parse_qsl(params.get("metadata", ""))
    }
    states = set((params.get("state") or "running,paused").split(","))
    found = sorted(
        (s for s in world.sandboxes.values() if s.state in states and _matches(s.metadata, wanted)),
        key=lambda s: (s.started_at, s.id),
    )
    start = int(params.get("nextToken") or 0)
    limit = int(params.get("limit") or 100)
    page = found[start : start + limit]
    headers = {"X-Next-Token": str(start + limit)} if start + limit < len(found) else {}
    return JSONResponse([s.listed() for s in page], headers=headers)


async def info(request: Request, world: World) -> Response:
    sandbox = world.sandboxes.get(request.path_params["id"])
    if sandbox is None:
        return error(404, f"sandbox {request.path_params['id']} not found")
    detail = sandbox.listed() | {"envdAccessToken": sandbox.token, "domain": DOMAIN}
    return JSONResponse(detail)


async def kill(request: Request, world: World) -> Response:
    sandbox = world.remove(request.path_params["id"])
    if sandbox is None:
        return error(404, f"sandbox {request.path_params['id']} not found")
    world.ledger.killed.append(sandbox.id)
    return Response(status_code=204)


async def set_timeout(request: Request, world: World) -> Response:
    sandbox = world.sandboxes.get(request.path_params["id"])
    if sandbox is None:
        return error(404, f"sandbox {request.path_params['id']} not found")
    timeout = int((await request.json())["timeout"])
    if timeout > world.account.max_timeout_s:
        return error(400, f"Timeout {timeout}s exceeds the plan's {world.account.max_timeout_s}s")
    sandbox.end_at = time.time() + timeout
    world.ledger.set_timeouts.append((sandbox.id, timeout))
    return Response(status_code=204)


async def pause(request: Request, world: World) -> Response:
    sandbox = world.sandboxes.get(request.path_params["id"])
    if sandbox is None:
        return error(404, f"sandbox {request.path_params['id']} not found")
    if sandbox.state == "paused":
        return error(409, "sandbox is already paused")
    sandbox.signal_all(signal.SIGSTOP)  # frozen, like a memory snapshot
    sandbox.state = "paused"
    return Response(status_code=204)


async def connect(request: Request, world: World) -> Response:
    sandbox = world.sandboxes.get(request.path_params["id"])
    if sandbox is None:
        return error(404, f"sandbox {request.path_params['id']} not found")
    body = await request.json() if await request.body() else {}
    timeout = int(body.get("timeout") or sandbox.timeout_s)
    if timeout > world.account.max_timeout_s:
        return error(400, f"Timeout {timeout}s exceeds the plan's {world.account.max_timeout_s}s")
    resumed = sandbox.state == "paused"
    if resumed:
        sandbox.signal_all(signal.SIGCONT)
        sandbox.end_at = time.time() + timeout
    else:  # as E2B: a running sandbox's timeout is only ever lengthened by a connect
        sandbox.end_at = max(sandbox.end_at, time.time() + timeout)
    sandbox.state = "running"
    return JSONResponse(sandbox.created(DOMAIN), 201 if resumed else 200)


def routes(world: World) -> list[Route]:
    def route(path: str, handler: Handler, method: str) -> Route:
        return Route(path, endpoint(world, handler), methods=[method])

    return [
        route("/v2/sandboxes", create, "POST"),
        route("/v2/sandboxes", list_sandboxes, "GET"),
        route("/sandboxes/{id}", info, "GET"),
        route("/sandboxes/{id}", kill, "DELETE"),
        route("/sandboxes/{id}/timeout", set_timeout, "POST"),
        route("/sandboxes/{id}/pause", pause, "POST"),
        route("/v2/sandboxes/{id}/connect", connect, "POST"),
    ]
