"""Which daemon acts: the hot standby's wait, the leases kept while active, the cloud lead.

A daemon acts for its node only while it holds the node's lease (`store/ownership.py`), and
manages the cloud (e2b) pools only while it holds the leader lease too. `Leadership` owns
both leases and the `Fence` every write of the active daemon goes through (`store/fence.py`):

- `until_active`: the standby. It writes nothing but its line in `<prefix>:daemons`, looks
  at the lease when its time to live runs out or when a clean stop announces a release, and
  refuses to stand in for a daemon that keeps its sandboxes in another registry;
- `activate` / `try_lead`: take what was acquired into the fence;
- `keep`: renew every third of the TTL (each attempt bounded), take a lease again when Redis
  lost it while it was held in time, and take the cloud lead when it is free (`on_lead` then
  adopts the cloud sandboxes). A refused renewal, or none for a whole TTL on this host's
  clock, loses the lease: the fence tells the daemon, which stops acting at once.
"""

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from sandboxd.config import Config
from sandboxd.control.localstate import LocalState
from sandboxd.outputs import sdnotify
from sandboxd.outputs.heartbeat import beat_standby
from sandboxd.store.fence import Fence, LeaseLapsed, LeaseLost
from sandboxd.store.keys import Keys
from sandboxd.store.loops import survive, wait_event, why
from sandboxd.store.ownership import Holder, Lease, Seen

log = logging.getLogger(__name__)
MISMATCH_S = 5.0  # how long the active daemon's registry must differ before a standby refuses


def _once(said: set[str], level: int, message: str) -> None:
    """Log `message` once per standby (a standby looks several times a second)."""
    if message not in said:
        said.add(message)
        log.log(level, message)


