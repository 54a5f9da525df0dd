"""E2B cloud sandboxes through the official SDK (`AsyncSandbox`), optional extra
`sandboxd[e2b]`.

Each sandbox carries metadata naming it as ours (`sandboxd` = the key prefix, plus our id,
pool, instance and spec revision): the metadata-filtered listing is the source of truth for
adoption, leak checks and liveness. The API key is read once and never logged.

Sandboxes are created `secure`: their envd answers only requests with the sandbox's own
access token. That token, the sandbox's id, envd domain and version are all a claimant gets
(the handle, and the handle's `secrets` entry, which the store keeps apart from it): enough
to run commands and move files in that one sandbox, never the account's API key, so never
to list, create, pause, extend or kill any sandbox. Whatever needs the API (resuming a
paused sandbox on claim, its timeout) the daemon does.
"""

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Collection
from typing import Any

from e2b import AsyncSandbox, CommandExitException, SandboxQuery, SandboxState
from e2b.exceptions import SandboxNotFoundException

from sandboxd.config import E2BProviderConfig
from sandboxd.providers.base import CreateError, Probe, ProviderSandbox, ResetError
from sandboxd.providers.e2b import program
from sandboxd.providers.e2b.connection import ACCESS_TOKEN, ENDPOINTS, SECRETS
from sandboxd.providers.e2b.errors import (
    command_failure,
    describe,
    is_gone,
    is_retryable,
    is_throttle,
)
from sandboxd.providers.e2b.ratelimit import CreateLimiter
from sandboxd.spec import HealthSpec, PoolSpec

log = logging.getLogger(__name__)

OWNER = "sandboxd"  # metadata key whose value is the daemon's key prefix
ID, POOL, INSTANCE, REVISION = "sandboxd-id", "sandboxd-pool", "sandboxd-instance", "sandboxd-rev"
LIST_PAGE = 100


