"""Connecting to Redis: URL forms, password handling, waiting for it to come up."""

import asyncio
import logging
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from sandboxd.config import Config
from sandboxd.logs import redact_url, register_secret

log = logging.getLogger(__name__)

# Past this many commands in flight at once, callers queue for a connection instead of
# failing ("Too many connections"): stopping 500 sandboxes at once must not lose any.
MAX_CONNECTIONS = 64
CONNECTION_WAIT_S = 60.0


def open_redis(url: str, **kwargs: Any) -> Redis:
    """A client owning a bounded, queueing connection pool; strings decoded as UTF-8.

    Invalid bytes in a reply become lone surrogates instead of a UnicodeDecodeError inside
    the client (anyone can write anything into Redis): `decode.text` reports them, and
    writing such a string back sends the same bytes."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=CONNECTION_WAIT_S,
        decode_responses=True,
        encoding_errors="surrogateescape",
        **kwargs,
    )
    return Redis.from_pool(pool)


def make_client(config: Config, name: str | None = None) -> Redis:
    """A client for `redis_url` (redis://, rediss://, unix://); strings decoded as UTF-8.
    `name`: what `CLIENT LIST` shows for its connections."""
    kwargs: dict[str, Any] = {"health_check_interval": 10, "socket_timeout": 10}
    if name:
        kwargs["client_name"] = name
    password = config.resolve_redis_password()
    if password is not None:
        register_secret(password)
        kwargs["password"] = password
    client = open_redis(config.redis_url, **kwargs)
    register_secret(client.connection_pool.connection_kwargs.get("password"))
    return client


async def wait_for_redis(client: Redis, config: Config, stop: asyncio.Event) -> bool:
    """Retry PING with jittered backoff until it answers; False if told to stop first."""
    where = redact_url(config.redis_url)
    retrying = AsyncRetrying(
        wait=wait_exponential_jitter(multiplier=0.2, max=5),
        retry=retry_if_exception_type((RedisConnectionError, RedisTimeoutError, OSError)),
        before_sleep=lambda state: log.warning(
            "waiting for Redis at %s (attempt %d): %s",
            where,
            state.attempt_number,
            state.outcome.exception() if state.outcome else "",
        ),
    )
    async for attempt in retrying:
        with attempt:
            if stop.is_set():
                return False
            await client.ping()
    log.info("connected to Redis at %s", where)
    return True
