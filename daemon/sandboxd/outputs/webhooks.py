"""Signed webhooks (`[[webhooks]]` in the config): every matching event POSTed as JSON to
the webhook's URL, signed the Standard Webhooks way, at least once, in order per pool.

Each webhook reads the stream through its own consumer group `webhook.<name>`, registered
like any consumer's, so the stream is kept for it while its receiver is down (up to the hard
bound). An event is acknowledged only once delivered or dead-lettered, so a restart of the
daemon sends what was in flight again (receivers dedupe by `webhook-id`). Events of one pool
go one after the other; pools go side by side. A delivery the receiver answers with 5xx,
408 or 429 (or lets time out) is retried with exponential backoff and jitter, honouring
`Retry-After`, up to `retry.attempts`; a receiver that cannot be reached at all is retried
for `retry.unreachable_s`; another answer (4xx, a redirect) is final. Then the event goes
to the dead-letter stream `<prefix>:webhooks:<name>:dead` with the reason;
`sandboxd webhooks redeliver` queues dead entries to be sent again.

The secret never leaves the process: it is registered with the log scrubber and appears in
no event, status or error; what is sent is only its HMAC.
"""

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import random
import time
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from sandboxd import __version__
from sandboxd.config import WebhookConfig
from sandboxd.logs import redact_url, register_secret
from sandboxd.store.consumers import STREAM_ID, ConsumerRegistry, check_consumer
from sandboxd.store.events import Event
from sandboxd.store.eventtail import parse_entry
from sandboxd.store.groupread import TRANSIENT, Filter, GroupReader
from sandboxd.store.keys import Keys
from sandboxd.store.loops import survive

log = logging.getLogger(__name__)
# httpx logs every request at INFO: one journal line per delivery. Failures are ours to log.
logging.getLogger("httpx").setLevel(logging.WARNING)
BATCH = 100
BLOCK_MS = 1000
CLAIM_IDLE_S = 60.0
DEAD_MAXLEN = 10_000
REASON_CHARS = 300
EVENT_FIELDS = ("id", "type", "time", "pool", "sandbox", "data")


def group_name(webhook: str) -> str:
    return f"webhook.{webhook}"


def signing_key(secret: str) -> bytes:
    """Standard Webhooks: `whsec_<base64>` is the key's base64; any other secret is used as
    its UTF-8 bytes."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except (binascii.Error, ValueError):
            pass
    return secret.encode()


def sign(key: bytes, msg_id: str, timestamp: str, body: bytes) -> str:
    """The `webhook-signature` header: `v1,<base64 of HMAC-SHA256(id.timestamp.body)>`."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def retry_after_s(value: str | None) -> float | None:
    """`Retry-After` as seconds (a number or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()[:64]
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


class _Retryable(Exception):
    """The receiver answered with an error worth retrying, or timed out."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Unreachable(_Retryable):
    """The receiver could not be reached at all (down, no route)."""


class _Final(Exception):
    """An answer that retrying cannot change (4xx but 408 and 429, a redirect)."""


class _Attempts:
    """One event's delivery: tenacity's stop and wait, from what the attempts met."""

    def __init__(self, config: WebhookConfig):
        self.retry = config.retry
        self.answered = 0  # failures the receiver answered (or timed out on)
        self.tries = 0
        self.unreachable_since: float | None = None
        self.last = ""

    def note(self, exc: _Retryable) -> None:
        self.tries += 1
        self.last = exc.reason
        if isinstance(exc, _Unreachable):
            if self.unreachable_since is None:
                self.unreachable_since = time.monotonic()
        else:
            self.answered += 1
            self.unreachable_since = None

    def stop(self, state: RetryCallState) -> bool:
        if self.answered >= self.retry.attempts:
            return True
        since = self.unreachable_since
        return since is not None and time.monotonic() - since >= self.retry.unreachable_s

    def wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return min(exc.retry_after, self.retry.retry_after_max_s)
        base = min(self.retry.max_s, self.retry.initial_s * 2 ** max(0, self.tries - 1))
        return base / 2 + random.uniform(0, base / 2)  # "equal jitter": never ~0


