"""Runtime state in Redis: one hash per sandbox, a set of all ids, a ready list per pool.

Every state change that touches more than one key is a Lua script, so a client that claims
from a ready list and the daemon that terminates never see half a change.
"""

import dataclasses
import json
import math
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal, NamedTuple, Protocol, TypeVar, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
)
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from sandboxd import decode
from sandboxd.spec import PoolSpec
from sandboxd.store.events import Event, now_rfc3339
from sandboxd.store.keys import LOGS_KEPT_S, Keys

SandboxState = Literal["creating", "ready", "claimed", "released", "resetting", "terminating"]
STATES: tuple[SandboxState, ...] = get_args(SandboxState)
HealthState = Literal["unknown", "healthy", "degraded", "unhealthy"]
# The entry of a handle from a provider's create that goes to the record's `secrets`, not
# its handle (providers name it too: they may not import the store).
SECRETS = "secrets"

# KEYS: sandbox hash, ready list, events. ARGV: id, from state, ready_at, handle,
# available channel, stream maxlen (unused: the daemon's retention trims), secrets ('' =
# keep those the record has), event fields... The event is appended in the same step, so
# no consumer ever sees a claim of a sandbox before the event that made it ready.
_MARK_READY = """
if redis.call('HGET', KEYS[1], 'state') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'ready', 'ready_at', ARGV[3], 'handle', ARGV[4],
  'claimant', '', 'claim_id', '', 'claim_via', '', 'lease_expires_ms', 0)
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'secrets', ARGV[7]) end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('XADD', KEYS[3], '*', unpack(ARGV, 8))
redis.call('PUBLISH', ARGV[5], ARGV[1])
return 1
"""

# KEYS: sandbox hash, ready list, leases. ARGV: id, new state, allowed states...
# Returns the state the sandbox was in if it was one of the allowed ones, else false.
_TRANSITION = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
for i = 3, #ARGV do
  if state == ARGV[i] then
    redis.call('LREM', KEYS[2], 0, ARGV[1])
    redis.call('ZREM', KEYS[3], ARGV[1])
    redis.call('HSET', KEYS[1], 'state', ARGV[2])
    return state
  end
end
return false
"""


# ARGV: key prefix, ids... Returns each sandbox's HGETALL (empty if gone), or the key's
# type when it is not a hash (someone wrote a string there). One script per chunk of ids
# instead of one command each: a reconcile pass reads every record, and per-command client
# overhead made that the daemon's main cost under claim load.
def _read_script(members_only: bool) -> str:
    # members_only: an id not in the id set reads as gone (an empty reply), as it would in
    # a full read (SMEMBERS, then _READ): for ids that may no longer be (or never were)
    # sandboxes.
    gone = (
        "if redis.call('SISMEMBER', ARGV[1] .. ':sandboxes', ARGV[i]) == 0 then\n"
        "    out[i - 1] = {}\n  else"
        if members_only
        else ""
    )
    return f"""
local out = {{}}
for i = 2, #ARGV do
  local key = ARGV[1] .. ':sandbox:' .. ARGV[i]
  local kind = redis.call('TYPE', key).ok
  {gone}if kind == 'hash' or kind == 'none' then
    out[i - 1] = redis.call('HGETALL', key)
  else
    out[i - 1] = kind
  end
end
return out
"""


_READ = _read_script(members_only=False)
READ_CHUNK = 256  # ids per script run: bounds how long one run holds Redis

_READ_MEMBERS = _read_script(members_only=True)

# ARGV: 1 key prefix, then ids. Per id: {state, provider} as written, or {} when its key is
# gone or is not a hash. What the janitor compares with the providers' listings, without
# decoding every record.
_PRESENCE = """
local out = {}
for i = 2, #ARGV do
  local key = ARGV[1] .. ':sandbox:' .. ARGV[i]
  if redis.call('TYPE', key).ok == 'hash' then
    out[i - 1] = redis.call('HMGET', key, 'state', 'provider', 'node')
  else
    out[i - 1] = {}
  end