class Leadership:
    def __init__(
        self,
        redis: Redis,
        config: Config,
        *,
        instance: str,
        identity: dict[str, Any],
        stop: asyncio.Event,
        on_lost: Callable[[str], None],
        custody: LocalState | None = None,
    ):
        self._redis = redis  # unfenced: the leases check themselves
        self._config = config
        self._keys = keys = Keys(config.key_prefix)
        self._identity = identity
        self._stop = stop
        node = config.node
        ttl = config.lease_ttl_s
        released = keys.node_released(node)
        self.node = Lease(
            redis, keys.node_lease(node), keys.node_epoch(node), instance, ttl, released
        )
        self.leader = Lease(redis, keys.leader, keys.leader_epoch, instance, ttl)
        self.fence = Fence(on_lost=on_lost, on_vacant=lambda reason: self._retake.set())
        self._retake = asyncio.Event()  # a write found a lease held by nobody
        self.role = "starting"
        self.leader_epoch = 0  # of the cloud lead, while this daemon holds it
        self.wrong_node: str | None = None  # why this daemon cannot stand in, if it cannot
        # The host-local record of which daemon acts on the node's sandboxes (the state
        # directory every daemon of this node on this host shares): see `check_local`.
        self._custody = custody
        self._reached = True  # every renewal of the lease keeper's round reached Redis

    # -- the standby ------------------------------------------------------------------------

    async def until_active(self) -> bool:
        """Wait, touching nothing, until the node's lease is free, then take it (a new
        epoch). False if told to stop first, or if this daemon cannot stand in."""
        async with self._redis.pubsub() as released:
            with contextlib.suppress(RedisError, OSError):
                await released.subscribe(self.node.released)
            return await self._stand_by(released)

    async def _stand_by(self, released: Any) -> bool:
        poll_s = min(1.0, self.node.ttl_s / 5)
        node = self._config.node
        said: set[str] = set()  # what this standby has logged (each thing once)
        free_at = 0.0  # monotonic: when the lease last seen would have run out
        announced = False  # a clean stop announced its release: take it at once
        last_beat = 0.0
        mismatch_since: float | None = None
        while not self._stop.is_set():
            wait_s = poll_s
            now = time.monotonic()
            try:
                # A lease that vanished before it would have run out (FLUSHDB, a failover
                # that lost it, a forged DEL) is not taken until it would have: by then its
                # holder has taken it again, or its own clock has stopped it.
                if (announced or now >= free_at) and await self.node.try_acquire():
                    return True
                announced = False
                seen = await self.node.look()
                holder = seen.holder
                if seen.present and seen.left_s is not None:
                    free_at = time.monotonic() + seen.left_s
                    wait_s = min(poll_s, seen.left_s + 0.005)  # look again as it runs out
                elif not seen.present and free_at > time.monotonic():
                    wait_s = min(poll_s, free_at - time.monotonic() + 0.005)
                self._suspect(seen, said)
                if holder is not None and await self._cannot_stand_in(holder):
                    if mismatch_since is None:
                        mismatch_since = time.monotonic()
                    elif time.monotonic() - mismatch_since >= MISMATCH_S:
                        self._refuse(holder)
                        return False
                else:
                    mismatch_since = None
                self.role = "standby"
                if time.monotonic() - last_beat >= self._config.heartbeat_interval_s:
                    await beat_standby(self._redis, self._keys, self._standby_entry(holder))
                    last_beat = time.monotonic()
            except RedisError as exc:
                if not survive(exc):
                    raise
                _once(said, logging.WARNING, f"standby: {why(exc)}: {exc}")
                holder = None
            if "standing by" not in said:
                said.add("standing by")
                held_by = f"{holder.instance} (epoch {holder.epoch})" if holder else "another"
                log.warning(
                    "standby: node %s is held by daemon %s; taking over when its lease ends",
                    node,
                    held_by,
                    extra={"node": node, "role": "standby"},
                )
                sdnotify.ready(f"standby for node {node} (active: {held_by})")
            announced = await self._until_released(released, wait_s)
        return False

    def _suspect(self, seen: Seen, said: set[str]) -> None:
        """A lease no daemon would write (no time to live, a longer one than leases have,
        a value that is no daemon's token): the node is unmanaged until someone removes it.
        Nothing acts on a guess; it is said loudly, once."""
        if not seen.present:
            return
        key = self.node.key
        if seen.left_s is None:
            _once(
                said,
                logging.ERROR,
                f"{key} has no time to live: a forged lease? Nothing "
                "manages the node until it is removed (DEL it if no daemon holds it)",
            )
        elif seen.left_s > self.node.ttl_s * 2:
            _once(
                said,
                logging.ERROR,
                f"{key} lives {seen.left_s:.0f}s, longer than any lease "
                f"({self.node.ttl_s:g}s): a forged lease or another lease_ttl_s?",
            )
        elif seen.holder is None:
            _once(
                said,
                logging.ERROR,
                f"{key} holds no daemon's token (a forged lease?): "
                "the node is unmanaged until it runs out",
            )

    async def _until_released(self, released: Any, wait_s: float) -> bool:
        """Wait `wait_s`, less if the active daemon announces a release (True) or we must
        stop."""
        deadline = time.monotonic() + wait_s
        while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
            try:
                message = await released.get_message(
                    ignore_subscribe_messages=True, timeout=min(left, 0.2)
                )
            except (RedisError, OSError):
                message = None
                await asyncio.sleep(min(left, 0.2))
            if message is not None:
                return True
        return False

    async def _cannot_stand_in(self, holder: Holder) -> bool:
        """Does the active daemon of this node run on another host, or keep its sandboxes in
        another registry (a `make run` beside the service)? Taking over would orphan its
        sandboxes. (Only a mismatch that lasts MISMATCH_S counts: its own heartbeats rewrite
        its line, so a forged one does not.)"""
        try:
            raw = await self._redis.hget(self._keys.daemons, holder.instance)
            line = json.loads(raw or "{}")
        except (ValueError, TypeError):
            return False
        theirs = line.get("workspace") if isinstance(line, dict) else None
        return isinstance(theirs, str) and theirs != self._identity["workspace"]

    def _refuse(self, holder: Holder) -> None:
        """Refuse to be the standby (exit 78: a restart cannot fix a config)."""
        self.wrong_node = (
            f"node {self._config.node} is served by daemon {holder.instance} on another host "
            "or with another local.workspace_root: this daemon cannot be its standby; give it "
            "a node of its own (config `node`)"
        )
        log.critical("refusing to start: %s", self.wrong_node)
        sdnotify.status(f"refused to start: {self.wrong_node}")

    def _standby_entry(self, holder: Holder | None) -> dict[str, Any]:
        return {
            **self._identity,
            "node": self._config.node,
            "role": "standby",
            "epoch": 0,
            "active_instance": holder.instance if holder else None,
            "active_epoch": holder.epoch if holder else None,
            "heartbeat_at": time.time(),
        }

    # -- active -----------------------------------------------------------------------------

    def activate(self) -> None:
        """The node's lease was taken: every write from now on carries its token."""
        lease = self.node
        assert lease.token is not None
        self.fence.hold(lease.key, lease.token, lease.ttl_s, lease.since)
        self._take_custody()
        self.role = "active"
        log.info(
            "active for node %s at epoch %d",
            self._config.node,
            lease.epoch,
            extra={"node": self._config.node, "role": "active", "epoch": lease.epoch},
        )

    async def try_lead(self) -> bool:
        """Take the cloud lead if it is free (and hold it in the fence)."""
        if not await self.leader.try_acquire():
            return False
        assert self.leader.token is not None
        self.fence.hold(self.leader.key, self.leader.token, self.leader.ttl_s, self.leader.since)
        self.leader_epoch = self.leader.epoch
        log.info(
            "leading the cloud pools at epoch %d",
            self.leader.epoch,
            extra={"leader_epoch": self.leader.epoch},
        )
        return True

    # -- custody of the node's local sandboxes -----------------------------------------------

    def _take_custody(self) -> None:
        """Say, on this host, that this daemon acts on the node's sandboxes from now on."""
        if self._custody is not None and self.node.token:
            try:
                self._custody.save_holder(self.node.token)
            except OSError as exc:  # then `check_local` cannot vouch for it: no custody
                log.error("could not record the node's holder locally: %s", exc)

    def _in_custody(self) -> bool:
        """Does this host's record still name this daemon as the one acting on the node's
        sandboxes? (Any daemon that takes the lease after it rewrites it.)"""
        if self._custody is None or not self.node.token:
            return False
        try:
            return self._custody.holder() == self.node.token
        except OSError:
            return False

    def check_local(self) -> None:
        """The guard of the node's local sandboxes: the lease's (`Fence.check`), except
        while the lease has only lapsed because Redis cannot be reached. Then nobody took
        it through that Redis, and the only other daemons that could act on these
        sandboxes are this host's (a standby shares the registry and the state directory):
        one that took the lease since has rewritten the host's record. While the record
        still names this daemon, it keeps acting on them (reaping the dead, a stop's
        terminate); otherwise the lease is lost."""
        try:
            self.fence.check()
        except LeaseLapsed:
            if not self._in_custody():
                self.fence.lose("another daemon of this host took over the node's sandboxes")
                raise LeaseLost(self.fence.lost or "") from None

    @property
    def leading(self) -> bool:
        return self.leader.key in self.fence.held

    async def keep(
        self,
        *,
        may_lead: Callable[[], bool],
        on_lead: Callable[[], Awaitable[None]],
    ) -> None:
        """Renew the leases held; take the cloud lead when it is free and `may_lead()`
        (then `on_lead` adopts the cloud pools). Returns once a lease is lost."""
        ttl = self.node.ttl_s
        lapsed = False  # said once per outage
        while True:
            await wait_event(self._retake, ttl / 3)
            self._retake.clear()
            self._reached = True  # until a renewal of this round fails to reach Redis
            for lease in [self.node, *([self.leader] if self.leading else [])]:
                if not await self._renew(lease):
                    return
            if self._reached and self.fence.cut_off:
                log.warning("Redis answers again: the leases are held")
                self.fence.cut_off = lapsed = False
            if not self.leading and may_lead():
                try:
                    if await self.try_lead():
                        await on_lead()
                except (RedisError, OSError) as exc:
                    if not survive(exc):
                        raise
            try:
                self.fence.check()
            except LeaseLapsed as exc:  # Redis cannot be reached: renew at the next round
                if not lapsed:
                    lapsed = True
                    log.warning(
                        "lease lapsed, Redis unreachable (%s): the node's sandboxes stay in "
                        "this daemon's custody; writes wait for Redis",
                        exc,
                        extra={"node": self._config.node},
                    )
                    sdnotify.status(f"cut off from Redis: node {self._config.node} in custody")
                continue
            except LeaseLost:
                return

    async def _renew(self, lease: Lease) -> bool:
        """One renewal; False once the lease is lost."""
        try:
            async with asyncio.timeout(lease.ttl_s / 3):  # a hung connection is no excuse
                result = await lease.renew()
                if result == "vacant" and (
                    time.monotonic() < lease.since + lease.ttl_s or self._may_retake(lease)
                ):
                    result = await self._retake_lease(lease)
            if result != "renewed":
                why_lost = {"taken": "taken over by another daemon", "vacant": "expired"}
                self.fence.lose(f"{lease.key} {why_lost[result]}")
                return False
            self.fence.hold(lease.key, lease.token or "", lease.ttl_s, lease.since)
        except (RedisError, OSError, TimeoutError) as exc:
            if not isinstance(exc, TimeoutError) and not survive(exc):
                raise
            if not self.fence.cut_off:
                log.warning("lease %s not renewed, %s: %s", lease.key, why(exc), exc)
            self.fence.cut_off = True
            self._reached = False
        return True

    def _may_retake(self, lease: Lease) -> bool:
        """A lease that ran out while Redis could not be reached is taken again if it is
        still vacant (nobody took it meanwhile, or whoever did has given it back: the new
        epoch fences anything older) and, for the node's, if no daemon of this host has
        taken over its sandboxes meanwhile. Cloud actions stopped while it had lapsed."""
        return self.fence.cut_off and (lease is not self.node or self._in_custody())

    async def _retake_lease(self, lease: Lease) -> str:
        """The lease vanished while held in time (Redis lost its data), or ran out while
        Redis could not be reached (`_may_retake`): take it again."""
        if not await lease.try_acquire():
            return "taken"
        if lease is self.node:
            self._take_custody()
        log.warning(
            "lease %s was gone from Redis (data lost, or it ran out while Redis was "
            "unreachable): taken again at epoch %d",
            lease.key,
            lease.epoch,
            extra={"node": self._config.node, "epoch": lease.epoch},
        )
        return "renewed"

    async def release(self) -> None:
        """A clean stop: give both leases back (the standby need not wait for the TTL)."""
        if self.fence.lost is None:
            for lease in (self.leader, self.node):
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    async with asyncio.timeout(1.0):  # Redis away: it runs out by itself
                        await lease.release()