class WebhookSender:
    """One webhook: its consumer group, its deliveries, its dead letters."""

    def __init__(
        self,
        *,
        redis: Redis,
        keys: Keys,
        config: WebhookConfig,
        consumer: str,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self._redis = redis
        self._keys = keys
        self.config = config
        self.group = group_name(config.name)
        self._consumer = check_consumer(consumer)
        secret = config.resolve_secret()
        register_secret(secret)
        self._key = signing_key(secret)
        self._filter = Filter(config.types, config.pools)
        self._transport = transport
        self.delivered = 0
        self.failed_attempts = 0
        self.dead = 0
        self.last_error = ""
        self._failing = False  # logged when deliveries start and stop failing, not per try

    def stats(self) -> dict[str, Any]:
        return {
            "url": redact_url(self.config.url),
            "group": self.group,
            "delivered": self.delivered,
            "failed_attempts": self.failed_attempts,
            "dead": self.dead,
            "last_error": self.last_error,
        }

    async def prepare(self) -> None:
        """Register the webhook's group (it holds retention from now on)."""
        start = "0" if self.config.start == "all" else "$"
        await ConsumerRegistry(self._redis, self._keys).add(self.group, start=start, by="daemon")

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(
            timeout=self.config.timeout_s,
            follow_redirects=False,
            limits=limits,
            transport=self._transport,
            headers={"user-agent": f"sandboxd/{__version__}"},
        ) as http:
            reader = GroupReader(
                self._redis,
                self._keys.events,
                self.group,
                self._consumer,
                BATCH,
                BLOCK_MS,
                int(CLAIM_IDLE_S * 1000),
            )
            while True:
                try:
                    await self._redeliveries(http)
                    batch = await reader.next_batch()
                except RedisError as exc:
                    if "NOGROUP" in str(exc):
                        await self.prepare()  # the group (or the stream) was deleted
                        reader.restart()
                        continue
                    if "WRONGTYPE" in str(exc) and await self._repair():
                        continue
                    if not isinstance(exc, TRANSIENT) or not survive(exc):
                        raise
                    await reader.backoff(exc)
                    continue
                await self._deliver_batch(http, reader, batch)

    async def _deliver_batch(
        self, http: httpx.AsyncClient, reader: GroupReader, batch: list[Any]
    ) -> None:
        skipped: list[str] = []
        by_pool: dict[str, list[tuple[str, Event]]] = {}
        for entry_id, fields in batch:
            event = parse_entry(entry_id, fields) if fields else None
            if event is None or not self._filter(event):
                skipped.append(entry_id)
            else:
                by_pool.setdefault(event.pool, []).append((entry_id, event))
        if skipped:
            await reader.ack(skipped)
        async with asyncio.TaskGroup() as group:
            for entries in by_pool.values():
                group.create_task(self._deliver_in_order(http, reader, entries))

    async def _deliver_in_order(
        self, http: httpx.AsyncClient, reader: GroupReader, entries: list[tuple[str, Event]]
    ) -> None:
        for entry_id, event in entries:
            ok, reason, tries = await self.deliver(http, event)
            if ok:
                await reader.ack([entry_id])
            else:
                await self._bury(entry_id, event, reason, tries, ack=True)

    async def deliver(self, http: httpx.AsyncClient, event: Event) -> tuple[bool, str, int]:
        """Send `event` until it is accepted or the retries are spent: (delivered, the last
        failure, attempts)."""
        body = event.model_dump_json().encode()
        attempts = _Attempts(self.config)
        retrying = AsyncRetrying(
            stop=attempts.stop,
            wait=attempts.wait,
            retry=retry_if_exception_type(_Retryable),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    try:
                        await self._post(http, event.id, body)
                    except _Retryable as exc:
                        attempts.note(exc)
                        self.failed_attempts += 1
                        self.last_error = exc.reason
                        if not self._failing:
                            self._failing = True
                            log.warning(
                                "webhook deliveries failing, retrying with backoff",
                                extra={"webhook": self.config.name, "reason": exc.reason},
                            )
                        raise
        except _Retryable as exc:
            return False, exc.reason, attempts.tries
        except _Final as exc:
            self.failed_attempts += 1
            self.last_error = str(exc)
            return False, str(exc), attempts.tries + 1
        self.delivered += 1
        if self._failing:
            self._failing = False
            log.info("webhook deliveries succeed again", extra={"webhook": self.config.name})
        return True, "", attempts.tries + 1

    async def _post(self, http: httpx.AsyncClient, msg_id: str, body: bytes) -> None:
        timestamp = str(int(time.time()))
        headers = {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": timestamp,
            "webhook-signature": sign(self._key, msg_id, timestamp, body),
        }
        try:
            async with http.stream("POST", self.config.url, content=body, headers=headers) as r:
                status, after = r.status_code, r.headers.get("retry-after")
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise _Unreachable(f"unreachable: {type(exc).__name__}: {exc}"[:REASON_CHARS]) from None
        except httpx.TimeoutException as exc:
            raise _Retryable(f"timed out: {type(exc).__name__}") from None
        except httpx.HTTPError as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}"[:REASON_CHARS]) from None
        if 200 <= status < 300:
            return
        if status in (408, 429) or status >= 500:
            raise _Retryable(f"HTTP {status}", retry_after_s(after))
        raise _Final(f"HTTP {status}" + (" (redirects are not followed)" if status < 400 else ""))

    async def _bury(self, entry_id: str, event: Event, reason: str, tries: int, ack: bool) -> None:
        """Into the dead-letter stream (and acknowledged, in one transaction)."""
        self.dead += 1
        log.warning(
            "webhook gave up on an event: dead-lettered",
            extra={"webhook": self.config.name, "event": event.id, "reason": reason},
        )
        fields = {
            **event.to_fields(),
            "stream_id": entry_id,
            "reason": reason[:REASON_CHARS],
            "attempts": str(tries),
            "failed_at": str(int(time.time() * 1000)),
        }
        for attempt in range(2):
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.xadd(
                        self._keys.webhook_dead(self.config.name),
                        fields,
                        maxlen=DEAD_MAXLEN,
                        approximate=True,
                    )
                    if ack:
                        pipe.xack(self._keys.events, self.group, entry_id)
                    await pipe.execute()
                return
            except ResponseError as exc:
                if "WRONGTYPE" not in str(exc) or attempt or not await self._repair():
                    raise

    async def _repair(self) -> bool:
        """Someone wrote a key of the webhook's of another type: deleted (its dead letters
        or queued redeliveries with it), reported. False when none of ours was wrong."""
        repaired = False
        name = self.config.name
        for key, kind in (
            (self._keys.webhook_dead(name), "stream"),
            (self._keys.webhook_redeliver(name), "list"),
        ):
            found = await self._redis.type(key)
            if found not in ("none", kind):
                log.error("%s holds a %s, not a %s: deleted", key, found, kind)
                await self._redis.delete(key)
                repaired = True
        return repaired

    async def _redeliveries(self, http: httpx.AsyncClient) -> None:
        """Dead entries queued by `sandboxd webhooks redeliver`: sent again (in the order
        queued); delivered ones leave the dead-letter stream, others stay with the new
        reason."""
        dead = self._keys.webhook_dead(self.config.name)
        while ids := await self._redis.lpop(self._keys.webhook_redeliver(self.config.name), 100):
            for dead_id in ids:
                if not isinstance(dead_id, str) or not STREAM_ID.match(dead_id):
                    log.warning("skipping a redelivery request that is not a stream id")
                    continue
                entries = await self._redis.xrange(dead, dead_id, dead_id)
                if not entries:
                    continue  # delivered meanwhile, or trimmed
                fields = entries[0][1]
                event = parse_entry(dead_id, {k: v for k, v in fields.items() if k in EVENT_FIELDS})
                if event is None:
                    await self._redis.xdel(dead, dead_id)
                    continue
                ok, reason, tries = await self.deliver(http, event)
                if not ok:
                    await self._bury(str(fields.get("stream_id", "")), event, reason, tries, False)
                await self._redis.xdel(dead, dead_id)


class Webhooks:
    """Every configured webhook, each in a task of its own."""

    def __init__(
        self,
        *,
        redis: Redis,
        keys: Keys,
        configs: list[WebhookConfig],
        consumer: str,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.senders = [
            WebhookSender(redis=redis, keys=keys, config=c, consumer=consumer, transport=transport)
            for c in configs
        ]

    async def prepare(self) -> None:
        for sender in self.senders:
            await sender.prepare()

    async def run(self) -> None:
        if not self.senders:
            await asyncio.Event().wait()  # nothing to do: wait to be cancelled
        async with asyncio.TaskGroup() as group:
            for sender in self.senders:
                group.create_task(sender.run(), name=f"webhook-{sender.config.name}")

    def stats(self) -> dict[str, dict[str, Any]]:
        return {s.config.name: s.stats() for s in self.senders}
