"""The desired state: pools of sandboxes, as operators write it into Redis."""

import hashlib
import json
from collections.abc import Mapping
from datetime import date, datetime, time, timedelta
from functools import cached_property
from typing import Annotated, Any, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sandboxd import decode
from sandboxd.config import ENV_NAME, Config

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
TEMPLATE_ALIAS = r"^[a-z0-9][a-z0-9._-]{0,99}$"  # an E2B template's name or id
LABEL_KEY = r"^[A-Za-z0-9]([-A-Za-z0-9_./]{0,61}[A-Za-z0-9])?$"
# $HOME and $TMPDIR, not /workspace and /tmp: without bubblewrap those are the host's own.
DEFAULT_RESET = 'find "$HOME" "${TMPDIR:-/tmp}" -mindepth 1 -delete'
# The fields a sandbox is made from: changing one rolls the pool's ready sandboxes over.
BUILD_FIELDS = (
    "provider",
    "template",
    "env",
    "network",
    "network_private",
    "cpu",
    "memory_mb",
    "pids_max",
    "disk_mb",
    "security",
    "run",
)


# What the local provider's seccomp filter denies (providers/local/seccomp.py builds it);
# a pool's `security.allow_syscalls` names entries of this table, or ptrace / vsock, which
# are denied only with some arguments.
DENIED_SYSCALLS: tuple[str, ...] = (
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "lookup_dcookie",
    "mount",
    "umount2",
    "pivot_root",
    "mount_setattr",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "chroot",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "sethostname",
    "setdomainname",
    "iopl",
    "ioperm",
    "quotactl",
    "nfsservctl",
    "vhangup",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "open_by_handle_at",
    "name_to_handle_at",
    "setns",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
)
ALLOWABLE_SYSCALLS = frozenset(DENIED_SYSCALLS) | {"ptrace", "vsock"}


DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _expand_days(items: list[str]) -> list[str]:
    """["mon-fri", "sun"] -> ["mon", …, "fri", "sun"] (ranges may wrap: "fri-mon")."""
    days: list[str] = []
    for item in items:
        first, _, last = item.strip().lower().partition("-")
        for name in (first, last or first):
            if name not in DAYS:
                raise ValueError(f"{name!r} is not a day (use {', '.join(DAYS)})")
        i, end = DAYS.index(first), DAYS.index(last or first)
        while True:
            if DAYS[i] not in days:
                days.append(DAYS[i])
            if i == end:
                break
            i = (i + 1) % 7
    return days


class ScheduleWindow(BaseModel):
    """`{days: [mon-fri], from: "09:30", to: "16:00", timezone: America/New_York,
    min_ready: 20}`: from (inclusive) to (exclusive) local time; `to` at or before `from`
    runs past midnight into the next day. The first active window of a pool wins."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )

    days: list[str] = Field(
        default_factory=lambda: list(DAYS),
        min_length=1,
        description="Day names or ranges: [mon-fri], [sat, sun], [fri-mon]. Default: every day.",
    )
    start: time = Field(
        alias="from", description="HH:MM or HH:MM:SS, local time, inclusive: the window's start."
    )
    end: time = Field(
        alias="to",
        description="HH:MM or HH:MM:SS, local time, exclusive. At or before `from`: the window "
        "runs past midnight (00:00 to 00:00: the whole day).",
    )
    timezone: str = Field(
        default="UTC",
        description="IANA name, e.g. America/New_York: daylight saving time is followed.",
    )
    min_ready: int | None = Field(
        default=None,
        ge=0,
        le=10_000,
        description="min_ready while the window is active (unset: the pool's). A window sets "
        "min_ready, max_total or both; min_ready <= max_total is checked per window.",
    )
    max_total: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description="max_total while the window is active (unset: the pool's).",
    )

    @field_validator("days", mode="before")
    @classmethod
    def _days(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        return _expand_days(value) if isinstance(value, list) else value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {name!r}") from None
        return name

    @model_validator(mode="after")
    def _overrides(self) -> "ScheduleWindow":
        if self.min_ready is None and self.max_total is None:
            raise ValueError("a window sets min_ready, max_total or both")
        if self.start == self.end and self.start != time(0):
            raise ValueError("from and to are equal (use 00:00 to 00:00 for whole days)")
        return self

    def label(self) -> str:
        return f"{','.join(self.days)} {self.start:%H:%M:%S}-{self.end:%H:%M:%S} {self.timezone}"

    def spans(self, around: datetime) -> list[tuple[datetime, datetime]]:
        """The window's occurrences from the day before `around` to a week after."""
        zone = ZoneInfo(self.timezone)
        local_day = around.astimezone(zone).date()
        found = []
        for offset in range(-1, 8):
            day = local_day + timedelta(days=offset)
            if DAYS[day.weekday()] in self.days:
                found.append(self._span(day, zone))
        return found

    def _span(self, day: date, zone: ZoneInfo) -> tuple[datetime, datetime]:
        begins = datetime.combine(day, self.start, tzinfo=zone)
        end_day = day if self.end > self.start else day + timedelta(days=1)
        return begins, datetime.combine(end_day, self.end, tzinfo=zone)

    def active(self, now: datetime) -> bool:
        return any(begins <= now < ends for begins, ends in self.spans(now))


