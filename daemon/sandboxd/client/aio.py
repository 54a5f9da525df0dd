"""The client library: claim a warm sandbox, use it, give it back.

    async with Client.from_url("redis://127.0.0.1:6379/0") as client:
        async with client.claim("default", lease_s=60) as sandbox:
            result = await sandbox.exec(["python3", "-c", "print(6*7)"])

Everything goes through Redis (claims.py) and, for exec and files, straight to the
sandbox (connections.py); the daemon is never asked. `syncclient.SyncClient` wraps this.
"""

import asyncio
import contextlib
import getpass
import os
import secrets
import socket
from collections.abc import AsyncGenerator, Generator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from redis.asyncio import Redis
from redis.exceptions import RedisError

from sandboxd.client.connections import Connection, connect
from sandboxd.client.consume import read_group
from sandboxd.providers.base import ExecResult, OutputCallback
from sandboxd.store.claims import (
    ClaimError,
    ClaimOutcome,
    ClaimStore,
    check_claimant,
    check_lease,
    new_claim_token,
    token_matches,
)
from sandboxd.store.connection import open_redis
from sandboxd.store.events import Event
from sandboxd.store.keys import Keys
from sandboxd.store.records import Claimed, SandboxRecord

DEFAULT_WAIT_S = 30.0
# Pub/sub messages can be lost (reconnects), so a waiter also retries at this interval.
RECHECK_S = 1.0
GIVE_BACK_ATTEMPTS = 6  # ~3 s with backoff: long enough to follow a Sentinel failover

__all__ = ["ClaimError", "ClaimTimeout", "Client", "Event", "ExecResult", "Sandbox"]


class ClaimTimeout(ClaimError):
    """No ready sandbox came within the wait."""


def default_owner() -> str:
    """user@host:pid, cut to what a claimant may be (200 bytes of printable UTF-8)."""
    with contextlib.suppress(Exception):
        owner = f"{getpass.getuser()}@{socket.gethostname()}"
        cut = "".join(c for c in owner if c.isprintable()).encode()[:180]
        return f"{cut.decode(errors='ignore')}:{os.getpid()}"
    return f"pid-{os.getpid()}"


