"""Daemon configuration: a TOML file overridden by SANDBOXD_* environment variables."""

import hashlib
import os
import re
import socket
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_CONFIG_PATH = Path("/etc/sandboxd/sandboxd.toml")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LocalTemplate(BaseModel):
    """A named profile for `local` sandboxes (the local provider's idea of a template)."""

    model_config = ConfigDict(extra="forbid")

    ro_binds: list[str] = Field(
        default_factory=list, description="Host directories visible read-only at the same path."
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment of everything run in the sandbox."
    )
    setup: str | None = Field(
        default=None, description="Shell command run once in each new sandbox before it is ready."
    )

    @field_validator("ro_binds")
    @classmethod
    def _absolute(cls, paths: list[str]) -> list[str]:
        for path in paths:
            if not path.startswith("/"):
                raise ValueError(f"{path!r} is not an absolute path")
        return paths

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for name in env:
            if not ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
        return env


class LocalProviderConfig(BaseModel):
    """The `local` provider: its registry, how its sandboxes are isolated and limited."""

    model_config = ConfigDict(extra="forbid")

    workspace_root: Path = Field(
        default=Path("/var/lib/sandboxd/sandboxes"),
        description="The local registry: one root-only (0700) directory per sandbox with its "
        "record (meta.json), agent socket and log. Sandbox files live in the sandbox's own "
        "tmpfs.",
    )
    isolation: Literal["auto", "bwrap", "none"] = Field(
        default="auto",
        description="auto: bubblewrap when installed. bwrap: bubblewrap required. none (or "
        "auto without bubblewrap) runs sandboxes as plain processes and needs "
        "allow_weaker_isolation.",
    )
    watch_deaths: bool = Field(
        default=True,
        description="Notice a sandbox's death when it happens (a pidfd per live sandbox, up "
        "to half the open-files limit) and replace it at once; off: at the reconcile tick's "
        "liveness check, the health probes or the janitor.",
    )
    allow_weaker_isolation: bool = Field(
        default=False,
        description="Start even when a protection is missing on this host (no bubblewrap, user "
        "namespaces, seccomp or cgroup controllers, or a daemon not running as root); what "
        "is missing is logged and shown in status. Off: the daemon refuses to start (exit 78).",
    )
    disable: list[Literal["userns", "seccomp", "cgroups"]] = Field(
        default_factory=list,
        description="Protections to switch off (needs allow_weaker_isolation): to measure "
        "their cost, or where one breaks a trusted workload. Reported like a missing one.",
    )
    bwrap_path: str = Field(default="bwrap", description="bubblewrap (Debian: bubblewrap).")
    setpriv_path: str = Field(
        default="setpriv",
        description="setpriv (Debian: util-linux), which starts each sandbox as its own uid.",
    )
    network_helper: str = Field(
        default="slirp4netns",
        description="User-mode NAT for `network: true` pools (Debian: slirp4netns).",
    )
    agent_python: str | None = Field(
        default=None,
        description="Interpreter of the in-sandbox agent (standard library only). Default "
        "/usr/bin/python3 when present (readable by the sandbox uids), else the daemon's own.",
    )
    uid_base: int | None = Field(
        default=None,
        ge=1000,
        le=2_000_000_000,
        description="First host uid (and gid) of the range local sandboxes run as: one uid per "
        "sandbox, never root, never a user of this host. Default: 1000000000 plus a multiple "
        "of 65536 derived from workspace_root, so daemons with different registries on one "
        "host never share a uid. uid_base + uid_count stays below 2**31.",
    )
    uid_count: int = Field(
        default=65536, ge=1, le=10_000_000, description="Size of that range (sandboxes at once)."
    )
    cgroup_root: Path = Field(
        default=Path("/sys/fs/cgroup"),
        description="Where the cgroup hierarchies are mounted (v2: the unified mount; v1: a "
        "directory with one mount per controller).",
    )
    cgroup_name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="cgroup v1: the group under each of the pids, memory and cpu hierarchies "
        "that holds one child per sandbox. Default: sandboxd-<hash of workspace_root>, so "
        "daemons with different registries never share one.",
    )
    cgroup_parent: Path | None = Field(
        default=None,
        description="cgroup v2: the delegated cgroup whose children are the sandboxes "
        "(default: the daemon's own, with Delegate=yes in the unit).",
    )
    templates: dict[str, LocalTemplate] = Field(
        default_factory=dict,
        description="Named profiles for local sandboxes (a pool's `template`). `base` is built "
        "in (no binds, no env, no setup) and may be redefined here.",
    )

    @model_validator(mode="after")
    def _uids_below_2_31(self) -> "LocalProviderConfig":
        if self.uid_base is not None and self.uid_base + self.uid_count > 2**31 - 1:
            raise ValueError("uid_base + uid_count must stay below 2**31 (bubblewrap's limit)")
        return self

    def _registry_hash(self) -> int:
        digest = hashlib.sha256(str(self.workspace_root.absolute()).encode()).hexdigest()
        return int(digest[:12], 16)

    def first_uid(self) -> int:
        if self.uid_base is not None:
            return self.uid_base
        # Below 2**31: bubblewrap writes uid maps as signed ints.
        return 1_000_000_000 + (self._registry_hash() % 16_000) * 65_536

    def cgroup_group(self) -> str:
        return self.cgroup_name or f"sandboxd-{self._registry_hash() % 16**8:08x}"

    def all_templates(self) -> dict[str, LocalTemplate]:
        """Configured templates plus the built-in `base` (which a config may override)."""
        return {"base": LocalTemplate(), **self.templates}