end
return out
"""

# KEYS: sandbox hash. ARGV: field, value... Only while the record exists and is live (a
# late probe must not resurrect a closed record). Returns state, claimant, claim_id.
_SET_HEALTH = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'terminating' then return false end
redis.call('HSET', KEYS[1], unpack(ARGV))
return redis.call('HMGET', KEYS[1], 'state', 'claimant', 'claim_id')
"""

# KEYS: sandbox hash, events stream, logs stream. ARGV: seq, events maxlen (unused: the
# daemon's retention trims the event stream), logs maxlen,
# JSON list of events (flat field/value lists), JSON list of [seq, time, line]. All or
# nothing, with the cursor: a restarted daemon neither repeats nor skips program news.
_AGENT_NEWS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for _, fields in ipairs(cjson.decode(ARGV[4])) do
  redis.call('XADD', KEYS[2], '*', unpack(fields))
end
for _, line in ipairs(cjson.decode(ARGV[5])) do
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*',
    'seq', line[1], 'time', line[2], 'line', line[3])
end
redis.call('HSET', KEYS[1], 'agent_seq', ARGV[1])
return 1
"""

# KEYS: done marker, record, id set, pool members, ready list, leases, logs, events.
# ARGV: marker ttl s, logs kept s, events maxlen (unused: retention trims), sandbox id
# ('' = no record to close), event fields... A change made while Redis could not be
# reached, written once (the marker), with its event, in one step: replaying it after a
# crash duplicates nothing.
_LATE = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
if ARGV[4] ~= '' then
  redis.call('DEL', KEYS[2])
  redis.call('SREM', KEYS[3], ARGV[4])
  redis.call('SREM', KEYS[4], ARGV[4])
  redis.call('LREM', KEYS[5], 0, ARGV[4])
  redis.call('ZREM', KEYS[6], ARGV[4])
  redis.call('EXPIRE', KEYS[7], ARGV[2])
end
redis.call('XADD', KEYS[8], '*', unpack(ARGV, 5))  -- the daemon's retention trims
return 1
"""
LATE_DONE_S = 7 * 24 * 3600  # how long a late change's marker guards against a replay


class HealthCheck(NamedTuple):
    """One probe's result as a record keeps it: a tuple, not a dict (10,000 records keep
    five each), written to Redis as the object `{"at", "ok", "latency_ms", "detail"}`."""

    at: str = ""
    ok: bool = False
    latency_ms: float = 0.0
    detail: str = ""

    @classmethod
    def of(cls, check: object) -> "HealthCheck | None":
        """From a written check (Redis is input): None for what is not one."""
        if isinstance(check, cls):
            return check
        if not isinstance(check, dict):
            return None
        latency = check.get("latency_ms") or 0.0
        if not isinstance(latency, int | float) or isinstance(latency, bool):
            return None
        try:  # a JSON integer of 400 digits does not fit a float: not a check either
            latency = float(latency)
        except OverflowError:
            return None
        at, detail = check.get("at", ""), check.get("detail") or ""
        if not math.isfinite(latency) or not isinstance(at, str) or not isinstance(detail, str):
            return None
        return cls(at, check.get("ok") is True, latency, detail)


def _health_checks(value: object) -> list[HealthCheck]:
    """A record's checks: a list (else the record is not valid); entries that are not
    checks are left out (a probe's history is not worth quarantining a record for)."""
    if not isinstance(value, list | tuple):
        raise ValueError("health_checks must be a list")
    return [c for c in map(HealthCheck.of, value) if c is not None]


HealthChecks = Annotated[
    list[HealthCheck],
    BeforeValidator(_health_checks),
    PlainSerializer(lambda checks: [c._asdict() for c in checks], return_type=list),
]