class HealthSpec(BaseModel):
    """How each sandbox of a pool is probed (besides its agent's own liveness)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: str | None = Field(
        default=None,
        max_length=4096,
        description="Shell command run in the sandbox; exit 0 is healthy. None: liveness only.",
    )
    interval_s: float = Field(
        default=30.0,
        ge=0.1,
        le=86400,
        description="Between probes of one sandbox; the first comes at a random point of the "
        "first interval.",
    )
    timeout_s: float = Field(default=5.0, gt=0, le=3600, description="A slower probe fails.")
    failure_threshold: int = Field(
        default=3, ge=1, le=100, description="Consecutive failures that make it unhealthy."
    )
    degraded_latency_ms: float = Field(
        default=2000.0, gt=0, description="A passing probe slower than this is `degraded`."
    )


RUN_FILES, RUN_FILES_BYTES = 32, 256 * 1024


class RunSpec(BaseModel):
    """A long-running program kept running in every sandbox of the pool (an agent)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: str = Field(
        min_length=1,
        max_length=4096,
        description="Shell command of the program, started in every sandbox once it is ready.",
    )
    restart: Literal["on-failure", "always", "never"] = Field(
        default="on-failure",
        description="When the program is restarted: on-failure (a non-zero exit or a signal), "
        "always, or never.",
    )
    backoff_s: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        description="First restart delay; it doubles per restart, capped by max_backoff_s, "
        "jittered (x0.5-1).",
    )
    max_backoff_s: float = Field(
        default=60.0, gt=0, le=86400, description="Cap of the restart delay."
    )
    stable_s: float = Field(
        default=10.0, gt=0, le=86400, description="A run at least this long resets the delay."
    )
    max_restarts: int = Field(
        default=5,
        ge=0,
        le=10_000,
        description="More restarts than this within window_s: agent.failed, and the sandbox "
        "is replaced.",
    )
    window_s: float = Field(
        default=60.0, gt=0, le=86400, description="The window max_restarts counts in, seconds."
    )
    files: dict[str, str] = Field(
        default_factory=dict,
        max_length=RUN_FILES,
        description="Small files the program needs (path relative to $HOME: its text), "
        f"written before it starts and again after every reset; at most {RUN_FILES} files "
        f"and {RUN_FILES_BYTES // 1024} KiB in all. Anything bigger belongs in the template.",
    )

    @field_validator("files")
    @classmethod
    def _relative_paths(cls, files: dict[str, str]) -> dict[str, str]:
        for path in files:
            parts = path.split("/")
            if not path or path.startswith("/") or ".." in parts or "" in parts or "\0" in path:
                raise ValueError(f"{path!r}: a relative path below $HOME, without '..'")
            if len(path) > 255:
                raise ValueError(f"{path[:40]!r}...: a path of at most 255 characters")
        size = sum(len(path) + len(text.encode()) for path, text in files.items())
        if size > RUN_FILES_BYTES:
            raise ValueError(f"files hold {size} bytes, more than {RUN_FILES_BYTES}")
        return files