class E2BProviderConfig(BaseModel):
    """The `e2b` provider: credentials, endpoints and the limits of the E2B plan."""

    model_config = ConfigDict(extra="forbid")

    api_key: SecretStr | None = Field(
        default=None,
        description="The E2B API key. Prefer api_key_file or the unit's credential; never logged.",
    )
    api_key_file: Path | None = Field(
        default=None,
        description="File holding the API key. A relative path is looked up in "
        "$CREDENTIALS_DIRECTORY (systemd LoadCredential=). Unset: api_key, else E2B_API_KEY, "
        "else the unit's credential `e2b-api-key` (/etc/sandboxd/credentials/e2b-api-key).",
    )
    api_url: str | None = Field(
        default=None,
        description="E2B's API (self-hosted E2B, a test server). Default https://api.<domain>.",
    )
    sandbox_url: str | None = Field(
        default=None, description="The sandboxes' envd endpoint. Default: each sandbox's own host."
    )
    domain: str | None = Field(default=None, description="Default e2b.app (E2B_DOMAIN).")
    max_concurrent: int = Field(
        default=20,
        ge=1,
        description="Sandboxes alive at once on the account, shared by all e2b pools "
        "(Hobby 20, Pro 100).",
    )
    creates_per_s: float = Field(
        default=1.0,
        gt=0,
        le=1000,
        description="Sandbox creates per second (token bucket). After a 429 or 503 every "
        "create pauses 1 s, doubling to 60 s while they go on.",
    )
    creates_burst: int = Field(
        default=2, ge=1, le=1000, description="Size of the create token bucket."
    )
    max_timeout_s: int = Field(
        default=3600,
        ge=60,
        description="The plan's longest sandbox timeout (Hobby 1 h, Pro 24 h); sandbox "
        "timeouts and leases are capped to it.",
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0, description="Limit of one API request, in seconds."
    )
    sdk_retries: int = Field(
        default=2,
        ge=0,
        le=10,
        description="Retries of 429/502/503/504 inside the SDK, which honours Retry-After.",
    )
    list_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="Liveness of E2B sandboxes comes from one metadata listing (for all of "
        "them) at most this old.",
    )

    def endpoints(self) -> dict[str, str]:
        """The configured endpoints (api_url, sandbox_url, domain), for the SDK."""
        values = {"api_url": self.api_url, "sandbox_url": self.sandbox_url, "domain": self.domain}
        return {name: value for name, value in values.items() if value is not None}

    def resolve_api_key(self) -> str | None:
        """api_key_file, else api_key, else E2B_API_KEY."""
        if self.api_key_file is not None:
            return credential_file(self.api_key_file).read_text().strip() or None
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        return os.environ.get("E2B_API_KEY") or unit_credential("e2b-api-key")


