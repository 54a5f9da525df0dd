"""The MQTT bridge (`sandboxd[mqtt]`): every event of the Redis stream, in order, also
published to `<mqtt.prefix>/<pool or _>/<type>` with QoS 1.

The bridge is one more reader of the stream, with its own cursor in Redis (advanced only
once the broker acknowledged): while the broker is away the stream itself is the buffer,
bounded by `mqtt.max_backlog` (older events are skipped, counted, and announced with
`bridge.dropped`); a restart of the daemon loses nothing either. Delivery is at least once:
after a reconnect the unacknowledged batch is sent again (consumers dedupe by event id).
"""

import asyncio
import logging
import random
import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.exceptions import RedisError

from sandboxd.config import Config, MqttConfig
from sandboxd.logs import redact_url, register_secret
from sandboxd.store.events import Event, EventPublisher
from sandboxd.store.eventtail import read_after, stream_end
from sandboxd.store.keys import Keys
from sandboxd.store.loops import survive

log = logging.getLogger(__name__)
BATCH = 100
BLOCK_MS = 1000
BACKOFF_MAX_S = 30.0


def topic(prefix: str, event: Event) -> str:
    return f"{prefix}/{event.pool or '_'}/{event.type}"


class MqttBridge:
    def __init__(self, *, redis: Redis, keys: Keys, config: Config, events: EventPublisher):
        self._redis = redis
        self._keys = keys
        self._config = config
        self._events = events
        self._changed = asyncio.Event()
        self.connected = False
        self.published = 0
        self.dropped = 0

    def reconfigure(self) -> None:
        """The mqtt settings may have changed (reload): reconnect with the new ones."""
        self._changed.set()

    def stats(self) -> dict[str, Any] | None:
        if self._config.mqtt.url is None:
            return None
        return {
            "connected": int(self.connected),
            "published": self.published,
            "dropped": self.dropped,
        }

    async def held(self) -> str | None:
        """The bridge's cursor while the bridge is on: retention keeps what follows it
        (within events.max_len; the bridge's own bound is mqtt.max_backlog)."""
        if self._config.mqtt.url is None:
            return None
        cursor = await self._redis.get(self._keys.mqtt_cursor)
        return cursor if isinstance(cursor, str) else None

    async def prepare(self) -> None:
        """Before the daemon publishes anything: the first start of a bridge begins here."""
        if self._config.mqtt.url is not None:
            await self._cursor()

    async def run(self) -> None:
        while True:
            self._changed.clear()
            settings = self._config.mqtt.model_copy()
            async with asyncio.TaskGroup() as group:
                session = group.create_task(self._bridge(settings)) if settings.url else None
                await self._changed.wait()
                if session is not None:
                    session.cancel()
            self.connected = False

    async def _bridge(self, settings: MqttConfig) -> None:
        """Connect, pump, and on any broker or Redis failure reconnect with jittered backoff."""
        try:
            import aiomqtt  # the optional extra: only needed when mqtt.url is set
        except ImportError:
            log.error("mqtt.url is set but aiomqtt is missing: pip install 'sandboxd[mqtt]'")
            return  # no bridge (the stream still has every event) until the next reload

        delay = 0.0
        while True:
            try:
                async with _client(aiomqtt, settings) as client:
                    assert settings.url is not None
                    self.connected, delay = True, 0.0
                    log.info("MQTT bridge connected", extra={"mqtt_url": redact_url(settings.url)})
                    async with asyncio.TaskGroup() as group:
                        group.create_task(self._pump(client, settings))
                        group.create_task(_until_disconnected(client))
            except* (aiomqtt.MqttError, RedisError, OSError) as group:
                exc = group.exceptions[0]
                if isinstance(exc, RedisError) and not survive(exc):
                    raise
                if self.connected or delay == 0.0:
                    log.warning("MQTT bridge disconnected: %s", exc)
            self.connected = False
            delay = min(BACKOFF_MAX_S, max(0.5, delay * 2))
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _pump(self, client: Any, settings: MqttConfig) -> None:
        stream = self._keys.events
        cursor = await self._cursor()
        full = True  # after a (re)connect the backlog may exceed the bound
        while True:
            if full:
                cursor = await self._skip_overflow(cursor, settings.max_backlog)
            batch = await read_after(self._redis, stream, cursor, count=BATCH, block_ms=BLOCK_MS)
            if not batch:
                full = False
                continue
            await asyncio.gather(
                *(
                    client.publish(topic(settings.prefix, event), event.model_dump_json(), qos=1)
                    for _, event in batch
                    if event is not None
                )
            )
            cursor = batch[-1][0]
            await self._redis.set(self._keys.mqtt_cursor, cursor)
            self.published += len(batch)
            full = len(batch) == BATCH

    async def _cursor(self) -> str:
        """Where the bridge left off; on its very first start, the end of the stream."""
        cursor = await self._redis.get(self._keys.mqtt_cursor)
        if cursor is None:
            cursor = await stream_end(self._redis, self._keys.events)
            await self._redis.set(self._keys.mqtt_cursor, cursor, nx=True)
        return cursor

    async def _skip_overflow(self, cursor: str, bound: int) -> str:
        """Keep at most `bound` pending events: skip older ones, count and announce them."""
        stream = self._keys.events
        newest = await self._redis.xrevrange(stream, "+", f"({cursor}", count=bound + 1)
        if len(newest) <= bound:
            return cursor
        skip_to = newest[-1][0]
        dropped, first = 0, None
        start = f"({cursor}"
        while page := await self._redis.xrange(stream, start, skip_to, count=1000):
            first = first or page[0][0]
            dropped += len(page)
            start = f"({page[-1][0]}"
        await self._redis.set(self._keys.mqtt_cursor, skip_to)
        self.dropped += dropped
        log.warning("MQTT bridge backlog over %d events: %d dropped", bound, dropped)
        await self._events.publish(
            "bridge.dropped", dropped=dropped, first_id=first, last_id=skip_to
        )
        return skip_to


async def _until_disconnected(client: Any) -> None:
    """We subscribe to nothing: the message iterator only ends, raising, on a disconnect —
    noticed at once even while no event is being published."""
    async for _ in client.messages:
        pass


def _client(aiomqtt: Any, settings: MqttConfig) -> Any:
    assert settings.url is not None
    url = urlsplit(settings.url)
    secure = url.scheme == "mqtts"
    password = settings.resolve_password() or url.password
    register_secret(password)
    tls = None
    if secure:
        tls = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    return aiomqtt.Client(
        hostname=url.hostname or "localhost",
        port=url.port or (8883 if secure else 1883),
        username=settings.username or url.username,
        password=password,
        identifier=settings.client_id or f"sandboxd-{socket.gethostname()}",
        tls_context=tls,
        keepalive=30,
        timeout=10,
    )