class SandboxRecord(BaseModel):
    """`<prefix>:sandbox:<id>` — what sandboxd knows about one sandbox."""

    id: str
    pool: str
    provider: str
    state: SandboxState
    created_at: str = Field(default_factory=now_rfc3339)
    ready_at: str = ""
    template: str
    spec_revision: int
    build: str = Field(
        default="", description="The pool's `build_id` it was made from (a change rolls it over)."
    )
    instance: str = Field(description="The daemon instance that created it.")
    node: str = Field(
        default="",
        max_length=64,
        description="The node whose daemon manages it (local sandboxes; empty: a cloud "
        "sandbox, managed by the cloud leader, or a record from before nodes).",
    )
    handle: dict[str, Any] = Field(default_factory=dict, description="Provider-specific.")
    secrets: dict[str, str] = Field(
        default_factory=dict,
        repr=False,
        description="What the holder of a claim needs to reach this one sandbox besides the "
        "handle (e2b: envd's access token). Secret: clients get it only from the claim "
        "script's reply and from attach (both need the claim token); no view, event or log "
        "shows it. A provider's create hands it over as the handle's `secrets` entry.",
    )
    claimant: str = Field(default="", description="Who holds the claim (client-chosen name).")
    claim_id: str = Field(default="", description="Unique per claim; guards renew/release.")
    claim_via: str = Field(
        default="",
        description="How the claim was made: `api` for a create through `sandboxd api` (E2B's "
        "API), empty for the client library and the CLI.",
    )
    claimed_at_ms: int = Field(default=0, description="Unix ms, Redis clock.")
    lease_s: int = Field(default=0, description="The claim's lease; renew extends by this.")
    max_lease_s: int = 0
    lease_expires_ms: int = Field(default=0, description="Unix ms, Redis clock.")
    uses: int = Field(default=0, description="Claims so far (above 1 only with reuse: reset).")
    replaces: str = Field(default="", description="The lost sandbox this one replaces.")
    health: HealthState = Field(default="unknown", description="Set by the health monitor.")
    health_reason: str = ""
    health_changed_at: str = ""
    health_checks: HealthChecks = Field(
        default_factory=list, description="The last probe results, newest last."
    )
    agent_seq: int = Field(default=0, description="`run:` program news copied up to here.")
    claim_token_digest: str = Field(
        default="", repr=False, description="SHA-1 of the claim token's SHA-256 (claims.py)."
    )

    @field_validator("created_at")
    @classmethod
    def _a_time(cls, value: str) -> str:
        """The reconciler computes ages from it: a record whose time does not parse is
        damaged (quarantined), not a crash in every pass."""
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"not an ISO 8601 time: {value[:40]!r}") from None
        return value

    def to_hash(self) -> dict[str, str]:
        fields = self.model_dump()
        fields["handle"] = json.dumps(self.handle, separators=(",", ":"))
        fields["secrets"] = json.dumps(self.secrets, separators=(",", ":"))
        fields["health_checks"] = json.dumps(
            [c._asdict() for c in self.health_checks], separators=(",", ":")
        )
        fields["spec_revision"] = str(self.spec_revision)
        return fields

    @classmethod
    def from_hash(cls, fields: dict[str, str]) -> "SandboxRecord":
        """The record from its hash, through the decoding layer: a field that is not valid
        UTF-8, too long, nested too deep or of the wrong type raises `decode.BadValue`
        naming the field and the reason (never UnicodeDecodeError or ValidationError)."""
        return _decoded(cls, fields, (("handle", "{}"), ("health_checks", "[]"), ("secrets", "{}")))

    @property
    def created_ts(self) -> float:
        return datetime.fromisoformat(self.created_at).timestamp()


_Model = TypeVar("_Model", bound=BaseModel)


