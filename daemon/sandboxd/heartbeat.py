"""The daemon's heartbeat key: proof of life for `status` and monitoring, with a TTL."""

import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from sandboxd import __version__
from sandboxd.keys import Keys
from sandboxd.redisconn import every


class Heartbeat:
    """Refreshes `<prefix>:daemon` (JSON) every interval; it expires after 3 missed beats."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        interval_s: Callable[[], float],
        instance: str,
        facts: Callable[[], dict[str, Any]],
    ):
        self._redis = redis
        self._keys = keys
        self._interval = interval_s
        self._facts = facts
        self.identity = {
            "instance": instance,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "version": __version__,
            "started_at": time.time(),
        }

    async def beat(self) -> None:
        body = {**self.identity, **self._facts(), "heartbeat_at": time.time()}
        ttl_ms = int(self._interval() * 3 * 1000)
        await self._redis.set(self._keys.daemon, json.dumps(body), px=ttl_ms)

    async def run(self) -> None:
        await every(self._interval, self.beat, "heartbeat not written")

    async def clear(self) -> None:
        await self._redis.delete(self._keys.daemon)
