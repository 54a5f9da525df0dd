"""`sandboxd claim | release | renew | exec`: the client library behind a command line."""

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

from sandboxd.agentclient import AgentError
from sandboxd.claims import ClaimError
from sandboxd.client import ClaimTimeout, Client, Sandbox
from sandboxd.clierror import EXIT_EXEC_TIMEOUT, EXIT_INVALID, EXIT_NO_SANDBOX, CliError
from sandboxd.config import Config
from sandboxd.connections import UnreachableSandbox
from sandboxd.tables import render

CLAIM_COLUMNS = [
    ("id", "ID"),
    ("pool", "POOL"),
    ("claim_id", "CLAIM_ID"),
    ("lease_s", "LEASE_S"),
    ("lease_expires", "LEASE_EXPIRES"),
]
# Refusals that are the caller's mistake, not a passing condition.
INVALID_REASONS = {"unknown_pool", "lease_too_long"}


def _client(config: Config, redis: Redis, owner: str | None = None) -> Client:
    return Client(
        redis,
        prefix=config.key_prefix,
        owner=owner,
        event_stream_maxlen=config.event_stream_maxlen,
        credentials=_credentials(config),
    )


def _credentials(config: Config) -> dict[str, str]:
    """The CLI reaches E2B sandboxes with the key the config names, like the daemon."""
    try:
        key = config.e2b.resolve_api_key()
    except OSError:
        key = None  # e.g. the daemon's credential file, unreadable to this user
    return {"e2b": key} if key else {}


def _cli_error(exc: ClaimError) -> CliError:
    if isinstance(exc, ClaimTimeout):
        return CliError(str(exc), EXIT_NO_SANDBOX)
    return CliError(str(exc), EXIT_INVALID if exc.reason in INVALID_REASONS else 1)


def _expires(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def claim_row(sandbox: Sandbox) -> dict[str, Any]:
    return {
        "id": sandbox.id,
        "pool": sandbox.pool,
        "provider": sandbox.provider,
        "claim_id": sandbox.claim_id,
        "claimant": sandbox.claimant,
        "lease_s": sandbox.lease_s,
        "lease_expires": _expires(sandbox.lease_expires_ms),
        "lease_expires_ms": sandbox.lease_expires_ms,
        "connection": sandbox.connection_info,
    }


async def claim(args: argparse.Namespace, config: Config, redis: Redis) -> int:
    client = _client(config, redis, args.owner)
    try:
        sandbox = await client.claim(args.pool, lease_s=args.lease, timeout_s=args.wait)
    except ClaimError as exc:
        raise _cli_error(exc) from None
    row = claim_row(sandbox)
    print(json.dumps(row, indent=2) if args.output == "json" else render([row], CLAIM_COLUMNS))
    return 0


async def release(args: argparse.Namespace, config: Config, redis: Redis) -> int:
    try:
        await _client(config, redis).release(args.id, args.claim_id)
    except ClaimError as exc:
        raise _cli_error(exc) from None
    print(f"released {args.id}")
    return 0


async def renew(args: argparse.Namespace, config: Config, redis: Redis) -> int:
    try:
        expires_ms = await _client(config, redis).renew(args.id, args.claim_id, args.lease)
    except ClaimError as exc:
        raise _cli_error(exc) from None
    print(f"renewed {args.id}: lease expires {_expires(expires_ms)}")
    return 0


async def exec_command(args: argparse.Namespace, config: Config, redis: Redis) -> int:
    if not args.argv:
        raise CliError("nothing to run: sandboxd exec POOL [options] -- COMMAND [ARGS...]", 2)
    if bool(args.pool) == bool(args.sandbox):
        raise CliError("give either a POOL to claim from or --sandbox ID", EXIT_INVALID)
    client = _client(config, redis, args.owner)
    stdin = sys.stdin.buffer.read() if args.stdin else None
    try:
        if args.sandbox:
            return await _run(await client.attach(args.sandbox), args, stdin)
        async with client.claim(args.pool, lease_s=args.lease, timeout_s=args.wait) as sandbox:
            return await _run(sandbox, args, stdin)
    except ClaimError as exc:
        raise _cli_error(exc) from None


async def _run(sandbox: Sandbox, args: argparse.Namespace, stdin: bytes | None) -> int:
    env = dict(_env_pair(item) for item in args.env)
    try:
        result = await sandbox.exec(
            args.argv,
            timeout=args.timeout,
            env=env,
            cwd=args.cwd,
            stdin=stdin,
            on_stdout=_writer(sys.stdout.buffer),
            on_stderr=_writer(sys.stderr.buffer),
        )
    except (AgentError, UnreachableSandbox) as exc:
        raise CliError(f"cannot run in {sandbox.id}: {exc}") from None
    if result.timed_out:
        print(f"error: command killed after {args.timeout:g}s", file=sys.stderr)
        return EXIT_EXEC_TIMEOUT
    # Killed by signal N: the agent reports -N, a shell would exit 128+N.
    return result.exit_code if result.exit_code >= 0 else 128 - result.exit_code


def _env_pair(item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name:
        raise CliError(f"--env wants NAME=VALUE, got {item!r}", EXIT_INVALID)
    return name, value


def _writer(stream):
    def write(chunk: bytes) -> None:
        stream.write(chunk)
        stream.flush()

    return write