def _decoded(
    model: type[_Model], fields: dict[str, Any], json_fields: tuple[tuple[str, str], ...]
) -> _Model:
    """`model` from hash fields read from Redis, through the decoding layer (see
    `SandboxRecord.from_hash`); `json_fields` are (name, value if absent or empty)."""
    clean: dict[str, Any] = dict(fields)
    if not (decode.plain(list(fields), max_chars=200) and decode.plain(list(fields.values()))):
        clean = {}
        for key, value in fields.items():
            name = decode.text(key, max_chars=200, field=f"field {decode.printable(key)!r}")
            clean[name] = decode.text(value, field=name)
    for name, empty in json_fields:
        clean[name] = decode.json_value(clean.get(name) or empty, max_depth=8, field=name)
    for name in SHARED_VALUES.intersection(clean):
        if type(clean[name]) is str and len(clean[name]) <= 100:
            clean[name] = sys.intern(clean[name])
    try:
        made = model.model_validate(clean)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in error["loc"]) or "(record)"
        raise decode.BadValue(error["msg"], where) from None
    except (ArithmeticError, TypeError, RecursionError) as exc:  # a validator met a value
        raise decode.BadValue(type(exc).__name__, "(record)") from None  # it cannot hold
    share_fields_set(made)
    return made


# Fields whose few distinct values recur in every record: one str object each, not one per
# record (10,000 records kept in memory hold them ten times over otherwise).
SHARED_VALUES = frozenset(
    {"pool", "provider", "state", "template", "instance", "node", "build", "health",
     "health_reason", "claim_via"}
)  # fmt: skip
_ALL_SET: dict[type[BaseModel], set[str]] = {}


def share_fields_set(made: BaseModel) -> None:
    """A model made with every field given shares one "fields set" with all such models of
    its class (pydantic gives each its own: 2.3 KB for a record's 28 fields, 23 MB at 10,000
    records). Safe: pydantic only ever adds field names to it (an assignment), and every
    name is in it already; a copy (`model_copy`) gets its own."""
    cls = type(made)
    given = made.__pydantic_fields_set__
    if len(given) == len(cls.model_fields):
        shared = _ALL_SET.setdefault(cls, set(cls.model_fields))
        if given is not shared:
            object.__setattr__(made, "__pydantic_fields_set__", shared)


class Claimed(BaseModel):
    """What the claim script hands the claimant: the fields of the record it claimed that
    are needed to reach and hold the sandbox (the rest stays in Redis). Each is the
    SandboxRecord field of the same name (a unit test holds them equal)."""

    id: str
    pool: str
    provider: str
    state: SandboxState
    claimant: str = ""
    claim_id: str = ""
    lease_s: int = 0
    lease_expires_ms: int = 0
    handle: dict[str, Any] = Field(default_factory=dict)
    secrets: dict[str, str] = Field(default_factory=dict, repr=False)


CLAIMED_FIELDS = tuple(Claimed.model_fields)


def claimed_from_reply(values: list[Any], sandbox_id: str) -> Claimed:
    """The claim script's reply (HMGET of CLAIMED_FIELDS, in order) for the record of
    `sandbox_id` as a `Claimed`; `decode.BadValue` for a damaged record."""
    if len(values) != len(CLAIMED_FIELDS):
        raise decode.BadValue(f"{len(values)} values for {len(CLAIMED_FIELDS)} fields", "(reply)")
    fields = {n: v for n, v in zip(CLAIMED_FIELDS, values, strict=True) if v is not None}
    claimed = _decoded(Claimed, fields, (("handle", "{}"), ("secrets", "{}")))
    if claimed.id != sandbox_id:
        raise decode.BadValue(f"names another sandbox ({decode.printable(claimed.id)!r})", "id")
    return claimed


@dataclass(frozen=True)
class PassSnapshot:
    """What the last reconcile pass saw: the sandbox records and the pools in force. The
    daemon hands it to the loops that sample between passes (resources, cost, metrics).
    `counts`: records per pool and state, kept as they change (the reconciler's view), so
    a sampler that needs no more than that walks no record; None: count `records`."""

    records: list[SandboxRecord] = field(default_factory=list)
    specs: dict[str, PoolSpec] = field(default_factory=dict)
    counts: dict[str, Counter[str]] | None = None


