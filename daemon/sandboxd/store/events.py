"""Lifecycle events: their shape, their types, and publishing them to the Redis stream."""

import json
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field, PrivateAttr
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from sandboxd.store.keys import Keys

log = logging.getLogger(__name__)

# type -> (what it means, its `data` fields). The README's event table is this dict.
EVENT_TYPES: dict[str, tuple[str, str]] = {
    "daemon.started": (
        "the daemon is up and has done its first reconcile",
        "instance, pid, host, version, started_at, isolation, security, revision, adopted, "
        "dropped (records closed: sandbox gone or half made), orphans (unrecorded sandboxes "
        "of ours, terminated), node, epoch (of the node's lease), leader_epoch (of the cloud "
        "pools' lead; 0: not leading)",
    ),
    "daemon.leading": (
        "this daemon took over the cloud (e2b) pools from a leader that went away, adopting "
        "their sandboxes from the provider's listing",
        "instance, node, epoch (the lead's), adopted, dropped, orphans",
    ),
    "daemon.stopping": (
        "the daemon is shutting down",
        "instance, on_shutdown, terminated, kept, late (true: Redis could not be reached at "
        "the stop; written by the next start, `time` is the stop's)",
    ),
    "spec.applied": (
        "the daemon put a spec revision in force",
        "revision, pools, changes",
    ),
    "spec.rejected": (
        "the daemon found an invalid spec in Redis and kept the previous one",
        "revision (if readable), errors, revision_in_force",
    ),
    "sandbox.creating": (
        "a create started",
        "template, provider, spec_revision, replaces (the lost sandbox it replaces, or empty)",
    ),
    "sandbox.ready": ("a sandbox is ready to be claimed", "create_ms, isolation, pid"),
    "sandbox.create_failed": (
        "one create attempt failed",
        "attempt, attempts, error, retryable (false: permanent, e.g. a bad template), "
        "will_retry, retry_after_s (the provider's backoff, e.g. after a 429)",
    ),
    "sandbox.claimed": (
        "a client claimed a ready sandbox (appended by the claim script itself)",
        "claimant, claim_id, lease_s, lease_expires_ms, via (`api`: made through "
        "`sandboxd api`, whose key name is the claimant; absent for the client library)",
    ),
    "sandbox.lease_renewed": (
        "the holder extended its lease",
        "claim_id, lease_s, lease_expires_ms",
    ),
    "sandbox.released": (
        "the holder gave the sandbox back (or an operator forced it)",
        "claimant, claim_id, held_ms, forced, forced_by, via",
    ),
    "sandbox.lease_expired": (
        "a claim's lease ran out; the sandbox is terminated next",
        "claimant, claim_id, lease_expires_ms, via",
    ),
    "sandbox.reset": (
        "a released sandbox of a `reuse: reset` pool was wiped and is ready again",
        "reset_ms, uses",
    ),
    "sandbox.terminated": (
        "a sandbox is gone",
        "reason (scaled_down, drained, died, timeout, orphan, interrupted, shutdown, "
        "create_failed, released, lease_expired, reset_failed, unhealthy, idle_ttl, "
        "stuck_creating, lost, spec_changed), state, error (reset_failed), detail (died, "
        "unhealthy), claimant and claim_id (a claimed sandbox ended by timeout or health), "
        "late (true: ended while Redis could not be reached, by a stop or a death; written, "
        "with the record's closing, when it answered again; `time` is when it ended)",
    ),
    "sandbox.leaked": (
        "the janitor found a sandbox of ours that Redis has no record of, and terminated it",
        "provider, verified_gone",
    ),
    "sandbox.health_changed": (
        "a sandbox's health moved between healthy, degraded and unhealthy",
        "from, to, reason, state, consecutive_failures, latency_ms, claimant and claim_id "
        "(if claimed: the holder decides, unless the pool has replace_claimed)",
    ),
    "recovery.started": (
        "a lost ready sandbox (died, unhealthy) is being replaced",
        "reason, detail, state",
    ),
    "recovery.succeeded": (
        "the replacement of a lost sandbox is ready",
        "old, new, reason, recovery_ms",
    ),
    "recovery.failed": (
        "the replacement's create failed (the pool keeps trying on later ticks)",
        "old, attempted, reason, error",
    ),
    "agent.started": ("the pool's `run:` program started in a sandbox", "pid, restarts"),
    "agent.exited": ("the program exited", "exit_code, signal, ran_s"),
    "agent.restarting": ("the program will be restarted", "delay_s, restarts, exit_code"),
    "agent.failed": (
        "the program gave up (max_restarts within window_s); the sandbox is replaced",
        "reason, restarts",
    ),
    "pool.breaker_opened": (
        "creates of the pool keep failing: they stop until a trial after the cooldown",
        "failures, error, retry_in_s",
    ),
    "pool.breaker_closed": ("a trial create succeeded: the pool creates normally again", ""),
    "pool.failed": (
        "creates of the pool failed permanently (bad API key, unknown template…): it makes "
        "no more until its spec changes or the daemon restarts",
        "reason, attempts",
    ),
    "sandbox.keepalive_failed": (
        "extending a cloud sandbox's timeout failed (it is retried; a gone sandbox is lost)",
        "error, state",
    ),
    "health.report": (
        "periodic per-pool health summary (also in `sandboxd status`)",
        "pools: {name: {healthy, degraded, unhealthy, unknown, score, state, "
        "error_rate, probe_p50_ms, probe_p95_ms, breaker}}, for pools with probed sandboxes "
        "or a breaker not closed",
    ),
    "sandbox.adopted": ("a sandbox found alive at start was taken over", "state, pid"),
    "pool.cost": (
        "periodic (cost.report_interval_s) per-pool spend since accounting began "
        "(pools that have accrued any)",
        "currency, idle_s, claimed_s, paused_s, idle_cost, claimed_cost, paused_cost, cost, "
        "idle_share (idle cost / cost), since",
    ),
    "pool.schedule_changed": (
        "a schedule window of the pool started or ended: its sizes move to the new target",
        "window (the one now in force, or empty), min_ready, max_total, ramp_s",
    ),
    "host.resource_alert": (
        "host CPU, memory or disk use crossed its threshold (firing) or fell back (resolved)",
        "resource (cpu, memory, disk), state, percent, threshold",
    ),
    "sandbox.resource_alert": (
        "a local sandbox's memory crossed the threshold share of its pool's memory_mb",
        "resource (memory), state (firing, resolved), percent, threshold, rss_mb, limit_mb",
    ),
    "daemon.reloaded": (
        "SIGHUP (systemctl reload): the config file was read again",
        "applied (settings changed live), needs_restart (changed, in force after a restart)",
    ),
    "daemon.reload_failed": (
        "the config file could not be read on reload: the running settings stay",
        "error",
    ),
    "bridge.dropped": (
        "the MQTT broker was away longer than mqtt.max_backlog events: the oldest were not "
        "bridged (they stay in the Redis stream)",
        "dropped, first_id, last_id",
    ),
    "events.dropped": (
        "the event stream passed its hard bound (events.max_len or events.max_age_s): its "
        "oldest entries were trimmed although registered consumer groups (or the MQTT "
        "bridge) had not read them",
        "groups: {name: entries it lost}, removed (entries trimmed), first_id and last_id "
        "(stream ids of the trimmed range), reason (events.max_len, events.max_age_s)",
    ),
    "pool.scaled": (
        "the reconciler changed a pool's size",
        "from_total, to_total, min_ready, max_total, creating, terminating",
    ),
    "state.corrupt": (
        "a value in Redis could not be used (not UTF-8, too deep, a wrong-typed field or "
        "key): a sandbox record is quarantined (closed, its sandbox terminated through the "
        "provider's own registry), a derived key is rebuilt, the spec in force stays",
        "key, field, reason, key_type (when the key holds the wrong type), action",
    ),
    "state.repaired": (
        "a structure derived from the records (ready list, member set, lease index, the "
        "set of ids) disagreed with them and was rebuilt",
        "what (ready_list, members, leases, sandboxes), added, removed",
    ),
    "state.restored": (
        "Redis had lost its data (FLUSHDB, a restart without persistence); the spec in force "
        "and the records of sandboxes that still run were written back from the daemon's "
        "local journal",
        "spec_revision (0: not restored), records, claimed, ready",
    ),
    "daemon.task_restarted": (
        "one of the daemon's tasks failed and was restarted after a backoff (the daemon "
        "exits only when one it cannot work without keeps failing)",
        "task, error, restarts, delay_s",
    ),
}


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Event(BaseModel):
    """One stream entry. `id` is unique per event, for consumers' idempotency."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    type: str
    time: str = Field(default_factory=now_rfc3339)
    pool: str = ""
    sandbox: str = ""
    data: dict[str, Any] = Field(default_factory=dict)
    # The id of the stream entry it was read from ("" for one not read from the stream):
    # not part of the event (two deliveries of one event may come from different entries).
    _stream_id: str = PrivateAttr(default="")

    @property
    def stream_id(self) -> str:
        return self._stream_id

    def to_fields(self) -> dict[str, str]:
        fields = self.model_dump()
        fields["data"] = json.dumps(self.data, separators=(",", ":"), sort_keys=True)
        return fields

    @classmethod
    def from_fields(cls, fields: dict[str, str], stream_id: str = "") -> "Event":
        event = cls.model_validate({**fields, "data": json.loads(fields.get("data") or "{}")})
        event._stream_id = stream_id
        return event


class EventPublisher:
    """Appends events to `<prefix>:events`. It does not trim: the daemon's retention does
    (store/retention.py), to `maxlen` when no registered consumer group needs more."""

    def __init__(self, redis: Redis, keys: Keys, maxlen: int):
        self._redis = redis
        self._keys = keys
        self.maxlen = maxlen

    def build(self, type: str, *, pool: str = "", sandbox: str = "", **data: Any) -> Event:
        """An event to append later, e.g. inside a Lua script together with a state change."""
        if type not in EVENT_TYPES:
            raise ValueError(f"undocumented event type {type!r}")
        return Event(type=type, pool=pool, sandbox=sandbox, data=data)

    async def publish(self, type: str, *, pool: str = "", sandbox: str = "", **data: Any) -> Event:
        event = self.build(type, pool=pool, sandbox=sandbox, **data)
        try:
            await self._xadd(event)
        except ResponseError as exc:
            if "last possible ID" not in str(exc):
                raise
            # Someone appended an entry with the largest possible id: no XADD can follow it,
            # which would stop every pass. The stream is replaced (its entries are lost).
            log.error("%s cannot grow (%s): deleted and started anew", self._keys.events, exc)
            await self._redis.delete(self._keys.events)
            await self._xadd(
                self.build(
                    "state.corrupt",
                    key=self._keys.events,
                    field="",
                    reason="its last id is the largest possible one",
                    action="deleted and started anew",
                )
            )
            await self._xadd(event)
        return event

    async def _xadd(self, event: Event) -> None:
        await self._redis.xadd(self._keys.events, event.to_fields())
