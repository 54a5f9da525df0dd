"""The daemon's heartbeat key: proof of life for `status` and monitoring, with a TTL; with
it, the per-pool facts that changed since the last beat (`<prefix>:daemon:pools`)."""

import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from sandboxd import __version__
from sandboxd.outputs.poolfacts import PoolFacts
from sandboxd.store.keys import Keys
from sandboxd.store.loops import every


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
        pools: PoolFacts | None = None,
    ):
        self._redis = redis
        self._keys = keys
        self._interval = interval_s
        self._facts = facts
        self.pools = pools
        self.identity: dict[str, Any] = {
            "instance": instance,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "version": __version__,
            "started_at": time.time(),
        }

    async def beat(self) -> None:
        """One transaction: the heartbeat (a summary of the pools, not each pool) and the
        fields of `<prefix>:daemon:pools` that changed."""
        changed, gone = self.pools.refresh() if self.pools is not None else ({}, [])
        body = {**self.identity, **self._facts(), "heartbeat_at": time.time()}
        ttl_ms = int(self._interval() * 3 * 1000)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._keys.daemon, json.dumps(body), px=ttl_ms)
            if self.pools is not None:
                self.pools.write(pipe, changed, gone)
            try:
                replies = await pipe.execute()
            except BaseException:  # written or not, we cannot tell: rewrite it whole
                if self.pools is not None:
                    self.pools.lost()
                raise
        if self.pools is not None:
            self.pools.written(replies[-1])

    async def run(self) -> None:
        await every(self._interval, self.beat, "heartbeat not written")

    async def clear(self) -> None:
        await self._redis.delete(self._keys.daemon, self._keys.daemon_pools)