class BreakerSpec(BaseModel):
    """The pool's circuit breaker on creates. Two permanent errors in a row (the one that
    opened it and the trial) put the pool in state `failed` (`pool.failed`): no more creates
    until its spec changes or the daemon restarts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    failures: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="Consecutive failed create attempts that open it (a permanent error opens "
        "it at once).",
    )
    cooldown_s: float = Field(
        default=30.0,
        gt=0,
        le=86400,
        description="Open this long, then one trial create (half-open); a success closes it.",
    )
    max_cooldown_s: float = Field(
        default=600.0,
        gt=0,
        le=86400,
        description="A failed trial doubles the cooldown, up to this.",
    )


class E2BPoolSpec(BaseModel):
    """How a pool's E2B sandboxes are created and kept warm (`provider: e2b` only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: int = Field(
        default=300,
        ge=1,
        le=86400,
        description="E2B's own timeout per sandbox: E2B kills it when it runs out, unless "
        "it is kept alive (capped at the config's e2b.max_timeout_s).",
    )
    keepalive: Literal["extend", "recycle"] = Field(
        default="extend",
        description="extend: set_timeout again when half the timeout is left. recycle: "
        "replace ready sandboxes at half their timeout (make-before-break).",
    )
    idle: Literal["run", "pause"] = Field(
        default="run",
        description="pause: ready sandboxes are paused (no billing) and resumed by the "
        "client's connect on claim.",
    )
    allow_internet_access: bool = Field(default=True, description="Passed to E2B at create.")