@dataclass
class Sandbox:
    """A claimed sandbox. Use it as an async context manager to release it on exit.

    `claim_token` is the claim's secret: renew, release and attach need it. Keep it out of
    logs and command lines; it is left out of `repr`. `connection_info` is the record's
    handle (for e2b: `e2b_id`, `domain`, `envd_version`); the secrets that go with it (e2b:
    envd's access token to this one sandbox) are kept privately, for `exec`, `write` and
    `read` (`access_secrets()` gives them, e.g. to use the e2b SDK directly)."""

    id: str
    pool: str
    provider: str
    claim_id: str
    claimant: str
    lease_s: int
    lease_expires_ms: int
    connection_info: dict[str, Any]
    claim_token: str = field(repr=False)
    _client: "Client" = field(repr=False)
    _connection: Connection | None = field(default=None, repr=False)
    _secrets: dict[str, str] = field(default_factory=dict, repr=False)

    def access_secrets(self) -> dict[str, str]:
        """What reaches this sandbox besides `connection_info` (e2b: `envd_access_token`).
        As secret as the claim token, and valid for as long as the sandbox lives."""
        return dict(self._secrets)

    @property
    def lease_expires(self) -> datetime:
        return datetime.fromtimestamp(self.lease_expires_ms / 1000, UTC)

    def _conn(self) -> Connection:
        if self._connection is None:
            self._connection = connect(
                self.provider,
                self.connection_info,
                sandbox_id=self.id,
                credentials=self._client.credentials,
                endpoints=self._client.endpoints,
                secrets=self._secrets,
            )
        return self._connection

    async def exec(
        self,
        command: list[str] | str,
        *,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult:
        """Run argv (a list) or a shell string; output also streams to the callbacks."""
        return await self._conn().exec(
            command,
            env=env,
            cwd=cwd,
            timeout=timeout,
            stdin=stdin,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
        )

    async def write(self, path: str, data: bytes | str, mode: int | None = None) -> None:
        """Relative paths are inside the sandbox's home (/workspace)."""
        await self._conn().write(path, data.encode() if isinstance(data, str) else data, mode)

    async def read(self, path: str) -> bytes:
        return await self._conn().read(path)

    async def renew(self, lease_s: int | None = None) -> datetime:
        """Extend the lease from now (by `lease_s`, default the claim's lease)."""
        self.lease_expires_ms = await self._client.renew(self.id, self.claim_token, lease_s)
        return self.lease_expires

    async def release(self) -> None:
        await self._client.release(self.id, self.claim_token)

    async def __aenter__(self) -> "Sandbox":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await _release_quietly(self)


async def _release_quietly(sandbox: Sandbox) -> None:
    """Release even while being cancelled (Ctrl-C); a lost lease is nothing to release."""
    with contextlib.suppress(ClaimError):
        await asyncio.shield(sandbox.release())


class ClaimRequest:
    """`await client.claim(...)` gives a Sandbox; `async with client.claim(...)` also
    releases it at the end of the block."""

    def __init__(self, client: "Client", **kwargs: Any):
        self._client = client
        self._kwargs = kwargs
        self._sandbox: Sandbox | None = None

    def __await__(self) -> Generator[Any, None, Sandbox]:
        return self._client._claim(**self._kwargs).__await__()

    async def __aenter__(self) -> Sandbox:
        self._sandbox = await self._client._claim(**self._kwargs)
        return self._sandbox

    async def __aexit__(self, *exc_info: object) -> None:
        if self._sandbox is not None:
            await _release_quietly(self._sandbox)


class Client:
    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = "sandboxd",
        owner: str | None = None,
        default_wait_s: float = DEFAULT_WAIT_S,
        event_stream_maxlen: int = 100_000,
        owns_redis: bool = False,
        credentials: dict[str, str] | None = None,
        endpoints: dict[str, dict[str, str]] | None = None,
        claim_durability: Literal["acknowledged", "replicated"] = "acknowledged",
        replication_timeout_ms: int = 1000,
    ):
        """`claim_durability`: `replicated` waits after each claim until at least one Redis
        replica has it (`WAIT 1 replication_timeout_ms` on the claim's own connection), and
        gives the claim back and raises ClaimError `not_replicated` if none has: a Redis
        failover then cannot lose a claim this client handed out (docs/ha.md).
        `endpoints`: provider name -> its endpoints (e2b: `domain`, `sandbox_url`; else the
        SDK's defaults and E2B_* variables), the client's own: a record's are never used.
        `credentials`: provider name -> a credential for reaching its sandboxes; no provider
        needs one now (an e2b claimant reaches its sandbox with the envd access token its
        claim returns, never with the account's API key)."""
        self._redis = redis
        self._keys = Keys(prefix)
        self._claims = ClaimStore(redis, self._keys, maxlen=event_stream_maxlen)
        self.owner = owner or default_owner()
        self.default_wait_s = default_wait_s
        self._owns_redis = owns_redis
        self.credentials = credentials or {}
        self.endpoints = endpoints or {}
        if claim_durability not in ("acknowledged", "replicated"):
            raise ValueError(f"claim_durability {claim_durability!r}: acknowledged or replicated")
        self.claim_durability = claim_durability
        self.replication_timeout_ms = max(1, int(replication_timeout_ms))
        self._event_stream_maxlen = event_stream_maxlen

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> "Client":
        """A client with its own Redis connection pool (closed by `aclose`)."""
        return cls(open_redis(url), owns_redis=True, **kwargs)

    async def aclose(self) -> None:
        if self._owns_redis:
            await self._redis.aclose()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def claim(
        self,
        pool: str,
        lease_s: int | None = None,
        timeout_s: float | None = None,
        owner: str | None = None,
        *,
        via: str = "",
    ) -> ClaimRequest:
        """Take the oldest ready sandbox of `pool`, waiting up to `timeout_s` (default
        `default_wait_s`; 0 = do not wait) for one. Raises ClaimTimeout, or ClaimError
        for an unknown pool, a lease over the pool's `max_lease_s` or an invalid argument
        (`reason` "invalid_argument"). The Sandbox's `claim_token` proves the claim later.
        `via` says in the record and the claim's events how it was made (`sandboxd api`
        says `api`); like `owner`, it is the claimant's word."""
        return ClaimRequest(
            self, pool=pool, lease_s=lease_s, timeout_s=timeout_s, owner=owner, via=via
        )

    async def renew(self, sandbox_id: str, token: str, lease_s: int | None = None) -> int:
        """Extend the lease of the claim whose `claim_token` this is; the new deadline (ms)."""
        return await self._claims.renew(sandbox_id, token, lease_s)

    async def release(
        self, sandbox_id: str, token: str = "", *, force: bool = False, operator: str | None = None
    ) -> None:
        """Give back the sandbox held by the claim whose `claim_token` this is. `force`
        (operators): release it whoever holds it, without a token; the `sandbox.released`
        event says `forced: true, forced_by: <operator or this client's owner>`."""
        if force:
            await self._claims.force_release(sandbox_id, operator or self.owner)
        else:
            await self._claims.release(sandbox_id, token)

    def events(
        self,
        group: str,
        consumer: str,
        types: Iterable[str] | None = None,
        pools: Iterable[str] | None = None,
        *,
        claim_idle_s: float = 30.0,
        count: int = 100,
        block_ms: int = 1000,
        start: str = "$",
        create: bool = True,
        limit: int | None = None,
    ) -> AsyncGenerator[Event, None]:
        """Events of the stream through consumer group `group` as `consumer`, at least
        once: each is acknowledged only after the loop body for it returned (those of a
        batch in one XACK before the next read, or when the iterator is closed: use
        `contextlib.aclosing` to leave early); an exception or `break` leaves the one
        being handled pending, delivered again. Pending entries of consumers idle
        for `claim_idle_s` are taken over; a lost connection is retried and reading
        resumes where it was. `types` (shell patterns like `sandbox.*`) and `pools` filter
        (the rest is acknowledged unseen). A group that does not exist is created at
        `start` (`$`: new events; `0`: all the stream holds) unless `create` is false.
        Register the group (`sandboxd consumers add`) so that the stream is kept for it
        while it is down. Dedupe by `event.id`; `event.stream_id` is the entry's id.
        `limit`: end after that many events (each acknowledged)."""
        return read_group(
            self._redis,
            self._keys,
            group,
            consumer,
            types=types,
            pools=pools,
            claim_idle_s=claim_idle_s,
            count=count,
            block_ms=block_ms,
            start=start,
            create=create,
            limit=limit,
        )

    async def attach(self, sandbox_id: str, token: str) -> Sandbox:
        """A handle to a sandbox already claimed (e.g. by `sandboxd claim`), for the holder
        of its claim token: any other token (or none) is refused (`not_yours`)."""
        if not token:
            raise ClaimError("not_yours", f"sandbox {sandbox_id}: no claim token given")
        fields = await self._redis.hgetall(self._keys.sandbox(sandbox_id))
        record = SandboxRecord.from_hash(fields) if fields else None
        if record is None or record.state != "claimed":
            state = record.state if record else "gone"
            raise ClaimError("not_claimed", f"sandbox {sandbox_id} is not claimed ({state})")
        if not token_matches(token, fields.get("claim_token_digest", "")):
            raise ClaimError(
                "not_yours", f"sandbox {sandbox_id} is held by another claim (wrong claim token)"
            )
        return self._handle(record, token)

    async def _claim(
        self,
        pool: str,
        lease_s: int | None,
        timeout_s: float | None,
        owner: str | None,
        via: str = "",
    ) -> Sandbox:
        wait_s = self.default_wait_s if timeout_s is None else max(0.0, timeout_s)
        check_lease(lease_s)  # before any waiting: a clear error at once
        check_claimant(owner or self.owner)
        if self.claim_durability == "acknowledged":
            attempt = _Attempt(self._claims, pool, owner or self.owner, lease_s, wait_s, via)
            return self._handle(await self._claimed(attempt), attempt.token)
        async with self._redis.client() as connection:  # WAIT counts this connection's writes
            claims = ClaimStore(connection, self._keys, maxlen=self._event_stream_maxlen)
            attempt = _Attempt(claims, pool, owner or self.owner, lease_s, wait_s, via)
            record = await self._claimed(attempt)
            try:
                replicas = await connection.wait(1, self.replication_timeout_ms)
            except BaseException:
                await asyncio.shield(self._give_back(record.id, attempt.token))
                raise
        if replicas < 1:
            given_back = await asyncio.shield(self._give_back(record.id, attempt.token))
            raise ClaimError(
                "not_replicated",
                f"the claim of {record.id} reached no Redis replica within "
                f"{self.replication_timeout_ms} ms (claim_durability = replicated): "
                + (
                    "given back"
                    if given_back
                    else "could not be given back; it ends with its lease"
                ),
            )
        return self._handle(record, attempt.token)

    async def _claimed(self, attempt: "_Attempt") -> Claimed:
        record = await attempt.once()
        if record is None and attempt.wait_s > 0:
            record = await self._wait(attempt)
        if record is None:
            raise ClaimTimeout(
                "timeout", f"no ready sandbox in pool {attempt.pool!r} within {attempt.wait_s:g}s"
            )
        return record

    async def _give_back(self, sandbox_id: str, token: str) -> bool:
        """Release a claim nobody will hold; retried for a few seconds, since it is needed
        just when the primary failed (the pool follows a failover). False if it could not
        be given back: then the claim ends with its lease."""
        for attempt in range(GIVE_BACK_ATTEMPTS):
            try:
                await self._claims.release(sandbox_id, token)
                return True
            except ClaimError:
                return True  # not claimed (any more) by this token: nothing to give back
            except (RedisError, OSError):
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
        return False

    async def _wait(self, attempt: "_Attempt") -> Claimed | None:
        """Try again each time the pool announces a ready sandbox, until the deadline.

        The deadline only bounds the waiting, never a claim in flight: a claim cut off
        after Redis ran it would hold a sandbox nobody knows about until its lease ends.
        """
        loop = asyncio.get_running_loop()
        try:
            async with self._redis.pubsub() as pubsub:
                await pubsub.subscribe(self._keys.pool_available(attempt.pool))
                while (record := await attempt.once()) is None:
                    left = attempt.deadline - loop.time()
                    if left <= 0:
                        return None
                    await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=min(left, RECHECK_S)
                    )
                return record
        finally:
            if attempt.registered_wait:
                await asyncio.shield(self._claims.cancel_wait(attempt.pool, attempt.claim_id))

    def _handle(self, record: Claimed | SandboxRecord, token: str) -> Sandbox:
        return Sandbox(
            id=record.id,
            pool=record.pool,
            provider=record.provider,
            claim_id=record.claim_id,
            claimant=record.claimant,
            lease_s=record.lease_s,
            lease_expires_ms=record.lease_expires_ms,
            connection_info=record.handle,
            claim_token=token,
            _client=self,
            _secrets=dict(record.secrets),
        )


