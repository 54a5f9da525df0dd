"""E2B's control plane (the REST API the `e2b` SDK calls) on top of `sandboxd.client`.

Every create is a warm claim of the pool named by `templateID`; the answer carries what the
claim returned for an e2b pool (the real E2B sandbox's id, envd version, envd access
token), so the SDK then talks to that sandbox's envd directly. Errors have E2B's shape
(`{"code", "message"}`) and status, which the SDK turns into its exceptions: 401
AuthenticationException, 404 NotFoundException, 429 RateLimitException. Refusals that
retrying cannot change carry `Should-Retry: false`, so the SDK does not retry them.
"""

import asyncio
import contextlib
import json
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

import httpx
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandboxd.api import e2binit, limits
from sandboxd.api.registry import Entry, Registry
from sandboxd.client import ClaimError, ClaimTimeout, Client
from sandboxd.store.apikeys import ApiKey, ApiKeyStore, secret_sha256
from sandboxd.store.claims import ClaimStore, PoolSettings, new_claim_token
from sandboxd.store.keys import Keys

try:  # envd for local sandboxes needs the e2b package's envd messages (connect-python)
    from sandboxd.api import envd
    from sandboxd.api.envd import ENVD_VERSION, Refused, envd_token, token_digest
    from sandboxd.providers.local.agentclient import AgentError
except ImportError:  # pragma: no cover - the api extra without e2b: e2b pools only
    envd = None  # type: ignore[assignment]
    ENVD_VERSION = ""

log = logging.getLogger("sandboxd.api")

DEFAULT_WAIT_S = 30.0  # the longest a create waits for a ready sandbox of an empty pool
E2B_DOMAINS = ("e2b.app", "e2b.dev")
MAX_METADATA = 64
MAX_METADATA_BYTES = 8192
MAX_ENV_VARS = 256
MAX_ENV_BYTES = 64 * 1024
CLIENT_ID = "sandboxd"
MAX_DECIDED = 1024  # (key, template) pairs whose next create may take the fast path


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        retry: bool | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry = retry
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        headers = {} if self.retry is None else {"Should-Retry": str(self.retry).lower()}
        headers |= self.headers
        return JSONResponse(
            {"code": self.status, "message": self.message}, self.status, headers=headers
        )


def _unauthenticated() -> ApiError:
    return ApiError(401, "Invalid API key (issued by `sandboxd apikey create`)")


@dataclass
class Settings:
    """What the app needs: Redis, the key prefix, how long a create may wait, the E2B
    domain to name in answers (None: the record's when it is one of E2B's), and the local
    provider's registry (`local.workspace_root`), where local sandboxes' agents listen
    (None: local pools are not served)."""

    redis: Redis
    prefix: str = "sandboxd"
    wait_s: float = DEFAULT_WAIT_S
    domain: str | None = None
    client_kwargs: dict[str, Any] | None = None
    local_root: Path | None = None
    e2b_sandbox_url: str | None = None  # E2B's envd, where a claim's envVars are set


@dataclass(frozen=True)
class Decided:
    """What a create of a local pool's sandbox was decided with: the key (and its JSON as
    Redis held it), the pool and its settings' JSON. The next create with the same key and
    template sends them along and its one script checks they are still exactly what Redis
    holds before it claims (`Registry.claim_local`)."""

    key: ApiKey
    pool: str
    settings: PoolSettings
    settings_json: str


