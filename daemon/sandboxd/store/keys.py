"""Every Redis key, stream and channel name sandboxd uses, in one place.

Client programs in other languages rely on these names; they are part of the public interface.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "sandboxd"

    @property
    def spec(self) -> str:
        """Desired state written by operators: JSON with an integer `revision`."""
        return f"{self.prefix}:spec"

    @property
    def spec_history(self) -> str:
        """List of accepted specs, newest first, trimmed to SPEC_HISTORY_LEN."""
        return f"{self.prefix}:spec:history"

    @property
    def spec_active(self) -> str:
        """The spec the daemon has in force (differs from `spec` while that is invalid)."""
        return f"{self.prefix}:spec:active"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    @property
    def event_consumers(self) -> str:
        """Hash: consumer group name -> JSON (added_at, by) of the groups registered with
        `sandboxd consumers add`: the daemon never trims the event stream past the oldest
        entry one of them still needs (up to events.max_len / events.max_age_s)."""
        return f"{self.prefix}:events:consumers"

    def webhook_dead(self, name: str) -> str:
        """Stream: events webhook `name` could not deliver after its retries (the event's
        fields, plus stream_id, reason, attempts, failed_at)."""
        return f"{self.prefix}:webhooks:{name}:dead"

    def webhook_redeliver(self, name: str) -> str:
        """List: ids of dead-letter entries of webhook `name` to send again
        (`sandboxd webhooks redeliver`); the daemon pops them."""
        return f"{self.prefix}:webhooks:{name}:redeliver"

    @property
    def nudge(self) -> str:
        """Pub/sub channel: any message wakes the reconciler at once."""
        return f"{self.prefix}:nudge"

    @property
    def daemon(self) -> str:
        """Daemon heartbeat: JSON, expires unless refreshed."""
        return f"{self.prefix}:daemon"

    @property
    def daemon_pools(self) -> str:
        """Hash: pool name -> JSON of what only the daemon knows of the pool (sizes in force,
        breaker, health, cost, schedule, why it is short); a pool's field is written only
        when it changes. Meaningful while the heartbeat is alive."""
        return f"{self.prefix}:daemon:pools"

    @property
    def daemons(self) -> str:
        """Hash: daemon instance -> JSON (node, role active/standby, epoch, pid, host,
        heartbeat_at) of every daemon that has beaten lately, active or standby."""
        return f"{self.prefix}:daemons"

    def node_lease(self, node: str) -> str:
        """`<epoch>:<instance>` of the daemon acting for `node`; expires unless renewed."""
        return f"{self.prefix}:node:{node}:lease"

    def late_done(self, event_id: str) -> str:
        """Marker (expires after LATE_DONE_S) that a change made while Redis could not be
        reached (an event, maybe a record closed) was written: it is written only once."""
        return f"{self.prefix}:late:{event_id}"

    def node_epoch(self, node: str) -> str:
        """Counter: the node's fencing epoch, incremented at every acquisition of its lease."""
        return f"{self.prefix}:node:{node}:epoch"

    def node_released(self, node: str) -> str:
        """Pub/sub channel: the node's lease was given back (a clean stop): standbys take it
        at once instead of at their next look."""
        return f"{self.prefix}:node:{node}:released"

    @property
    def leader(self) -> str:
        """`<epoch>:<instance>` of the daemon managing the cloud (e2b) pools; expires unless
        renewed."""
        return f"{self.prefix}:leader"

    @property
    def leader_epoch(self) -> str:
        """Counter: the cloud leader's fencing epoch."""
        return f"{self.prefix}:leader:epoch"

    @property
    def sandboxes(self) -> str:
        """Set of every sandbox id that has a record."""
        return f"{self.prefix}:sandboxes"

    def sandbox(self, sandbox_id: str) -> str:
        return f"{self.prefix}:sandbox:{sandbox_id}"

    def sandbox_logs(self, sandbox_id: str) -> str:
        """Stream of the `run:` program's output lines (fields seq, time, line), trimmed to
        `agent_log_lines`; kept LOGS_KEPT_S after the sandbox ends, for post-mortems."""
        return f"{self.prefix}:sandbox:{sandbox_id}:logs"

    @property
    def pools(self) -> str:
        """Hash: pool name -> JSON claim settings of the spec in force (the daemon writes it)."""
        return f"{self.prefix}:pools"

    @property
    def leases(self) -> str:
        """Sorted set: claimed sandbox id -> lease deadline (unix ms, Redis server clock)."""
        return f"{self.prefix}:leases"

    def pool_ready(self, pool: str) -> str:
        """List of ready sandbox ids, oldest at the head (LPOP takes the oldest)."""
        return f"{self.prefix}:pool:{pool}:ready"

    def pool_available(self, pool: str) -> str:
        """Pub/sub channel: a sandbox was pushed onto the pool's ready list (wakes waiters)."""
        return f"{self.prefix}:pool:{pool}:available"

    def pool_members(self, pool: str) -> str:
        """Set: ids of every sandbox of the pool, in any state (a claim reads its size)."""
        return f"{self.prefix}:pool:{pool}:members"

    def pool_waiters(self, pool: str) -> str:
        """Sorted set: claim id -> wait deadline (unix ms) of clients waiting on an empty
        `on_empty: create` pool; each one asks the daemon for one more sandbox."""
        return f"{self.prefix}:pool:{pool}:waiters"

    @property
    def mqtt_cursor(self) -> str:
        """The id of the last event the MQTT broker acknowledged (the bridge's cursor)."""
        return f"{self.prefix}:mqtt:cursor"

    def pool_cost(self, pool: str) -> str:
        """Hash: the pool's sandbox-seconds and estimated spend by use (idle_s, claimed_s,
        paused_s, idle_cost, claimed_cost, paused_cost) and `since` (unix s), kept across
        restarts."""
        return f"{self.prefix}:pool:{pool}:cost"

    @property
    def apikeys(self) -> str:
        """Hash: API key name -> JSON (name, sha256 of the secret, pools, max_sandboxes,
        created_at) of each key `sandboxd apikey create` issued for `sandboxd api`. The
        secret itself is never stored."""
        return f"{self.prefix}:apikeys"

    @property
    def apikey_hashes(self) -> str:
        """Hash: sha256 (hex) of an API key's secret -> the key's name (the lookup of
        `X-API-KEY`)."""
        return f"{self.prefix}:apikeys:sha256"

    def api_sandbox(self, sandbox_id: str) -> str:
        """Hash: what `sandboxd api` needs of a sandbox it handed out under E2B's id
        `sandbox_id` (sandboxd id, claim id, API key name, template, metadata, started_at)
        and the claim's secret `claim_token`: as secret as a record's `secrets` (never in an
        event, a view or a log). Expires a minute after the claim's lease."""
        return f"{self.prefix}:api:sandbox:{sandbox_id}"

    def api_key_sandboxes(self, name: str) -> str:
        """Sorted set: the E2B ids of the sandboxes an API key holds (score 0), and its
        creates in flight (`pending:<id>`, score: the unix ms they lapse at), counted
        against its `max_sandboxes`."""
        return f"{self.prefix}:api:key:{name}:sandboxes"

    def api_key_creates(self, name: str) -> str:
        """Hash: an API key's token bucket of creates (`tokens`, `at` unix ms), for its
        `creates_per_s`; expires once full again."""
        return f"{self.prefix}:api:key:{name}:creates"


SPEC_HISTORY_LEN = 20
LOGS_KEPT_S = 3600
