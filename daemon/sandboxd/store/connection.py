"""Connecting to Redis: URL forms, password handling, waiting for it to come up.

Besides redis://, rediss:// and unix://, a URL may name Redis Sentinels:

    redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db]

The client then asks the Sentinels where the primary of `service_name` is, and again after
a failover (a connection to a primary that became a replica is dropped and reopened), so
the daemon, the CLI and the client library all follow a failover without a restart. The
password is the primary's; Sentinels without a password are assumed (`sentinel_password=`
as a query parameter if they have one).
"""

import asyncio
import functools
import logging
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
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


SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")


class SentinelBlockingConnectionPool(SentinelConnectionPool, BlockingConnectionPool):
    """Connections to whatever the Sentinels name as primary, queueing like the others."""


# Ints hiredis is given: well inside what it writes as redis-py does (one with thousands
# of digits crashes hiredis's packer, where redis-py raises ValueError).
_INT_RANGE = range(-(2**63), 2**64)


def _hiredis_packs_as_redis_py(arg: Any) -> bool:
    kind = type(arg)
    return kind is str or kind is bytes or (kind is int and arg in _INT_RANGE)


class _HiredisPacking:
    """Commands packed by hiredis's C packer: redis-py packs in Python on its asyncio
    connections (its sync ones use hiredis), ~10 µs of a claim's 16 arguments. What hiredis
    would pack differently from redis-py goes to redis-py's own packer: a bool, float,
    memoryview, subclass or huge int, a command name that redis-py splits or drops (any
    whitespace in it: "CONFIG GET"; empty), and text that is not valid UTF-8 (the lone
    surrogates `surrogateescape` decodes bytes into)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0] if args else None
        if (
            type(first) is str
            and first.split() == [first]
            and self.encoder.encoding == "utf-8"  # type: ignore[attr-defined]
            and all(map(_hiredis_packs_as_redis_py, args))
        ):
            try:
                return [hiredis.pack_command(args)]
            except UnicodeEncodeError:
                pass
        return super().pack_command(*args)  # type: ignore[misc]


@functools.cache
def hiredis_packing(
    connection_class: type[AbstractConnection],
) -> type[AbstractConnection]:
    """`connection_class` (plain, TLS, Unix socket, Sentinel-managed) packing with hiredis."""
    if issubclass(connection_class, _HiredisPacking):
        return connection_class
    name = f"HiredisPacking{connection_class.__name__}"
    return type(name, (_HiredisPacking, connection_class), {})


def open_redis(url: str, **kwargs: Any) -> Redis:
    """A client owning a bounded, queueing connection pool; strings decoded as UTF-8.

    Invalid bytes in a reply become lone surrogates instead of a UnicodeDecodeError inside
    the client (anyone can write anything into Redis): `decode.text` reports them, and
    writing such a string back sends the same bytes."""
    options = {
        "max_connections": MAX_CONNECTIONS,
        "timeout": CONNECTION_WAIT_S,
        "decode_responses": True,
        "encoding_errors": "surrogateescape",
        **kwargs,
    }
    if urlsplit(url).scheme in SENTINEL_SCHEMES:
        client = _via_sentinels(url, options)
    else:
        client = Redis.from_pool(BlockingConnectionPool.from_url(url, **options))
    pool = client.connection_pool
    pool.connection_class = hiredis_packing(pool.connection_class)
    return client


class SentinelURL:
    """The parts of a redis+sentinel:// URL."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("a redis+sentinel:// URL names the service: .../service_name[/db]")
        self.service = unquote(path[0])
        self.db = int(path[1]) if len(path) > 1 else 0
        self.tls = parts.scheme.startswith("rediss")
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        hosts = parts.netloc.rpartition("@")[2]
        self.sentinels = [_host_port(h) for h in hosts.split(",") if h]
        if not self.sentinels:
            raise ValueError("a redis+sentinel:// URL names at least one Sentinel host:port")
        query = parse_qs(parts.query)
        self.sentinel_password = query.get("sentinel_password", [None])[0]


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host:
        return text, 26379
    return host.strip("[]"), int(port)


def _via_sentinels(url: str, options: dict[str, Any]) -> Redis:
    where = SentinelURL(url)
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": 5, "decode_responses": True}
    if where.sentinel_password:
        register_secret(where.sentinel_password)
        sentinel_kwargs["password"] = where.sentinel_password
    options = {"db": where.db, "ssl": where.tls, **options}
    if where.username:
        options.setdefault("username", where.username)
    if where.password:
        options.setdefault("password", where.password)
    sentinel = Sentinel(where.sentinels, sentinel_kwargs=sentinel_kwargs)
    client: FollowingRedis = sentinel.master_for(
        where.service,
        redis_class=FollowingRedis,
        connection_pool_class=SentinelBlockingConnectionPool,
        **options,
    )
    client.sentinel = sentinel
    return client


class FollowingRedis(Redis):
    """A client of whatever the Sentinels name as primary; closing it closes its
    connections to the Sentinels too."""

    sentinel: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for client in self.sentinel.sentinels if self.sentinel else []:
            await client.aclose()


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