class Faults(BaseModel):
    """Faults injected into one provider (`providers/faults.py`), for chaos tests only."""

    create_failure_rate: float = Field(default=0.0, ge=0, le=1, description="Creates that fail.")
    create_failure_retryable: bool = Field(
        default=True, description="Whether the injected create failures may be retried."
    )
    create_hang_rate: float = Field(default=0.0, ge=0, le=1, description="Creates that hang.")
    create_latency_s: float = Field(default=0.0, ge=0, description="Added before every create.")
    probe_latency_s: float = Field(default=0.0, ge=0, description="Added before every probe.")
    seed: int | None = Field(default=None, description="Makes the injected sequence repeatable.")


class AlertThresholds(BaseModel):
    """Resource alerts: an event when a value crosses its threshold, another when it falls
    `hysteresis` points below it again (not one per sample)."""

    model_config = ConfigDict(extra="forbid")

    host_cpu_percent: float = Field(
        default=90.0, gt=0, le=100, description="Host CPU use that fires host.resource_alert."
    )
    host_memory_percent: float = Field(
        default=90.0, gt=0, le=100, description="Host memory use that fires host.resource_alert."
    )
    host_disk_percent: float = Field(
        default=90.0,
        gt=0,
        le=100,
        description="Use of the file system of local.workspace_root that fires "
        "host.resource_alert.",
    )
    sandbox_memory_percent: float = Field(
        default=90.0,
        gt=0,
        le=100,
        description="A local sandbox's RSS, as a share of its pool's memory_mb, that fires "
        "sandbox.resource_alert.",
    )
    hysteresis: float = Field(
        default=5.0,
        ge=0,
        le=50,
        description="An alert resolves only this many points below its threshold.",
    )


class CostConfig(BaseModel):
    """Prices behind the cost estimate (defaults: E2B's published per-second prices)."""

    model_config = ConfigDict(extra="forbid")

    price_per_vcpu_s: float = Field(default=0.000014, ge=0, description="Per vCPU-second.")
    price_per_gib_s: float = Field(default=0.0000045, ge=0, description="Per GiB-second.")
    currency: str = Field(default="USD", max_length=8, description="Label of the figures.")
    report_interval_s: float = Field(
        default=300.0, gt=0, description="How often `pool.cost` is published."
    )