class SecuritySpec(BaseModel):
    """local: allowances in the sandbox's seccomp filter (docs/security.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow_syscalls: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="Calls of the seccomp filter's deny list this pool may use after all "
        "(names from the filter's table, or ptrace, vsock).",
    )
    nested_userns: bool = Field(
        default=False,
        description="Allow user namespaces inside the sandbox (rootless containers).",
    )

    @field_validator("allow_syscalls")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        unknown = sorted(set(names) - ALLOWABLE_SYSCALLS)
        if unknown:
            raise ValueError(f"not denied by the filter, nothing to allow: {unknown}")
        return names


class PoolSpec(BaseModel):
    """One warm pool: how many sandboxes of which kind to keep ready."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        pattern=DNS_LABEL, description="A DNS label (at most 63 characters), unique in the spec."
    )
    provider: Literal["local", "e2b"] = Field(
        default="local",
        description="local: sandboxes on this host. e2b: the E2B cloud (docs/e2b.md).",
    )
    template: str = Field(
        default="base",
        min_length=1,
        max_length=200,
        description="local: a template of the daemon config (local.templates); e2b: an E2B "
        "template name or id.",
    )
    min_ready: int = Field(
        default=1, ge=0, le=10_000, description="Warm sandboxes kept ready; at most max_total."
    )
    max_total: int = Field(
        default=10,
        ge=1,
        le=10_000,
        description="Hard cap on the pool's sandboxes in any state (creating, ready, claimed, "
        "terminating).",
    )
    cpu: float = Field(
        default=1.0,
        gt=0,
        le=256,
        description="local: CPU quota of the whole sandbox (cgroup cpu.max / cpu.cfs_quota_us). "
        "The cost estimate prices it (e2b: set it to the template's size).",
    )
    memory_mb: int = Field(
        default=512,
        gt=0,
        le=1_048_576,
        description="local: memory of the whole process tree, tmpfs writes included (cgroup "
        "memory.max / memory.limit_in_bytes). The cost estimate prices it, like cpu.",
    )
    timeout_s: int = Field(
        default=3600,
        gt=0,
        le=30 * 86400,
        description="Lifetime cap of any sandbox, claimed ones too (reason timeout; the event "
        "names the claim).",
    )
    network: bool = Field(
        default=False,
        description="local: egress through user-mode NAT (slirp4netns) in the sandbox's own "
        "network namespace, behind a filter: never the host's own addresses, loopback, "
        "link-local (cloud metadata) or slirp's gateway; false: only its own lo.",
    )
    network_private: bool = Field(
        default=False,
        description="local, with network: true: also reach private addresses (RFC 1918, "
        "100.64.0.0/10, IPv6 fc00::/7), i.e. other hosts of the host's networks. The host's "
        "own addresses stay unreachable either way.",
    )
    pids_max: int = Field(
        default=512,
        ge=8,
        le=4_194_304,
        description="local: processes and threads of the sandbox at once (cgroup pids.max).",
    )
    disk_mb: int = Field(
        default=1024,
        ge=1,
        le=1_048_576,
        description="local: size of each of /workspace, /tmp and /dev/shm (tmpfs, counted in "
        "memory_mb as it is written).",
    )
    security: SecuritySpec = Field(default_factory=lambda: SecuritySpec())
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment of everything run in the sandbox."
    )
    labels: dict[
        Annotated[str, Field(pattern=LABEL_KEY)], Annotated[str, Field(max_length=253)]
    ] = Field(
        default_factory=dict,
        description="Free-form metadata (e2b: sent as the sandbox's metadata).",
    )
    lease_s: int = Field(
        default=300, ge=1, le=30 * 86400, description="Default lease of a claim, in seconds."
    )
    max_lease_s: int = Field(
        default=3600,
        ge=1,
        le=30 * 86400,
        description="The longest lease a claim or renew may ask for; at least lease_s.",
    )
    on_empty: Literal["wait", "create"] = Field(
        default="wait",
        description="Empty pool: claimers wait for replenishment, or each waiting claimer "
        "also asks for one more sandbox (up to max_total).",
    )
    reuse: Literal["never", "reset"] = Field(
        default="never",
        description="never: a released sandbox is terminated. reset: from the host side, "
        "every process in it is killed (its namespaces and tmpfs mounts go with them), it is "
        "started afresh under the same id, reset_command runs, and it goes back to ready; it "
        "is terminated if that fails.",
    )
    reset_command: str = Field(
        default=DEFAULT_RESET,
        min_length=1,
        max_length=4096,
        description="Shell command run by reuse: reset ($HOME is /workspace).",
    )
    health: HealthSpec = Field(default_factory=HealthSpec)
    run: RunSpec | None = Field(
        default=None,
        description="A supervised program (an agent) kept running in every sandbox (local "
        "and e2b; README: supervised programs).",
    )
    replace_claimed: bool = Field(
        default=False,
        description="Terminate and replace an unhealthy claimed sandbox (default: only "
        "report it, naming the claim, and leave it to its holder).",
    )
    idle_ttl_s: int | None = Field(
        default=None,
        gt=0,
        le=30 * 86400,
        description="Ready sandboxes older than this are recycled, oldest first, max_surge at "
        "a time, each replacement made before the old one goes (reason idle_ttl).",
    )
    max_surge: int = Field(
        default=10,
        ge=1,
        le=1000,
        description="Most creates of the pool in flight at once: slow start lets 1 run, +1 "
        "per create that succeeds, halved on a failed attempt, up to this. Also the batch of "
        "a rolling replacement (idle_ttl_s, a changed build, e2b recycle).",
    )
    breaker: BreakerSpec = Field(default_factory=BreakerSpec)
    e2b: E2BPoolSpec | None = Field(
        default=None, description="provider e2b only: how its sandboxes are made and kept warm."
    )
    schedule: list[ScheduleWindow] = Field(
        default_factory=list,
        max_length=100,
        description="Windows overriding min_ready/max_total while active (first match wins).",
    )
    e2b_alias: list[Annotated[str, Field(pattern=TEMPLATE_ALIAS)]] = Field(
        default_factory=list,
        max_length=20,
        description="More names by which `sandboxd api` (E2B's API) finds this pool: a "
        "`Sandbox.create(template)` of one of them claims from it, so programs written for "
        "E2B's template names (`base`, `code-interpreter-v1`) need no change. Unique across "
        "the spec, pool names included.",
    )
    schedule_ramp_s: float = Field(
        default=60.0,
        ge=0,
        le=86400,
        description="When a window starts or ends, the sizes move linearly to the new target "
        "over this many seconds (0: at once).",
    )

    @cached_property
    def build_id(self) -> str:
        """What a sandbox of this pool is made from (`BUILD_FIELDS`), as a short hash: a
        ready sandbox of another build was made from an older spec and is rolled over."""
        shape = self.model_dump(mode="json", include=set(BUILD_FIELDS))
        if not self.network_private:  # added later: builds from before it keep their id
            del shape["network_private"]
        text = json.dumps(shape, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def e2b_settings(self) -> E2BPoolSpec:
        return self.e2b or E2BPoolSpec()

    def recycle_after_s(self) -> float | None:
        """Ready sandboxes older than this are replaced: idle_ttl_s, and for E2B pools
        that recycle instead of extending, half of E2B's timeout."""
        ttl: float | None = self.idle_ttl_s
        settings = self.e2b_settings
        if self.provider == "e2b" and settings.keepalive == "recycle" and settings.idle == "run":
            half = settings.timeout_s / 2
            ttl = half if ttl is None else min(ttl, half)
        return ttl

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for name in env:
            if not ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
        return env

    @model_validator(mode="after")
    def _sizes(self) -> "PoolSpec":
        if self.min_ready > self.max_total:
            raise ValueError(
                f"min_ready ({self.min_ready}) must not exceed max_total ({self.max_total})"
            )
        if self.lease_s > self.max_lease_s:
            raise ValueError(
                f"lease_s ({self.lease_s}) must not exceed max_lease_s ({self.max_lease_s})"
            )
        if self.e2b is not None and self.provider != "e2b":
            raise ValueError("e2b: settings only apply to pools with provider e2b")
        for i, window in enumerate(self.schedule):
            low = self.min_ready if window.min_ready is None else window.min_ready
            high = self.max_total if window.max_total is None else window.max_total
            if low > high:
                raise ValueError(
                    f"schedule[{i}] ({window.label()}): min_ready ({low}) must not exceed "
                    f"max_total ({high})"
                )
        return self


class Spec(BaseModel):
    """What an operator applies: a list of pools."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pools: list[PoolSpec] = Field(default_factory=list)

    @field_validator("pools")
    @classmethod
    def _unique_names(cls, pools: list[PoolSpec]) -> list[PoolSpec]:
        seen: set[str] = set()
        for pool in pools:
            if pool.name in seen:
                raise ValueError(f"pool name {pool.name!r} is used more than once")
            seen.add(pool.name)
        named: dict[str, str] = {pool.name: pool.name for pool in pools}
        for pool in pools:
            for alias in pool.e2b_alias:
                other = named.setdefault(alias, pool.name)
                if other != pool.name:
                    raise ValueError(
                        f"e2b_alias {alias!r} of pool {pool.name!r} already names pool "
                        f"{other!r}: a template name must find one pool"
                    )
        return pools

    def pool(self, name: str) -> PoolSpec | None:
        return next((p for p in self.pools if p.name == name), None)


class SpecDocument(Spec):
    """The spec as stored at `<prefix>:spec`: the operator's spec plus its revision."""

    revision: int = Field(ge=1)
    applied_at: str = ""


SpecT = TypeVar("SpecT", bound=Spec)


class SpecError(ValueError):
    """An invalid spec; `problems` lists `field path: reason` lines."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def _field_path(loc: tuple[Any, ...], data: Any) -> str:
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            name = node[item].get("name") if _is_pool_list(node, item) else None
            parts.append(f"[{item}]" + (f"({name})" if name else ""))
        else:
            parts.append(("." if parts else "") + str(item))
        node = _descend(node, item)
    return "".join(parts) or "(spec)"


def _is_pool_list(node: Any, index: int) -> bool:
    return isinstance(node, list) and index < len(node) and isinstance(node[index], Mapping)


def _descend(node: Any, item: Any) -> Any:
    try:
        return node[item]
    except (KeyError, IndexError, TypeError):
        return None


def _problems(error: ValidationError, data: Any) -> list[str]:
    problems = []
    for err in error.errors(include_url=False):
        loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        problems.append(f"{_field_path(loc, data)}: {msg}")
    return problems


def parse_spec(text: str | bytes) -> Spec:
    """Parse an operator's YAML or JSON spec file; raise SpecError naming field and reason.
    Bytes that are not UTF-8, NUL characters and nesting past `decode.MAX_JSON_DEPTH` are
    refused before the YAML parser (which recurses) sees them."""
    try:
        text = decode.text(text, max_chars=decode.MAX_SPEC_CHARS)
        depth = decode.json_depth(text)
        if depth > decode.MAX_JSON_DEPTH:
            raise decode.BadValue(f"nested {depth} deep (at most {decode.MAX_JSON_DEPTH})")
    except decode.BadValue as exc:
        raise SpecError([f"(file): {exc.reason}"]) from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise SpecError([f"(file): nested too deeply (at most {decode.MAX_JSON_DEPTH})"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or str(exc)
        raise SpecError([f"(file): malformed YAML/JSON{where}: {reason}"]) from None
    if not isinstance(data, Mapping):
        raise SpecError(["(spec): must be a mapping with a `pools:` list"])
    return validate_spec(data, Spec)


def validate_spec(data: Any, model: type[SpecT], *, may_hold_nul: bool = True) -> SpecT:
    """`may_hold_nul`: False when the JSON text it came from has no NUL and no `\\u0000`
    (then the walk looking for NULs, megabytes for 20,000 pools, is skipped)."""
    nul = (
        [f"{_field_path(loc, data)}: must not contain NUL characters" for loc in _nul(data, ())]
        if may_hold_nul
        else []
    )
    if nul:  # a NUL cannot reach a process's environment or argv: every exec would fail
        raise SpecError(nul)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_problems(exc, data)) from None


def _nul(node: Any, loc: tuple[Any, ...], depth: int = 0) -> list[tuple[Any, ...]]:
    """Where strings (values or keys) hold a NUL character; the input's nesting is already
    bounded (`decode.MAX_JSON_DEPTH`), and this stops there too."""
    if isinstance(node, str):
        return [loc] if "\x00" in node else []
    if depth > decode.MAX_JSON_DEPTH:
        return []
    found = []
    if isinstance(node, Mapping):
        for key, value in node.items():
            if isinstance(key, str) and "\x00" in key:
                found.append((*loc, key))
            found += _nul(value, (*loc, key), depth + 1)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _nul(value, (*loc, i), depth + 1)
    return found


def parse_document(raw: str | bytes) -> SpecDocument:
    """Parse what is stored in Redis at `<prefix>:spec` (through `decode`: encoding, size
    and nesting are checked before JSON is parsed)."""
    try:
        data = decode.json_value(raw, max_chars=decode.MAX_SPEC_CHARS)
    except decode.BadValue as exc:
        raise SpecError([f"(document): {exc.reason}"]) from None
    if not isinstance(data, Mapping):
        raise SpecError(["(document): must be a JSON object"])
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    return validate_spec(data, SpecDocument, may_hold_nul="\x00" in text or "\\u0000" in text)


def check_against_config(spec: Spec, config: Config) -> None:
    """What only the daemon's config can tell: does each local template exist?"""
    templates = config.local.all_templates()
    problems = [
        f"pools[{i}]({pool.name}).template: unknown local template {pool.template!r}"
        f" (configured: {', '.join(sorted(templates))})"
        for i, pool in enumerate(spec.pools)
        if pool.provider == "local" and pool.template not in templates
    ]
    if problems:
        raise SpecError(problems)


def diff_specs(old: Spec | None, new: Spec) -> list[str]:
    """Human-readable changes from old to new, one line each."""
    old_pools = {p.name: p for p in (old.pools if old else [])}
    new_pools = {p.name: p for p in new.pools}
    lines = [f"+ pool {name}" for name in new_pools if name not in old_pools]
    lines += [f"- pool {name} (drained)" for name in old_pools if name not in new_pools]
    for name in new_pools.keys() & old_pools.keys():
        before, after = old_pools[name].model_dump(), new_pools[name].model_dump()
        lines += [
            f"~ pool {name}: {key} {_shown(key, before[key])} -> {_shown(key, after[key])}"
            for key in after
            if before[key] != after[key]
        ]
    return sorted(lines, key=lambda line: line[2:])


def _shown(key: str, value: Any) -> str:
    """A value for a diff line, which reaches logs, events and every client: env values may
    be secrets, so env shows its names and which values changed, never the values."""
    if key == "env" and isinstance(value, dict):
        return "{" + ", ".join(f"{name!r}: '***'" for name in sorted(value)) + "}"
    return repr(value)
