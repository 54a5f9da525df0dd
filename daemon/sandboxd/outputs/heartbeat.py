"""The daemon's heartbeat key: proof of life for `status` and monitoring, with a TTL; with
it, the per-pool facts that changed since the last beat (`<prefix>:daemon:pools`), and this
daemon's line in `<prefix>:daemons`, where the active daemon and its standbys are listed."""

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from sandboxd import __version__
from sandboxd.outputs.poolfacts import PoolFacts
from sandboxd.store.keys import Keys
from sandboxd.store.loops import every

STALE_S = 60.0  # a `<prefix>:daemons` entry not refreshed this long is removed
ENTRY_FIELDS = (
    "instance",
    "pid",
    "host",
    "version",
    "started_at",
    "workspace",
    "node",
    "role",
    "epoch",
)


def identity(instance: str, workspace_root: Path) -> dict[str, Any]:
    """Who this daemon process is, in every heartbeat and in `daemon.started`. `workspace`
    names its host and local registry (a digest, not the path): daemons that may stand in
    for each other share it."""
    host = socket.gethostname()
    where = hashlib.sha256(f"{host}\0{workspace_root}".encode()).hexdigest()[:16]
    return {
        "instance": instance,
        "pid": os.getpid(),
        "host": host,
        "version": __version__,
        "started_at": time.time(),
        "workspace": where,
    }


async def beat_standby(redis: Redis, keys: Keys, entry: dict[str, Any]) -> None:
    """A standby's line in `<prefix>:daemons`: it writes nothing else (the active daemon
    prunes the lines of daemons that stopped beating)."""
    await redis.hset(keys.daemons, entry["instance"], json.dumps(entry))


async def prune(redis: Redis, keys: Keys) -> None:
    """Remove the lines of daemons that stopped beating (killed, or their host gone)."""
    now = time.time()
    stale = []
    for instance, raw in (await redis.hgetall(keys.daemons)).items():
        try:
            beat = float(json.loads(raw).get("heartbeat_at", 0))
        except (ValueError, TypeError, AttributeError):
            beat = 0.0
        if now - beat > STALE_S:
            stale.append(instance)
    if stale:
        await redis.hdel(keys.daemons, *stale)


class Heartbeat:
    """Refreshes `<prefix>:daemon` (JSON) every interval; it expires after 3 missed beats."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        interval_s: Callable[[], float],
        identity: dict[str, Any],
        facts: Callable[[], dict[str, Any]],
        pools: PoolFacts | None = None,
    ):
        self._redis = redis
        self._keys = keys
        self._interval = interval_s
        self._facts = facts
        self.pools = pools
        self.identity = identity
        self._beats = 0

    async def beat(self) -> None:
        """One transaction: the heartbeat (a summary of the pools, not each pool) and the
        fields of `<prefix>:daemon:pools` that changed."""
        changed, gone = self.pools.refresh() if self.pools is not None else ({}, [])
        body = {**self.identity, **self._facts(), "heartbeat_at": time.time()}
        ttl_ms = int(self._interval() * 3 * 1000)
        entry = {k: body.get(k) for k in ENTRY_FIELDS} | {"heartbeat_at": body["heartbeat_at"]}
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._keys.daemon, json.dumps(body), px=ttl_ms)
            pipe.hset(self._keys.daemons, self.identity["instance"], json.dumps(entry))
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
        self._beats += 1
        if self._beats % 10 == 1:
            await prune(self._redis, self._keys)

    async def run(self) -> None:
        await every(self._interval, self.beat, "heartbeat not written")

    async def clear(self) -> None:
        await self._redis.delete(self._keys.daemon, self._keys.daemon_pools)
        await self._redis.hdel(self._keys.daemons, self.identity["instance"])