@dataclass(frozen=True)
class Corrupt:
    """A key whose value cannot be used: a record with a bad field, or a key holding the
    wrong type. `sandbox_id` is set for records; `fields` is what could be read of it."""

    key: str
    reason: str
    field: str = ""
    kind: str = ""  # the key's Redis type when that is the problem
    sandbox_id: str = ""
    fields: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclass
class Scan:
    """One read of every record: the usable ones, and the ones to quarantine."""

    records: list["SandboxRecord"] = dataclasses.field(default_factory=list)
    corrupt: list[Corrupt] = dataclasses.field(default_factory=list)
    others: int = 0  # usable records another daemon manages (see SandboxStore's `owns`)


def wrong_type(exc: BaseException) -> bool:
    """Is this Redis error a key holding another type than the command wanted?"""
    return isinstance(exc, ResponseError) and "WRONGTYPE" in str(exc)


class Presence(NamedTuple):
    """What `SandboxStore.presence` reads of a record: enough to say whose it is and whether
    to look closer, as written (not decoded)."""

    state: str
    provider: str
    node: str


class Owned(Protocol):
    """What says whose a record is (a record, or what `presence` read of it)."""

    @property
    def provider(self) -> str: ...

    @property
    def node(self) -> str: ...


class SandboxStore:
    """Sandbox records. `owns`: which records this reader manages (a daemon sees only its
    node's and, as the cloud leader, the cloud ones; the CLI sees all): the others are left
    out of `scan`, `records` and `get` as if they were not there, and never written."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        owns: Callable[[Owned], bool] | None = None,
    ):
        self._redis = redis
        self._keys = keys
        self._owns = owns
        self._mark_ready = redis.register_script(_MARK_READY)
        self._transition = redis.register_script(_TRANSITION)
        self._read = redis.register_script(_READ)
        self._read_members = redis.register_script(_READ_MEMBERS)
        self._presence = redis.register_script(_PRESENCE)
        self._set_health = redis.register_script(_SET_HEALTH)
        self._agent_news = redis.register_script(_AGENT_NEWS)
        self._late = redis.register_script(_LATE)

    @property
    def redis(self) -> Redis:
        return self._redis

    @property
    def keys(self) -> Keys:
        return self._keys

    async def records(self) -> list[SandboxRecord]:
        """Every usable record (the corrupt ones are left out: see `scan`)."""
        return (await self.scan()).records

    async def scan(self) -> Scan:
        """Read every record; what cannot be used is reported in `corrupt`, never raised.
        A `<prefix>:sandboxes` of the wrong type is reported as such, with no records."""
        result = Scan()
        try:
            members = await self._redis.smembers(self._keys.sandboxes)
        except ResponseError as exc:
            if not wrong_type(exc):
                raise
            kind = await self._redis.type(self._keys.sandboxes)
            result.corrupt.append(
                Corrupt(self._keys.sandboxes, f"holds a {kind}, not a set", kind=kind)
            )
            return result
        ids = sorted(members)
        for start in range(0, len(ids), READ_CHUNK):
            chunk = ids[start : start + READ_CHUNK]
            replies = await self._read(args=[self._keys.prefix, *chunk])
            for sandbox_id, flat in zip(chunk, replies, strict=True):
                if flat:
                    self._decode(sandbox_id, flat, result)
        return result

    async def presence(self) -> dict[str, Presence]:
        """Every recorded id with its state, provider and node as written (not decoded: a
        few microseconds a record instead of a full read's tens), whoever owns it. An id
        whose key is gone or not a hash is left out, as a full read leaves it out; so is
        everything when the id set holds another type."""
        try:
            ids = sorted(await self._redis.smembers(self._keys.sandboxes))
        except ResponseError as exc:
            if not wrong_type(exc):
                raise
            return {}
        found: dict[str, Presence] = {}
        for start in range(0, len(ids), READ_CHUNK):
            chunk = ids[start : start + READ_CHUNK]
            replies = await self._presence(args=[self._keys.prefix, *chunk])
            for sandbox_id, reply in zip(chunk, replies, strict=True):
                if isinstance(reply, list) and len(reply) == 3:
                    found[sandbox_id] = Presence(*(str(part or "") for part in reply))
        return found

    async def read(self, ids: list[str]) -> Scan:
        """Read these records only (what changed since a full read): those that are gone,
        or not in the id set, are simply not in the result; damaged ones are in `corrupt`,
        like `scan`. The id set of the wrong type is a WRONGTYPE error here."""
        result = Scan()
        for start in range(0, len(ids), READ_CHUNK):
            chunk = ids[start : start + READ_CHUNK]
            replies = await self._read_members(args=[self._keys.prefix, *chunk])
            for sandbox_id, flat in zip(chunk, replies, strict=True):
                if flat:
                    self._decode(sandbox_id, flat, result)
        return result

    def _decode(self, sandbox_id: str, flat: list[str] | str, result: Scan) -> None:
        key = self._keys.sandbox(sandbox_id)
        if isinstance(flat, str):
            result.corrupt.append(
                Corrupt(key, f"holds a {flat}, not a hash", kind=flat, sandbox_id=sandbox_id)
            )
            return
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        try:
            record = SandboxRecord.from_hash(fields)
            if record.id != sandbox_id:
                raise decode.BadValue(
                    f"{decode.printable(record.id)!r} in the record of another id", "id"
                )
        except decode.BadValue as exc:
            corrupt = Corrupt(key, exc.reason, exc.field, sandbox_id=sandbox_id, fields=fields)
            result.corrupt.append(corrupt)
            return
        if not self.owns(record):
            result.others += 1
            return
        result.records.append(record)

    async def sync_members(self, records: list[SandboxRecord]) -> None:
        """Heal the per-pool member sets from a snapshot: add what it holds, then drop ids
        that are no longer sandboxes at all (sets written before an upgrade, a lost write)."""
        pools: dict[str, list[str]] = {}
        for record in records:
            pools.setdefault(record.pool, []).append(record.id)
        async with self._redis.pipeline(transaction=True) as pipe:
            for pool, ids in pools.items():
                members = self._keys.pool_members(pool)
                pipe.sadd(members, *ids)
                pipe.sinterstore(members, [members, self._keys.sandboxes])
            await pipe.execute()

    def owns(self, record: Owned) -> bool:
        """Is this record (or what `presence` read of it) one this reader manages?"""
        return self._owns is None or self._owns(record)

    async def get(self, sandbox_id: str) -> SandboxRecord | None:
        """The record, or None if it is gone or cannot be used (the reconciler's next scan
        quarantines it)."""
        try:
            fields = await self._redis.hgetall(self._keys.sandbox(sandbox_id))
            record = SandboxRecord.from_hash(fields) if fields else None
            if record is not None and not self.owns(record):
                return None
            return record
        except decode.BadValue:
            return None
        except ResponseError as exc:
            if wrong_type(exc):
                return None
            raise

    async def has_id_set(self) -> bool:
        return bool(await self._redis.exists(self._keys.sandboxes))

    async def has_record_key(self, sandbox_id: str) -> bool:
        return bool(await self._redis.exists(self._keys.sandbox(sandbox_id)))

    async def readd_id(self, sandbox_id: str) -> None:
        await self._redis.sadd(self._keys.sandboxes, sandbox_id)

    async def add(self, record: SandboxRecord) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._keys.sandbox(record.id), mapping=record.to_hash())
            pipe.sadd(self._keys.sandboxes, record.id)
            pipe.sadd(self._keys.pool_members(record.pool), record.id)
            await pipe.execute()

    async def mark_ready(
        self,
        record: SandboxRecord,
        handle: dict[str, Any],
        event: Event,
        *,
        from_state: SandboxState = "creating",
        maxlen: int = 100_000,
    ) -> bool:
        """`from_state` -> ready, onto the pool's ready list, `event` appended, waiters woken.
        A `secrets` entry of the handle (see `SandboxRecord.secrets`) is stored apart from
        it; without one the record keeps the secrets it has (a reset sandbox).

        False if the sandbox is no longer in `from_state` (pool drained, daemon stopping).
        """
        handle = dict(handle)
        secrets = handle.pop(SECRETS, None)
        keys = [
            self._keys.sandbox(record.id),
            self._keys.pool_ready(record.pool),
            self._keys.events,
        ]
        handle_json = json.dumps(handle, separators=(",", ":"))
        channel = self._keys.pool_available(record.pool)
        args = [record.id, from_state, now_rfc3339(), handle_json, channel, maxlen]
        args.append(json.dumps(secrets, separators=(",", ":")) if secrets else "")
        args += [x for pair in event.to_fields().items() for x in pair]
        return bool(await self._mark_ready(keys=keys, args=args))

    async def transition(
        self, record: SandboxRecord, to: SandboxState, *allowed: SandboxState
    ) -> str | None:
        """Move the sandbox to `to` (off the ready list, lease dropped) if it is in one of
        `allowed`; returns the state it was in, None if it was not."""
        keys = [
            self._keys.sandbox(record.id),
            self._keys.pool_ready(record.pool),
            self._keys.leases,
        ]
        previous = await self._transition(keys=keys, args=[record.id, to, *allowed])
        return previous or None

    async def begin_terminate(self, record: SandboxRecord, *states: SandboxState) -> str | None:
        """Take the sandbox out of circulation if it is in one of `states`; its old state."""
        return await self.transition(record, "terminating", *states)

    async def remove(self, record: SandboxRecord) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._keys.sandbox(record.id))
            pipe.srem(self._keys.sandboxes, record.id)
            pipe.srem(self._keys.pool_members(record.pool), record.id)
            pipe.lrem(self._keys.pool_ready(record.pool), 0, record.id)
            pipe.zrem(self._keys.leases, record.id)
            pipe.expire(self._keys.sandbox_logs(record.id), LOGS_KEPT_S)
            await pipe.execute()

    async def set_health(self, sandbox_id: str, **fields: Any) -> list[str] | None:
        """Write health fields into a live record: [state, claimant, claim_id], or None if
        the record is gone or being terminated."""
        args = [
            x
            for key, value in fields.items()
            for x in (key, value if isinstance(value, str) else json.dumps(value))
        ]
        reply = await self._set_health(keys=[self._keys.sandbox(sandbox_id)], args=args)
        return reply or None

    async def agent_news(
        self,
        sandbox_id: str,
        seq: int,
        events: list[Event],
        lines: list[list[Any]],
        *,
        events_maxlen: int,
        logs_maxlen: int,
    ) -> bool:
        """Append the program's events and output lines and move the record's cursor."""
        flat = [[x for pair in e.to_fields().items() for x in pair] for e in events]
        keys = [
            self._keys.sandbox(sandbox_id),
            self._keys.events,
            self._keys.sandbox_logs(sandbox_id),
        ]
        args = [seq, events_maxlen, logs_maxlen, json.dumps(flat), json.dumps(lines)]
        return bool(await self._agent_news(keys=keys, args=args))

    async def write_late(
        self, event: Event, *, close: str = "", pool: str = "", maxlen: int = 100_000
    ) -> bool:
        """Write a change made while Redis could not be reached: close the record of
        `close` (of `pool`), if any, and append `event`, unless this event was written
        before (its id's marker). True if written now."""
        keys = [
            self._keys.late_done(event.id),
            self._keys.sandbox(close),
            self._keys.sandboxes,
            self._keys.pool_members(pool),
            self._keys.pool_ready(pool),
            self._keys.leases,
            self._keys.sandbox_logs(close),
            self._keys.events,
        ]
        args = [LATE_DONE_S, LOGS_KEPT_S, maxlen, close]
        args += [x for pair in event.to_fields().items() for x in pair]
        return bool(await self._late(keys=keys, args=args))