class E2BProvider:
    name = "e2b"
    gone_reason = "lost"  # a sandbox E2B no longer has was lost, not crashed

    def __init__(self, config: E2BProviderConfig, *, key_prefix: str, instance: str):
        self._config = config
        self._prefix = key_prefix
        self._instance = instance
        self._key: str | None = None
        self.limiter = CreateLimiter(config.creates_per_s, config.creates_burst)
        self._open: dict[str, AsyncSandbox] = {}  # our id -> connected SDK object
        self._live: set[str] = set()  # our ids E2B has, as far as we know
        self._born: dict[str, float] = {}  # our id -> when we created it (monotonic)
        self._listed_at = -1e9
        self._listing: asyncio.Lock | None = None

    @property
    def isolation(self) -> str:
        return "vm"

    def headroom(self) -> int:
        """Sandboxes the plan still allows (`e2b.max_concurrent`)."""
        return self._config.max_concurrent - len(self._live)

    # -- connection -----------------------------------------------------------------------

    def api_key(self) -> str:
        if self._key is None:
            try:
                self._key = self._config.resolve_api_key()
            except OSError as exc:
                raise CreateError(f"cannot read e2b.api_key_file: {exc}", retryable=False) from None
        if not self._key:
            raise CreateError(
                "no E2B API key (set E2B_API_KEY or e2b.api_key_file)", retryable=False
            )
        return self._key

    def _opts(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "api_key": self.api_key(),
            "request_timeout": self._config.request_timeout_s,
            "retries": self._config.sdk_retries,
        }
        return opts | self._endpoints()

    def _endpoints(self) -> dict[str, str]:
        """Configured endpoints (a self-hosted E2B, the test server); a client configures
        its own (a record's would let a forged record send it elsewhere)."""
        return {n: v for n in ENDPOINTS if (v := getattr(self._config, n)) is not None}

    def _describe(self, exc: BaseException) -> str:
        return describe(exc, self._key)

    def _timeout(self, seconds: float) -> int:
        """Whole seconds, rounded up (a lease's end is never cut short), capped by the plan."""
        return max(1, min(math.ceil(seconds), self._config.max_timeout_s))

    # -- lifecycle ------------------------------------------------------------------------

    async def create(self, sandbox_id: str, pool: PoolSpec, *, revision: int = 0) -> dict[str, Any]:
        settings = pool.e2b_settings
        opts = self._opts()
        await self.limiter.acquire()
        try:
            sandbox = await AsyncSandbox.create(
                template=pool.template,
                timeout=self._timeout(settings.timeout_s),
                metadata={**pool.labels, **self._labels(sandbox_id, pool.name, revision)},
                envs=dict(pool.env),
                allow_internet_access=settings.allow_internet_access,
                secure=True,  # envd wants the sandbox's own token: claimants get only that
                # Our id: a create retried after a lost response returns the same sandbox.
                idempotency_key=sandbox_id,
                **opts,
            )
        except Exception as exc:
            raise self._create_error(exc) from None
        self.limiter.succeeded()
        self._track(sandbox_id, sandbox)
        try:
            if pool.run is not None:
                await program.start(sandbox, pool.run)
            if settings.idle == "pause":
                await self._pause(sandbox_id, sandbox)
        except BaseException as exc:
            await asyncio.shield(self.terminate(sandbox_id, {"e2b_id": sandbox.sandbox_id}))
            if isinstance(exc, program.ProgramError):
                raise CreateError(f"run: {exc}", retryable=exc.retryable) from None
            if isinstance(exc, Exception):
                raise self._create_error(exc) from None
            raise
        handle = self._handle(sandbox, settings.timeout_s, paused=settings.idle == "pause")
        if pool.run is not None:
            handle["run"] = True  # a supervisor runs in it: probes ask it for news
        return handle

    def _labels(self, sandbox_id: str, pool: str, revision: int) -> dict[str, str]:
        return {
            OWNER: self._prefix,
            ID: sandbox_id,
            POOL: pool,
            INSTANCE: self._instance,
            REVISION: str(revision),
        }

    def _create_error(self, exc: Exception) -> CreateError:
        pause = self.limiter.throttled() if is_throttle(exc) else None
        return CreateError(self._describe(exc), retryable=is_retryable(exc), retry_after_s=pause)

    def _handle(self, sandbox: AsyncSandbox, timeout_s: int, *, paused: bool) -> dict[str, Any]:
        """What a claimant needs to reach this sandbox's envd: its id, domain and envd
        version, and in `secrets` (stored apart, returned only to the claim's holder) its
        envd access token. Never the API key."""
        handle: dict[str, Any] = {
            "e2b_id": sandbox.sandbox_id,
            "domain": sandbox.sandbox_domain,
            "envd_version": str(sandbox._envd_version),
            "timeout_s": timeout_s,
            "paused": paused,
            "isolation": "vm",
        }
        token = sandbox._envd_access_token
        if isinstance(token, str) and token:
            handle[SECRETS] = {ACCESS_TOKEN: token}
        return handle

    def _track(self, sandbox_id: str, sandbox: AsyncSandbox) -> None:
        self._open[sandbox_id] = sandbox
        self._live.add(sandbox_id)
        self._born[sandbox_id] = time.monotonic()

    def _forget(self, sandbox_id: str) -> None:
        self._open.pop(sandbox_id, None)
        self._live.discard(sandbox_id)
        self._born.pop(sandbox_id, None)

    async def terminate(self, sandbox_id: str, handle: dict[str, Any]) -> None:
        try:
            await AsyncSandbox.kill(handle["e2b_id"], **self._opts())  # False if already gone
        except Exception as exc:
            raise RuntimeError(self._describe(exc)) from None
        self._forget(sandbox_id)

    async def kill(self, sandbox_id: str, handle: dict[str, Any]) -> None:
        await self.terminate(sandbox_id, handle)

    async def extend(self, sandbox_id: str, handle: dict[str, Any], seconds: float) -> int:
        """Set E2B's timeout to `seconds` from now (capped by the plan); returns it. A
        sandbox of an `idle: pause` pool not known to be running is resumed (`connect`, with
        the timeout): its claimant has no API key to do it."""
        timeout = self._timeout(seconds)
        try:
            if handle.get("paused") and sandbox_id not in self._open:
                self._open[sandbox_id] = await AsyncSandbox.connect(
                    handle["e2b_id"], timeout=timeout, **self._opts()
                )
                return timeout
            await AsyncSandbox.set_timeout(handle["e2b_id"], timeout, **self._opts())
        except Exception as exc:
            if is_gone(exc):
                self._forget(sandbox_id)
            raise RuntimeError(self._describe(exc)) from None
        return timeout

    async def _connected(self, sandbox_id: str, handle: dict[str, Any]) -> AsyncSandbox:
        """The SDK object for a sandbox; connecting resumes a paused one."""
        sandbox = self._open.get(sandbox_id)
        if sandbox is None:
            sandbox = await AsyncSandbox.connect(
                handle["e2b_id"],
                timeout=self._timeout(handle.get("timeout_s", 300)),
                **self._opts(),
            )
            self._open[sandbox_id] = sandbox
        return sandbox

    async def _pause(self, sandbox_id: str, sandbox: AsyncSandbox) -> None:
        await sandbox.pause()
        self._open.pop(sandbox_id, None)  # asleep: only its state is asked about from now

    async def reset(self, sandbox_id: str, handle: dict[str, Any], pool: PoolSpec) -> None:
        """Kill what the last holder left running (the `run:` program's supervisor first),
        run the pool's reset command (as E2B's default user: the sandbox has no TMPDIR),
        start the `run:` program again, pause it again for `idle: pause`. A failure says
        why, with the command's stderr (bounded, secrets cut out)."""
        sandbox: AsyncSandbox | None = None
        try:
            self._open.pop(sandbox_id, None)  # a paused one must be resumed: connect anew
            sandbox = await self._connected(sandbox_id, handle)
            last = 0  # the old program's last number: the new one numbers past it
            if handle.get("run"):
                with contextlib.suppress(Exception):  # gone already: the kills below suffice
                    last = await program.stop(sandbox)
            for process in await sandbox.commands.list():
                await sandbox.commands.kill(process.pid)
            await sandbox.commands.run(pool.reset_command, timeout=60)
            if pool.run is not None:
                await program.start(sandbox, pool.run, after=last)  # afresh, with its files
            if pool.e2b_settings.idle == "pause":
                await self._pause(sandbox_id, sandbox)
        except Exception as exc:
            token = sandbox._envd_access_token if sandbox is not None else None
            secrets = [self._key, token, *pool.env.values()]
            raise ResetError(command_failure("reset command", exc, *secrets)) from None

    # -- health ---------------------------------------------------------------------------

    async def probe(
        self, sandbox_id: str, handle: dict[str, Any], health: HealthSpec | None, since: int
    ) -> Probe:
        started = time.perf_counter()
        try:
            detail = await self._check(sandbox_id, handle, health)
            news = await self._news(sandbox_id, handle, since)
        except Exception as exc:
            gone = is_gone(exc)
            if gone:
                self._forget(sandbox_id)
            return Probe(
                ok=False, alive=not gone, latency_ms=_since(started), detail=self._describe(exc)
            )
        return Probe(
            ok=not detail, alive=True, latency_ms=_since(started), detail=detail, program=news
        )

    async def _news(
        self, sandbox_id: str, handle: dict[str, Any], since: int
    ) -> dict[str, Any] | None:
        """The `run:` program's status and news after `since`, read from its supervisor's
        journal through envd (None: no program, or a paused sandbox, frozen with it)."""
        sandbox = self._open.get(sandbox_id)
        if not handle.get("run") or sandbox is None:
            return None
        try:
            out = await program.run_bounded(
                sandbox, program.read_command(since), timeout=self._config.request_timeout_s
            )
            return program.news(out, since)
        except (CommandExitException, program.OutputTooLarge, ValueError) as exc:
            raise program.ProgramError(f"the program's news is unreadable: {exc}") from None

    async def _check(
        self, sandbox_id: str, handle: dict[str, Any], health: HealthSpec | None
    ) -> str:
        """'' when healthy, else why not. Sandboxes of `idle: pause` pools are only asked
        about, never woken or connected to: once a claimant has resumed one, connecting here
        would reset the timeout its lease set."""
        if handle.get("paused") and sandbox_id not in self._open:
            await AsyncSandbox.get_info(handle["e2b_id"], **self._opts())  # raises if gone
            return ""
        sandbox = await self._connected(sandbox_id, handle)
        timeout = health.timeout_s if health else 10.0
        if not await sandbox.is_running(request_timeout=timeout):
            self._forget(sandbox_id)
            raise SandboxNotFoundException(f"sandbox {handle['e2b_id']} was not found")
        if health is None or health.command is None:
            return ""
        try:
            await sandbox.commands.run(health.command, timeout=timeout, request_timeout=timeout)
        except CommandExitException as exc:
            return f"probe exited {exc.exit_code}: {(exc.stderr or exc.stdout).strip()[-200:]}"
        return ""

    async def is_alive(self, sandbox_id: str, handle: dict[str, Any]) -> bool:
        """From the metadata listing, at most `list_interval_s` old: one API call for all."""
        return not await self.gone_among((sandbox_id,))

    async def gone_among(self, sandbox_ids: Collection[str]) -> set[str]:
        """Those not in the metadata listing (at most `list_interval_s` old) and not made
        since it was taken; none while the listing fails (an API outage is not the loss of
        every sandbox)."""
        if time.monotonic() - self._listed_at > self._config.list_interval_s:
            try:
                await self.list_sandboxes()
            except Exception as exc:
                log.warning("e2b listing failed: %s", self._describe(exc))
                return set()
        live, born, listed_at = self._live, self._born, self._listed_at
        return {i for i in sandbox_ids if i not in live and not born.get(i, listed_at) > listed_at}

    def configured(self) -> bool:
        """A key is set (not necessarily valid); without one nothing can be ours."""
        try:
            return bool(self._key or self._config.resolve_api_key())
        except OSError:
            return True  # a key file is named: listing will report why it cannot be read

    async def list_sandboxes(self) -> list[ProviderSandbox]:
        if not self.configured():
            return []
        if self._listing is None:
            self._listing = asyncio.Lock()
        async with self._listing:
            began = time.monotonic()
            found = await self._list_all()
            self._listed_at = began
            self._live = {sb.id for sb in found} | {
                sid for sid, born in self._born.items() if born > began
            }
            return found

    async def _list_all(self) -> list[ProviderSandbox]:
        paginator = AsyncSandbox.list(
            query=SandboxQuery(
                metadata={OWNER: self._prefix},
                state=[SandboxState.RUNNING, SandboxState.PAUSED],
            ),
            limit=LIST_PAGE,
            **self._opts(),
        )
        found = []
        while paginator.has_next:
            for info in await paginator.next_items():
                meta = info.metadata or {}
                found.append(
                    ProviderSandbox(
                        id=meta.get(ID) or f"e2b-{info.sandbox_id}",
                        pool=meta.get(POOL, ""),
                        handle={
                            "e2b_id": info.sandbox_id,
                            "paused": info.state == SandboxState.PAUSED,
                            "isolation": "vm",
                        },
                    )
                )
        return found

    async def cleanup_leftovers(self, keep: set[str]) -> list[str]:
        return []  # nothing kept on this host


def _since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