class Api:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.redis = settings.redis
        self.keys = Keys(settings.prefix)
        self.apikeys = ApiKeyStore(self.redis, self.keys)
        self.registry = Registry(self.redis, self.keys)
        self.client = Client(self.redis, prefix=settings.prefix, **(settings.client_kwargs or {}))
        self.claims = ClaimStore(
            self.redis,
            self.keys,
            maxlen=(settings.client_kwargs or {}).get("event_stream_maxlen", 100_000),
        )
        # secret digest and template -> what the last create with them decided (LRU)
        self._decided: OrderedDict[tuple[str, str], Decided] = OrderedDict()
        self._http: httpx.AsyncClient | None = None  # to E2B sandboxes' envd: see http
        self.envd = (
            envd.Envd(self.registry, settings.local_root)
            if envd is not None and settings.local_root is not None
            else None
        )

    @property
    def http(self) -> httpx.AsyncClient:
        """A client for E2B sandboxes' envd (a claim's envVars), made when first needed."""
        if self._http is None:
            self._http = e2binit.client()
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    async def authenticate(self, request: Request) -> ApiKey:
        key = await self.apikeys.authenticate(request.headers.get("x-api-key"))
        if key is None:
            raise _unauthenticated()
        return key

    async def pool(self, name: str) -> PoolSettings | None:
        if not 0 < len(name) <= 100:
            return None
        raw = await self.redis.hget(self.keys.pools, name)
        return _settings(raw) if raw is not None else None

    async def template(self, name: str) -> tuple[str, PoolSettings] | None:
        """The pool a `templateID` names: the pool of that name, else the one whose
        `e2b_alias` lists it (the spec keeps aliases unique)."""
        settings = await self.pool(name)
        if settings is not None:
            return name, settings
        if not 0 < len(name) <= 100:
            return None
        for pool, raw in (await self.redis.hgetall(self.keys.pools)).items():
            found = _settings(raw)
            if found is not None and name in found.e2b_alias:
                return pool, found
        return None

    # -- create -------------------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        """Authenticated here, not by `endpoint`: the key and the pool its body names are
        read in one round trip. A bad body is said after the key is checked; without a key
        nothing of the body is read."""
        secret = request.headers.get("x-api-key")
        if not secret or len(secret) > 200:
            raise _unauthenticated()
        try:
            body, bad = await _json_object(request), None
        except ApiError as exc:
            body, bad = {}, exc
        template = body.get("templateID")
        digest = secret_sha256(secret)
        decided = None
        if bad is None and isinstance(template, str):
            decided = self._decided.get((digest, template))
            if decided is not None:
                self._decided.move_to_end((digest, template))
        if decided is not None and (made := await self._create_decided(decided, digest, body)):
            return made
        # a name a pool could have: JSON may carry lone surrogates, which Redis cannot take
        named = isinstance(template, str) and 0 < len(template) <= 100 and _utf8(template)
        pool_field = (self.keys.pools, str(template)) if named else None
        key, raw = await self.apikeys.authenticate_and_hget(secret, pool_field)
        if key is None:
            raise _unauthenticated()
        if bad is not None:
            raise bad
        if not isinstance(template, str) or not template:
            raise ApiError(400, "templateID (a pool's name) is required")
        metadata = _metadata(body.get("metadata"))
        env_vars = body.get("envVars") or {}
        named_pool = _settings(raw) if raw is not None else None
        found = (template, named_pool) if named_pool else None
        if found is None and named:
            found = await self.template(template)
        if found is None:
            shown = template.encode("utf-8", "replace").decode()
            raise ApiError(
                404, f"template '{shown}' not found (no sandboxd pool of that name or alias)"
            )
        pool, settings = found
        if not key.may_use(pool):
            raise ApiError(403, f"API key '{key.name}' may not use pool '{pool}'")
        if settings.provider == "local":
            if not self._serves_local():
                raise ApiError(
                    400,
                    f"pool '{pool}' is a local pool: this sandboxd api serves no envd for "
                    "local sandboxes (it must run on their host, with local.workspace_root "
                    "and the e2b package)",
                )
            env_vars = _env_vars(env_vars)
        elif settings.provider != "e2b":
            raise ApiError(
                400, f"pool '{pool}' is a {settings.provider} pool: not served by the E2B API"
            )
        elif settings.reuse == "reset":
            raise ApiError(
                400,
                f"pool '{pool}' is an e2b pool with reuse: reset: an E2B sandbox's envd token "
                "never changes, so one claimant could reach the next one's sandbox; the API "
                "serves e2b pools with reuse: never only",
                retry=False,
            )
        else:
            env_vars = _env_vars(env_vars)
        lease_s = _lease(body.get("timeout"), settings)
        wait_s = await self.apikeys.take_create(key)
        if wait_s:
            raise ApiError(
                429,
                f"API key '{key.name}' may create {key.creates_per_s:g} sandboxes a second: "
                f"try again in {wait_s:g}s",
                retry=False,  # the program decides (the SDK would wait and retry)
                headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
            )
        reservation = await self.registry.reserve(
            key.name, key.max_sandboxes, hold_s=self.settings.wait_s + 30
        )
        if reservation is None:
            raise ApiError(
                429,
                f"API key '{key.name}' holds its maximum of {key.max_sandboxes} sandboxes",
                retry=False,
            )
        try:
            made = await self._claim(
                key, pool, template, settings, lease_s, metadata, reservation, env_vars
            )
        except BaseException:
            await asyncio.shield(self.registry.unreserve(key.name, reservation))
            raise
        if (
            settings.provider == "local"
            and template == pool
            and raw is not None
            and key.max_sandboxes is None
            and key.creates_per_s is None
            and key.stored
            and self.client.claim_durability == "acknowledged"
        ):
            self._decided[(digest, template)] = Decided(key, pool, settings, raw)
            self._decided.move_to_end((digest, template))
            while len(self._decided) > MAX_DECIDED:
                self._decided.popitem(last=False)
        return made

    async def _create_decided(
        self, decided: Decided, digest: str, body: dict[str, Any]
    ) -> Response | None:
        """A create in one round trip (key, settings, claim and mapping in one script), for
        a key and template a create was decided with before. None where the full path must
        decide: anything in the body it would refuse (said after the key's check), the key
        or the pool changed since (`stale`), nothing ready (the full path waits)."""
        try:
            metadata = _metadata(body.get("metadata"))
            env_vars = _env_vars(body.get("envVars") or {})
            lease_s = _lease(body.get("timeout"), decided.settings)
        except ApiError:
            return None
        if not self._serves_local():
            return None
        token = new_claim_token()
        entry = Entry(
            e2b_id="",
            sandbox="",
            claim_id=secrets.token_hex(16),
            key=decided.key.name,
            pool=decided.pool,
            template=decided.pool,
            started_at=_iso(time.time()),
            envd_version=ENVD_VERSION,
            domain=self._domain(None),
            metadata=metadata,
            claim_token=token,
            provider="local",
            envd_token_sha256=token_digest(envd_token(token)),
            env_vars=env_vars,
        )
        call = asyncio.ensure_future(
            self.registry.claim_local(
                self.claims, entry, lease_s, digest, decided.settings_json, decided.key.stored
            )
        )
        try:
            claimed = await asyncio.shield(call)
        except asyncio.CancelledError:  # the claim still ends, and goes back, whatever comes
            await asyncio.shield(self._give_back_when_done(call, entry))
            raise
        except ClaimError as exc:
            if exc.reason != "stale":
                raise _claim_refusal(exc) from None
            if self._decided.get((digest, decided.pool)) is decided:
                del self._decided[(digest, decided.pool)]
            return None
        if claimed is None:
            return None
        log.info(
            "claimed %s of pool %s for key %s",
            entry.sandbox,
            entry.pool,
            entry.key,
            extra={"sandbox": entry.sandbox, "pool": entry.pool, "api_key": entry.key},
        )
        return JSONResponse(self._answer(entry, {}), 201)

    async def _claim(
        self,
        key: ApiKey,
        pool: str,
        template: str,
        settings: PoolSettings,
        lease_s: int,
        metadata: dict[str, str],
        reservation: str,
        env_vars: dict[str, str],
    ) -> Response:
        try:
            sandbox = await self.client.claim(
                pool,
                lease_s=lease_s,
                timeout_s=self.settings.wait_s,
                owner=key.name,
                via="api",
            )
        except ClaimTimeout:
            raise ApiError(
                503,
                f"no ready sandbox in pool '{pool}' within {self.settings.wait_s:g}s "
                f"(on_empty: {settings.on_empty}); try again later",
                retry=False,
            ) from None
        except ClaimError as exc:
            raise _claim_refusal(exc) from None
        info = sandbox.connection_info
        local = settings.provider == "local"
        # A local sandbox's E2B id is its own; envd is this server's, its token made here.
        e2b_id = sandbox.id if local else str(info.get("e2b_id") or "")
        if not e2b_id:  # a record without its E2B id: give it back, say so
            await self.client.release(sandbox.id, sandbox.claim_token)
            raise ApiError(500, f"sandbox {sandbox.id} of pool '{pool}' has no E2B id")
        entry = Entry(
            e2b_id=e2b_id,
            sandbox=sandbox.id,
            claim_id=sandbox.claim_id,
            key=key.name,
            pool=pool,
            template=template,
            started_at=_iso(time.time()),
            envd_version=ENVD_VERSION if local else str(info.get("envd_version") or ""),
            domain=self._domain(None if local else info.get("domain")),
            metadata=metadata,
            claim_token=sandbox.claim_token,
            provider=settings.provider,
            envd_token_sha256=token_digest(envd_token(sandbox.claim_token)) if local else "",
            env_vars=env_vars if local else {},  # an E2B sandbox's envd keeps its own
        )
        if env_vars and not local:
            try:
                await e2binit.set_env_vars(
                    self.http,
                    e2b_id,
                    str(sandbox.access_secrets().get("envd_access_token") or ""),
                    env_vars,
                    sandbox_url=self.settings.e2b_sandbox_url,
                    domain=self.settings.domain,
                )
            except BaseException as exc:  # the sandbox goes back (reuse: never: it ends)
                with contextlib.suppress(ClaimError, RedisError):
                    await asyncio.shield(self.client.release(sandbox.id, sandbox.claim_token))
                if isinstance(exc, e2binit.InitFailed):
                    raise ApiError(502, f"envVars not set: {exc}", retry=exc.retryable) from None
                raise
        try:
            # Listed only if the key is still issued: a revoke while this create waited
            # found no claim of it to end (it ends the claims it finds after deleting the
            # key), so the claim goes back instead.
            if not await self.registry.add(entry, sandbox.lease_s, reservation, key.sha256):
                raise ApiError(401, "Invalid API key (revoked while the create waited)")
        except BaseException as exc:
            await asyncio.shield(self._give_back(entry))
            if isinstance(exc, ClaimError):
                raise _claim_refusal(exc) from None
            raise
        log.info(
            "claimed %s (%s) of pool %s for key %s",
            sandbox.id,
            e2b_id,
            pool,
            key.name,
            extra={"sandbox": sandbox.id, "pool": pool, "api_key": key.name},
        )
        return JSONResponse(self._answer(entry, sandbox.access_secrets()), 201)

    async def _give_back_when_done(self, call: "asyncio.Future[Any]", entry: Entry) -> None:
        """Give back what `call` (a claim) took, once it is done."""
        with contextlib.suppress(Exception):
            if await call is not None:
                await self._give_back(entry)

    async def _give_back(self, entry: Entry) -> None:
        with contextlib.suppress(ClaimError, RedisError):
            await self.client.release(entry.sandbox, entry.claim_token)
        with contextlib.suppress(RedisError):
            await self.registry.remove(entry)

    def _answer(self, entry: Entry, access: dict[str, str]) -> dict[str, Any]:
        """E2B's Sandbox (the answer to create and connect): what the SDK needs to reach
        the sandbox's envd, its access token included."""
        answer = {
            "templateID": entry.pool,
            "sandboxID": entry.e2b_id,
            "clientID": CLIENT_ID,
            "envdVersion": entry.envd_version,
        }
        token = (
            envd_token(entry.claim_token)
            if entry.provider == "local"
            else access.get("envd_access_token")
        )
        if token:
            answer["envdAccessToken"] = token
        if entry.domain:
            answer["domain"] = entry.domain
        return answer

    def _domain(self, recorded: object) -> str:
        """The configured domain, else the record's if it is one of E2B's; else none (the
        SDK then uses its own E2B_DOMAIN / E2B_SANDBOX_URL): a record never sends a client
        anywhere else."""
        if self.settings.domain:
            return self.settings.domain
        if isinstance(recorded, str) and any(
            recorded == d or recorded.endswith("." + d) for d in E2B_DOMAINS
        ):
            return recorded
        return ""

    def _serves_local(self) -> bool:
        """envd for local sandboxes: the e2b package's messages, and the local registry
        here (an API server on another host cannot reach their agents)."""
        root = self.settings.local_root
        return envd is not None and root is not None and root.is_dir()

    # -- one sandbox --------------------------------------------------------------------

    async def mine(self, request: Request, key: ApiKey) -> Entry:
        e2b_id = request.path_params["id"]
        entry = await self.registry.get(e2b_id)
        if entry is None or entry.key != key.name:  # another key's is as good as gone
            raise ApiError(404, f"sandbox '{e2b_id}' not found")
        return entry

    async def detail(self, request: Request, key: ApiKey) -> Response:
        entry = await self.mine(request, key)
        return JSONResponse(_listed(entry) | ({"domain": entry.domain} if entry.domain else {}))

    async def kill(self, request: Request, key: ApiKey) -> Response:
        entry = await self.mine(request, key)
        try:
            await self.client.release(entry.sandbox, entry.claim_token)
        except ClaimError as exc:
            if exc.reason not in ("not_claimed", "not_yours", "expired"):
                raise _claim_refusal(exc) from None
        await self.registry.remove(entry)
        log.info("released %s (%s) for key %s", entry.sandbox, entry.e2b_id, key.name)
        return Response(status_code=204)

    # -- pause, resume, connect -----------------------------------------------------------

    async def pause(self, request: Request, key: ApiKey) -> Response:
        """A local sandbox's pause stops its processes (SIGSTOP); its claim and lease go on.
        envd calls are refused until `connect` (or `resume`) continues them."""
        entry = await self.mine(request, key)
        if entry.provider != "local":
            raise ApiError(
                400,
                f"sandbox '{entry.e2b_id}' is of the e2b pool '{entry.pool}': pausing a claimed "
                "E2B sandbox through sandboxd is not served (the pool's `e2b.idle: pause` "
                "pauses its idle ready sandboxes); kill it to give it back",
                retry=False,
            )
        if entry.paused:
            raise ApiError(409, f"sandbox '{entry.e2b_id}' is already paused")
        await self._freeze(entry, True)
        log.info("paused %s (%s) for key %s", entry.sandbox, entry.e2b_id, key.name)
        return Response(status_code=204)

    async def resume(self, request: Request, key: ApiKey) -> Response:
        """The SDK's older `resume`: 409 for a sandbox that is not paused."""
        body = await _json_object(request) if await request.body() else {}
        entry = await self.mine(request, key)  # after the body: what it acts on is current
        if not entry.paused:
            raise ApiError(409, f"sandbox '{entry.e2b_id}' is already running")
        return await self._reconnect(entry, key, body.get("timeout"))

    async def connect(self, request: Request, key: ApiKey) -> Response:
        """`Sandbox.connect(id)`: the sandbox again (200), resumed first if paused (201);
        `timeout` renews the lease."""
        body = await _json_object(request) if await request.body() else {}
        entry = await self.mine(request, key)  # after the body: what it acts on is current
        return await self._reconnect(entry, key, body.get("timeout"))

    async def _reconnect(self, entry: Entry, key: ApiKey, timeout: object) -> Response:
        resumed = entry.paused
        if resumed:
            await self._freeze(entry, False)
            log.info("resumed %s (%s) for key %s", entry.sandbox, entry.e2b_id, key.name)
        if timeout is not None:
            await self._renew_entry(entry, timeout)
        access: dict[str, str] = {}
        if entry.provider != "local":
            try:
                held = await self.client.attach(entry.sandbox, entry.claim_token)
            except ClaimError:
                raise ApiError(404, f"sandbox '{entry.e2b_id}' not found") from None
            access = held.access_secrets()
        return JSONResponse(self._answer(entry, access), 201 if resumed else 200)

    async def _freeze(self, entry: Entry, stop: bool) -> None:
        if self.envd is None:
            raise ApiError(400, "this sandboxd api serves no local sandboxes")
        try:
            agent = self.envd.agent(entry)
            await (agent.freeze() if stop else agent.thaw())
        except Refused as exc:
            raise ApiError(exc.status, exc.message) from None
        except AgentError as exc:
            raise ApiError(502, f"sandbox '{entry.e2b_id}': {exc}") from None
        await self.registry.set_paused(entry, stop)

    async def set_timeout(self, request: Request, key: ApiKey) -> Response:
        body = await _json_object(request)
        return await self._renew(request, key, body.get("timeout"))

    async def refresh(self, request: Request, key: ApiKey) -> Response:
        body = await _json_object(request) if await request.body() else {}
        return await self._renew(request, key, body.get("duration"))

    async def _renew(self, request: Request, key: ApiKey, seconds: object) -> Response:
        await self._renew_entry(await self.mine(request, key), seconds)
        return Response(status_code=204)

    async def _renew_entry(self, entry: Entry, seconds: object) -> None:
        settings = await self.pool(entry.pool)
        lease_s = _lease(seconds, settings) if settings and seconds else None
        try:
            await self.client.renew(entry.sandbox, entry.claim_token, lease_s)
        except ClaimError as exc:
            if exc.reason in ("not_claimed", "not_yours", "expired"):
                raise ApiError(404, f"sandbox '{entry.e2b_id}' not found") from None
            raise _claim_refusal(exc) from None
        await self.registry.extend(entry, lease_s or (settings.lease_s if settings else 300))

    # -- lists --------------------------------------------------------------------------

    async def list_v1(self, request: Request, key: ApiKey) -> Response:
        entries = await self._filtered(request, key)
        return JSONResponse([_listed(e) for e in entries])

    async def list_v2(self, request: Request, key: ApiKey) -> Response:
        params = request.query_params
        given = ",".join(params.getlist("state")) or "running,paused"  # repeated or a,b
        states = {s for s in given.split(",") if s}
        entries = [e for e in await self._filtered(request, key) if _state(e) in states]
        if params.get("order") == "desc":
            entries.reverse()
        try:
            start = int(params.get("nextToken") or 0)
            limit = int(params.get("limit") or 100)
        except ValueError:
            raise ApiError(400, "nextToken and limit must be integers") from None
        if start < 0 or not 1 <= limit <= 1000:
            raise ApiError(400, "limit must be from 1 to 1000, nextToken 0 or more")
        page = entries[start : start + limit]
        more = start + limit < len(entries)
        headers = {"X-Next-Token": str(start + limit)} if more else {}
        return JSONResponse([_listed(e) for e in page], headers=headers)

    async def _filtered(self, request: Request, key: ApiKey) -> list[Entry]:
        wanted = _metadata_query(request.query_params.get("metadata", ""))
        template = request.query_params.get("template")
        entries = [
            e
            for e in await self.registry.live(key.name)
            if all(e.metadata.get(k) == v for k, v in wanted.items())
            and (not template or template in (e.template, e.pool))
        ]
        return sorted(entries, key=lambda e: (e.started_at, e.e2b_id))


def _state(entry: Entry) -> str:
    return "paused" if entry.paused else "running"


def _settings(raw: str) -> PoolSettings | None:
    try:
        return PoolSettings.model_validate_json(raw)
    except ValidationError:
        return None


def _listed(entry: Entry) -> dict[str, Any]:
    end = entry.lease_expires_ms / 1000 if entry.lease_expires_ms else time.time()
    return {
        "templateID": entry.pool,
        "alias": entry.template,
        "sandboxID": entry.e2b_id,
        "clientID": CLIENT_ID,
        "startedAt": entry.started_at,
        "endAt": _iso(end),
        "cpuCount": 0,
        "memoryMB": 0,
        "diskSizeMB": 0,
        "state": _state(entry),
        "envdVersion": entry.envd_version,
        "metadata": entry.metadata,
    }


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _lease(seconds: object, settings: PoolSettings) -> int:
    """E2B's timeout as the claim's lease: the pool's default when absent, capped by its
    max_lease_s."""
    if seconds is None:
        return settings.lease_s
    if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 1:
        raise ApiError(400, f"timeout must be a whole number of seconds, 1 or more: {seconds!r}")
    return min(seconds, settings.max_lease_s)


def _metadata(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ApiError(400, "metadata must be an object of strings")
    if len(value) > MAX_METADATA or len(json.dumps(value)) > MAX_METADATA_BYTES:
        raise ApiError(400, f"metadata: at most {MAX_METADATA} entries, {MAX_METADATA_BYTES} bytes")
    return dict(value)


def _env_vars(value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\0" not in k + v
        for k, v in value.items()
    ):
        raise ApiError(400, "envVars must be an object of strings (names without '=')")
    if len(value) > MAX_ENV_VARS or len(json.dumps(value)) > MAX_ENV_BYTES:
        raise ApiError(400, f"envVars: at most {MAX_ENV_VARS} entries, {MAX_ENV_BYTES} bytes")
    return dict(value)


def _metadata_query(text: str) -> dict[str, str]:
    """The SDK's `metadata` query: a URL-encoded form of URL-quoted keys and values."""
    return {unquote(k): unquote(v) for k, v in parse_qsl(text, keep_blank_values=True)}


def _claim_refusal(exc: ClaimError) -> ApiError:
    status = {"unknown_pool": 404, "lease_too_long": 400, "invalid_argument": 400}.get(
        exc.reason, 500
    )
    return ApiError(status, str(exc), retry=False if status == 500 else None)


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # not JSON, or nested past what a parser follows
        raise ApiError(400, "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


Handler = Callable[[Api, Request, ApiKey], Awaitable[Response]]

# What a malformed Connect-RPC call makes its library raise (a body that is not the message,
# a field of the wrong type): the client's error, answered as Connect's invalid_argument.
MALFORMED = (ValueError, TypeError, KeyError, UnicodeError)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown paths and methods in E2B's error shape."""
    status = getattr(exc, "status_code", 404)
    message = getattr(exc, "detail", "") or "not found"
    return JSONResponse({"code": status, "message": f"{message}: {request.url.path}"}, status)


async def _rpc_guarded(service: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """A Connect-RPC app whose failures on malformed input are a 400 and one log line, not
    a 500 with a traceback; a client gone mid-call is not an error at all. (The library
    answers such a call with a 500 and then raises: a 500's start is held until its body,
    so it can still be replaced.)"""
    started = False
    held: list[Message] = []

    async def tracking(message: Message) -> None:
        nonlocal started
        if message["type"] == "http.response.start" and message.get("status", 200) >= 500:
            held.append(message)
            return
        if held and message["type"] == "http.response.body" and not message.get("more_body"):
            held.append(message)  # the whole error answer: send it when the call returns
            return
        started = started or message["type"] == "http.response.start"
        for early in held:
            await send(early)
        held.clear()
        await send(message)

    try:
        await service(scope, receive, tracking)
    except ClientDisconnect:
        return
    except MALFORMED as exc:
        log.warning("malformed envd call to %s: %s", scope["path"], type(exc).__name__)
        if not started:
            body = {"code": "invalid_argument", "message": "malformed request"}
            await JSONResponse(body, 400)(scope, receive, send)
        return
    for message in held:  # a 500 of the service's own making, without an exception
        await send(message)


def create_app(settings: Settings, *, close_redis: bool = False) -> ASGIApp:
    """The ASGI app: E2B's control plane, and envd for local sandboxes when
    `settings.local_root` is set. `close_redis`: close `settings.redis` when the app shuts
    down."""
    api = Api(settings)
    envd_routes: list[Route] = []
    rpc: dict[str, ASGIApp] = {}
    if envd is not None and api.envd is not None:
        envd_routes = envd.routes(api.envd)
        rpc = envd.rpc_apps(api.envd)

    def endpoint(handler: Handler | None) -> Callable[[Request], Awaitable[Response]]:
        """`handler` with the request's key; None: a create, which checks its key itself."""

        async def run(request: Request) -> Response:
            try:
                if handler is None:
                    return await api.create(request)
                key = await api.authenticate(request)
                return await handler(api, request, key)
            except (ApiError, limits.BodyTooLarge) as exc:
                return exc.response()
            except RedisError as exc:
                log.warning("Redis: %s", type(exc).__name__)
                return ApiError(503, "sandboxd cannot reach Redis", retry=True).response()

        return run

    def route(path: str, handler: Handler | None, method: str) -> Route:
        return Route(path, endpoint(handler), methods=[method])

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await api.close()
            if close_redis:
                await settings.redis.aclose()

    control = Starlette(
        routes=[
            route("/sandboxes", None, "POST"),  # a create: Api.create
            route("/v2/sandboxes", None, "POST"),
            route("/sandboxes", Api.list_v1, "GET"),
            route("/v2/sandboxes", Api.list_v2, "GET"),
            route("/sandboxes/{id}", Api.detail, "GET"),
            route("/sandboxes/{id}", Api.kill, "DELETE"),
            route("/sandboxes/{id}/timeout", Api.set_timeout, "POST"),
            route("/sandboxes/{id}/refreshes", Api.refresh, "POST"),
            route("/sandboxes/{id}/pause", Api.pause, "POST"),
            route("/sandboxes/{id}/resume", Api.resume, "POST"),
            route("/sandboxes/{id}/connect", Api.connect, "POST"),
            route("/v2/sandboxes/{id}/connect", Api.connect, "POST"),
            *envd_routes,
        ],
        lifespan=lifespan,
        exception_handlers={404: _http_error, 405: _http_error},
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for prefix, service in rpc.items():
                if scope["path"].startswith(prefix):
                    return await _rpc_guarded(service, scope, receive, send)
            limit = limits.limit_for(scope["path"])
            size = limits.declared(scope["headers"])
            if size is not None and not 0 <= size <= limit:
                refusal = (
                    limits.BodyTooLarge(limit).response()
                    if size > limit
                    else ApiError(400, "Content-Length must be a number").response()
                )
                return await refusal(scope, receive, send)
            receive = limits.bounded(receive, limit)
        return await control(scope, receive, send)

    return app