class _Attempt:
    """One claim's tries: same claim id and token throughout, the wait deadline counting
    down."""

    def __init__(
        self,
        claims: ClaimStore,
        pool: str,
        owner: str,
        lease_s: int | None,
        wait_s: float,
        via: str = "",
    ):
        self._claims = claims
        self.via = via
        self.pool = pool
        self.owner = owner
        self.lease_s = lease_s
        self.wait_s = wait_s
        self.claim_id = secrets.token_hex(16)
        self.token = new_claim_token()
        self.registered_wait = False
        self.deadline = asyncio.get_running_loop().time() + wait_s

    async def once(self) -> Claimed | None:
        """One claim script run. If we are cancelled meanwhile (Ctrl-C), the run is still
        awaited, and whatever it claimed is released before the cancellation goes on."""
        left_ms = int((self.deadline - asyncio.get_running_loop().time()) * 1000)
        call = asyncio.ensure_future(
            self._claims.try_claim(
                self.pool,
                claimant=self.owner,
                claim_id=self.claim_id,
                token=self.token,
                lease_s=self.lease_s,
                wait_ms=max(0, left_ms),
                via=self.via,
            )
        )
        try:
            outcome = await asyncio.shield(call)
        except asyncio.CancelledError:  # given back even if cancelled again meanwhile
            await asyncio.shield(self._give_back_when_done(call))
            raise
        if outcome.on_empty == "create" and left_ms > 0:
            self.registered_wait = True
        return outcome.record

    async def _give_back_when_done(self, call: "asyncio.Future[ClaimOutcome]") -> None:
        with contextlib.suppress(Exception):  # nothing claimed, or Redis gone: lease ends it
            outcome = await call
            if outcome.record is not None:
                await self._claims.release(outcome.record.id, self.token)