class MqttConfig(BaseModel):
    """The MQTT bridge (`sandboxd[mqtt]`): every event of the stream, also on MQTT."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(
        default=None, description="mqtt://host:1883 or mqtts://host:8883; unset: no bridge."
    )
    prefix: str = Field(default="sandboxd", pattern=r"^[^#+]+$", description="Topic prefix.")
    username: str | None = Field(default=None, description="Broker login.")
    password: SecretStr | None = Field(
        default=None, description="Broker password (prefer password_file); never logged."
    )
    password_file: Path | None = Field(
        default=None,
        description="File holding the broker password; a relative name is looked up in "
        "$CREDENTIALS_DIRECTORY (a systemd credential).",
    )
    ca_file: Path | None = Field(default=None, description="mqtts: CA bundle (default: system).")
    client_id: str | None = Field(
        default=None, description="MQTT client id. Default sandboxd-<host>."
    )
    max_backlog: int = Field(
        default=10_000,
        ge=1,
        description="Events kept for a broker that is away; older ones are skipped, counted "
        "and announced by bridge.dropped (they stay in the Redis stream).",
    )

    @field_validator("url")
    @classmethod
    def _mqtt_scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("mqtt://", "mqtts://")):
            raise ValueError("must start with mqtt:// or mqtts://")
        return url

    def resolve_password(self) -> str | None:
        if self.password_file is not None:
            return credential_file(self.password_file).read_text().strip() or None
        return self.password.get_secret_value() if self.password else None


class EventsConfig(BaseModel):
    """Retention of the event stream (`<prefix>:events`): the daemon trims it itself, never
    past the oldest entry a registered consumer group still needs (`sandboxd consumers`),
    up to a hard bound beyond which the oldest entries go anyway (`events.dropped`)."""

    model_config = ConfigDict(extra="forbid")

    max_len: int | None = Field(
        default=None,
        ge=100,
        le=1_000_000_000,
        description="Hard bound on the stream's length: older entries are trimmed even if a "
        "registered consumer group has not read them, and `events.dropped` names the groups "
        "and how many each lost. Default: 10 x event_stream_maxlen; at least "
        "event_stream_maxlen.",
    )
    max_age_s: float | None = Field(
        default=None,
        gt=0,
        description="Hard bound on the age of entries (by their stream id's time): older ones "
        "are trimmed even if a registered group still needs them (`events.dropped`). Unset: "
        "no age bound.",
    )
    trim_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        description="How often the daemon trims the stream and samples the consumer groups' "
        "lag and pending counts (metrics).",
    )

    def hard_len(self, soft: int) -> int:
        return self.max_len if self.max_len is not None else 10 * soft


class WebhookRetry(BaseModel):
    """How a failed webhook delivery is retried: exponential backoff with full jitter, a
    `Retry-After` of the receiver honoured, then the dead-letter stream."""

    model_config = ConfigDict(extra="forbid")

    attempts: int = Field(
        default=8,
        ge=1,
        le=100,
        description="Deliveries of one event the receiver answered with an error (5xx, 408, "
        "429) or let time out, before it goes to the dead-letter stream.",
    )
    initial_s: float = Field(
        default=1.0, gt=0, le=3600, description="The first backoff; it doubles per attempt."
    )
    max_s: float = Field(
        default=300.0, gt=0, le=86_400, description="The longest backoff between two attempts."
    )
    retry_after_max_s: float = Field(
        default=3600.0,
        gt=0,
        description="A receiver's `Retry-After` is honoured up to this many seconds.",
    )
    unreachable_s: float = Field(
        default=86_400.0,
        gt=0,
        description="While the receiver cannot be reached at all (connection refused, no "
        "route), deliveries wait and retry (at most max_s apart) for this long before the "
        "event goes to the dead-letter stream; the consumer group holds the stream meanwhile.",
    )


WEBHOOK_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$"


class WebhookConfig(BaseModel):
    """A signed webhook (`[[webhooks]]`): every matching event POSTed as JSON to `url`,
    signed the Standard Webhooks way, read through its own consumer group
    `webhook.<name>`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=WEBHOOK_NAME,
        description="The webhook's name: its consumer group is `webhook.<name>`, its "
        "dead-letter stream `<prefix>:webhooks:<name>:dead`.",
    )
    url: str = Field(
        description="http:// or https:// URL the events are POSTed to (operator config only: "
        "nothing in Redis can change it)."
    )
    secret: SecretStr | None = Field(
        default=None,
        description="The signing secret (prefer secret_file); `whsec_<base64>` is decoded as "
        "Standard Webhooks does, anything else used as its UTF-8 bytes. Never logged.",
    )
    secret_file: Path | None = Field(
        default=None,
        description="File holding the signing secret; a relative name is looked up in "
        "$CREDENTIALS_DIRECTORY (a systemd credential).",
    )
    types: list[str] = Field(
        default_factory=list,
        description="Event types sent (shell patterns: `sandbox.*`); empty: all.",
    )
    pools: list[str] = Field(
        default_factory=list, description="Pools whose events are sent; empty: all."
    )
    timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="Limit of one delivery (connect to response)."
    )
    retry: WebhookRetry = Field(default_factory=WebhookRetry)
    start: Literal["new", "all"] = Field(
        default="new",
        description="Where a new webhook's group starts: `new` events only, or `all` the "
        "stream holds.",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return url

    @model_validator(mode="after")
    def _one_secret(self) -> "WebhookConfig":
        if (self.secret is None) == (self.secret_file is None):
            raise ValueError(f"webhook {self.name!r}: set exactly one of secret, secret_file")
        return self

    def resolve_secret(self) -> str:
        if self.secret_file is not None:
            value = credential_file(self.secret_file).read_text().strip()
            if not value:
                raise ValueError(f"webhook {self.name!r}: {self.secret_file} is empty")
            return value
        assert self.secret is not None
        return self.secret.get_secret_value()


def credential_file(path: Path) -> Path:
    """A relative path names a systemd credential (LoadCredential=)."""
    if path.is_absolute():
        return path
    return Path(os.environ.get("CREDENTIALS_DIRECTORY", ".")) / path


def unit_credential(name: str) -> str | None:
    """The credential the shipped unit loads as `name`, when systemd passed it non-empty
    (the unit installs the files empty, meaning not set)."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    try:
        return (Path(directory) / name).read_text().strip() or None
    except OSError:
        return None


def default_concurrent_creates() -> int:
    """`max_concurrent_creates` sized to the host: 4 per CPU, from 8 to 64."""
    return max(8, min(64, 4 * (os.cpu_count() or 1)))


def _default_node() -> str:
    """The host name, cut to what a node name may be."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname().split(".")[0])[:63]
    return name if name[:1].isalnum() else f"n{name}"[:63]


class Config(BaseSettings):
    """The daemon's configuration (`--config`, SANDBOXD_CONFIG or /etc/sandboxd/sandboxd.toml),
    overridden by SANDBOXD_<KEY> variables (nested: SANDBOXD_LOCAL__WORKSPACE_ROOT)."""

    model_config = SettingsConfigDict(
        env_prefix="SANDBOXD_", env_nested_delimiter="__", extra="forbid"
    )

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="redis://, rediss:// (TLS) or unix://, with user:password@ if needed; or "
        "redis+sentinel://host:port[,host:port...]/service_name[/db] to follow Sentinel "
        "failovers (docs/ha.md).",
    )
    redis_password: SecretStr | None = Field(
        default=None, description="Overrides any password in redis_url; never logged."
    )
    redis_password_file: Path | None = Field(
        default=None,
        description="File holding the Redis password; a relative name is looked up in "
        "$CREDENTIALS_DIRECTORY. With neither this nor redis_password: the unit's "
        "`redis-password` credential when non-empty.",
    )
    key_prefix: str = Field(
        default="sandboxd",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Prefix of every Redis key and channel (docs/redis.md).",
    )
    node: str = Field(
        default_factory=_default_node,
        pattern=r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,62})$",
        description="This host's name among daemons sharing a Redis (default: the host name). "
        "One daemon acts for a node at a time; another for the same node is its hot standby.",
    )
    claim_durability: Literal["acknowledged", "replicated"] = Field(
        default="acknowledged",
        description="For the CLI's claims: acknowledged (by the Redis primary) or replicated "
        "(also by a replica, within claim_replication_timeout_ms, else given back: a Redis "
        "failover cannot lose such a claim; docs/ha.md).",
    )
    claim_replication_timeout_ms: int = Field(
        default=1000,
        ge=1,
        le=60_000,
        description="How long a replicated claim waits for a replica's acknowledgement.",
    )
    lease_ttl_s: float = Field(
        default=5.0,
        ge=1,
        le=300,
        description="The node lease's time to live: a standby takes over this long after the "
        "active daemon stops renewing it (it renews every third of it).",
    )
    reconcile_interval_s: float = Field(
        default=5.0, gt=0, description="Periodic reconcile; spec changes act at once."
    )
    claim_coalesce_ms: float = Field(
        default=20.0,
        ge=0,
        le=1000,
        description="A pass asked for only by clients' claims and releases waits this long "
        "for more of them: a burst makes one pass, and a claimant's first calls do not share "
        "the CPU with the refill its claim starts. Deaths, finished creates and spec "
        "changes are reconciled at once; 0: claims too.",
    )
    resync_interval_s: float = Field(
        default=300.0,
        gt=0,
        description="Longest time between two full reads of the records. A pass reads only "
        "the records the event stream (or the daemon itself) says changed; a full read also "
        "comes after a Redis error and when unread events were trimmed, and as often as "
        "every pass (at least a second apart) while full reads take under 0.1% of the time.",
    )
    heartbeat_interval_s: float = Field(
        default=2.0, gt=0, description="Heartbeat refresh; the key expires after 3 missed beats."
    )
    max_concurrent_creates: int = Field(
        default_factory=lambda: default_concurrent_creates(),
        ge=1,
        description="Creates in flight across all pools, shared round-robin between them. "
        "Default: 4 per CPU of the host, at least 8 and at most 64 (a create mostly waits "
        "on the provider: a local sandbox's start or a cloud API). A create that ends "
        "starts the next one the last pass wanted at once, without waiting for a pass.",
    )
    create_attempts: int = Field(
        default=3, ge=1, description="Tries per create (exponential backoff with jitter)."
    )
    create_timeout_s: float = Field(
        default=60.0, gt=0, description="Limit of one create attempt, in seconds."
    )
    create_grace_s: float = Field(
        default=300.0,
        gt=0,
        description="A create still running after this is cancelled and its sandbox recreated "
        "(reason stuck_creating: a provider that ignores the create timeout).",
    )
    reset_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="reuse: reset: limit of one reset (kill, fresh start, reset_command).",
    )
    lease_check_interval_s: float = Field(
        default=1.0, gt=0, description="How often expired leases are looked for."
    )
    health_concurrency: int = Field(
        default=32, ge=1, description="Health probes running at once, across all pools."
    )
    health_max_probes_per_s: float = Field(
        default=150.0,
        gt=0,
        description="The most health probes a second, across all pools: when the pools' "
        "intervals ask for more (10,000 sandboxes at 30 s are 333 a second), every interval "
        "is stretched by the same factor, so the daemon's cost of probing stays bounded "
        "whatever the number of sandboxes (the factor is logged; a local sandbox's death is "
        "still noticed at once).",
    )
    health_report_interval_s: float = Field(
        default=60.0, gt=0, description="How often `health.report` is published."
    )
    agent_poll_interval_s: float = Field(
        default=2.0,
        gt=0,
        description="How often sandboxes with a `run:` program are asked for its news "
        "(events, output lines), when their health interval is longer.",
    )
    agent_log_lines: int = Field(
        default=1000, ge=10, description="Output lines kept per sandbox (`sandboxd logs`)."
    )
    janitor_interval_s: float = Field(
        default=60.0, gt=0, description="How often the leak janitor compares provider and Redis."
    )
    event_stream_maxlen: int = Field(
        default=100_000,
        ge=100,
        le=1_000_000_000,
        description="The length the daemon trims the event stream to when no registered "
        "consumer group needs older entries (it may grow past it for a group that lags, up "
        "to events.max_len). Clients no longer trim it.",
    )
    events: EventsConfig = Field(default_factory=EventsConfig)
    webhooks: list[WebhookConfig] = Field(
        default_factory=list,
        description="Signed webhooks (`[[webhooks]]` tables): each delivers the events it "
        "matches to one URL (docs/events.md#webhooks).",
    )
    on_shutdown: Literal["terminate", "keep"] = Field(
        default="terminate",
        description="On stop: terminate the sandboxes, or keep them for the next start to adopt.",
    )
    state_dir: Path | None = Field(
        default=None,
        description="Root-only directory of the daemon's journal (the spec in force and its "
        "records, claims included), written back when Redis loses its data. Default: "
        "`state` beside local.workspace_root (/var/lib/sandboxd/state; .run/state under "
        "`make run`).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Least severe level logged (any case)."
    )
    metrics_listen: str | None = Field(
        default=None,
        pattern=r"^[^:]*:\d+$",
        description="host:port of the Prometheus endpoint /metrics, e.g. 127.0.0.1:9464; "
        "unset: off.",
    )
    api_listen: str = Field(
        default="127.0.0.1:3000",
        pattern=r"^[^:]*:\d+$",
        description="host:port `sandboxd api` (E2B's REST API, see docs/api.md) listens on.",
    )
    api_tls_cert: Path | None = Field(
        default=None,
        description="PEM certificate (chain) for `sandboxd api`; with api_tls_key it serves "
        "HTTPS. Unset: plain HTTP (keep it on loopback or behind a TLS proxy).",
    )
    api_tls_key: Path | None = Field(default=None, description="PEM private key of api_tls_cert.")
    sample_interval_s: float = Field(
        default=5.0, gt=0, description="How often host and sandbox resources and cost are sampled."
    )
    alerts: AlertThresholds = Field(default_factory=AlertThresholds)
    cost: CostConfig = Field(default_factory=CostConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    watchdog_hang_file: Path | None = Field(
        default=None,
        description="Chaos tests only: when this file exists the reconcile loop removes it and "
        "hangs (so the systemd watchdog must catch it).",
    )
    local: LocalProviderConfig = Field(default_factory=LocalProviderConfig)
    e2b: E2BProviderConfig = Field(default_factory=E2BProviderConfig)
    faults: dict[str, Faults] = Field(
        default_factory=dict, description="Fault injection per provider name (chaos tests)."
    )

    @model_validator(mode="after")
    def _event_bounds(self) -> "Config":
        hard = self.events.max_len
        if hard is not None and hard < self.event_stream_maxlen:
            raise ValueError(
                f"events.max_len ({hard}) must be at least event_stream_maxlen "
                f"({self.event_stream_maxlen}): the hard bound cannot be below the length "
                "the stream is trimmed to"
            )
        names = [w.name for w in self.webhooks]
        if len(set(names)) != len(names):
            raise ValueError("webhooks: every webhook needs a name of its own")
        return self

    def journal_dir(self) -> Path:
        return self.state_dir or self.local.workspace_root.parent / "state"

    @field_validator("faults")
    @classmethod
    def _known_providers(cls, value: dict[str, Faults]) -> dict[str, Faults]:
        unknown = set(value) - {"local", "e2b"}
        if unknown:
            raise ValueError(f"faults for unknown providers: {', '.join(sorted(unknown))}")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str) -> str:
        schemes = ("redis://", "rediss://", "unix://", "redis+sentinel://", "rediss+sentinel://")
        if not url.startswith(schemes):
            raise ValueError(
                "must start with redis://, rediss://, unix:// or redis+sentinel:// "
                "(host:port,host:port/service_name/db)"
            )
        if url.startswith(schemes[3:]):
            path = [part for part in urlsplit(url).path.split("/") if part]
            if not path or not urlsplit(url).netloc.rpartition("@")[2]:
                raise ValueError(
                    "redis+sentinel:// names Sentinels and a service: "
                    "redis+sentinel://host:port[,host:port...]/service_name[/db]"
                )
        return url

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, level: str) -> str:
        return level.upper() if isinstance(level, str) else level

    def resolve_redis_password(self) -> str | None:
        if self.redis_password_file is not None:
            return credential_file(self.redis_password_file).read_text().strip() or None
        if self.redis_password is not None:
            return self.redis_password.get_secret_value()
        return unit_credential("redis-password")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file; the file (model_config["toml_file"]) beats defaults.
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


def resolve_config_path(path: str | os.PathLike[str] | None) -> Path | None:
    """An explicit path must exist; otherwise the system default is used when present."""
    if path is not None:
        explicit = Path(path)
        if not explicit.is_file():
            raise FileNotFoundError(f"config file not found: {explicit}")
        return explicit
    env_path = os.environ.get("SANDBOXD_CONFIG")
    if env_path:
        return resolve_config_path(env_path)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the TOML file (if any), then apply SANDBOXD_* environment overrides."""
    toml_file = resolve_config_path(path)
    if toml_file is None:
        return Config()

    class FileConfig(Config):
        model_config = SettingsConfigDict(toml_file=toml_file)

    return FileConfig()
