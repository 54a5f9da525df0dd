"""`sandboxd claim | release | renew | exec`: the client library behind a command line."""

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from sandboxd.cli.errors import EXIT_EXEC_TIMEOUT, EXIT_INVALID, EXIT_NO_SANDBOX, CliError
from sandboxd.cli.tables import render
from sandboxd.client.aio import ClaimTimeout, Client, Sandbox
from sandboxd.client.connections import UnreachableSandbox, check_reachable
from sandboxd.config import Config
from sandboxd.providers.local.agentclient import AgentError
from sandboxd.store.claims import ClaimError, PoolSettings
from sandboxd.store.keys import Keys

CLAIM_COLUMNS = [
    ("id", "ID"),
    ("pool", "POOL"),
    ("claim_id", "CLAIM_ID"),
    ("lease_s", "LEASE_S"),
    ("lease_expires", "LEASE_EXPIRES"),
    ("claim_token", "CLAIM_TOKEN"),
]
# Refusals that are the caller's mistake, not a passing condition.
INVALID_REASONS = {"unknown_pool", "lease_too_long", "invalid_argument"}
TOKEN_ENV = "SANDBOXD_CLAIM_TOKEN"
TOKEN_SOURCES = (
    f"--token-file PATH, the {TOKEN_ENV} environment variable, --token - (read from stdin) "
    "or --token VALUE (visible to other local users in `ps`)"
)


def _client(config: Config, redis: Redis, owner: str | None = None) -> Client:
    """The CLI's client: its own E2B endpoints from the config, and no E2B API key (a claim
    hands over the envd access token of its one sandbox; the key is never read here)."""
    return Client(
        redis,
        prefix=config.key_prefix,
        owner=owner,
        event_stream_maxlen=config.event_stream_maxlen,
        endpoints={"e2b": config.e2b.endpoints()},
        claim_durability=config.claim_durability,
        replication_timeout_ms=config.claim_replication_timeout_ms,
    )


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
        "claim_token": sandbox.claim_token,
    }


def claim_token(args: argparse.Namespace, *, needed_for: str) -> str:
    """The claim token from --token-file, --token - (stdin), --token VALUE or
    $SANDBOXD_CLAIM_TOKEN, in that order; surrounding whitespace is dropped."""
    if getattr(args, "token_file", None):
        try:
            token = Path(args.token_file).read_text()
        except OSError as exc:
            raise CliError(f"cannot read {args.token_file}: {exc.strerror}", EXIT_INVALID) from None
    elif getattr(args, "token", None) == "-":
        token = sys.stdin.readline()
    elif getattr(args, "token", None):
        token = args.token
    else:
        token = os.environ.get(TOKEN_ENV, "")
    token = token.strip()
    if not token:
        raise CliError(f"{needed_for} needs the claim's token: {TOKEN_SOURCES}", EXIT_INVALID)
    return token


async def claim(args: argparse.Namespace, config: Config, redis: Redis) -> int:
    client = _client(config, redis, args.owner)
    try:
        sandbox = await client.claim(args.pool, lease_s=args.lease, timeout_s=args.wait)
    except ClaimError as exc:
        raise _cli_error(exc) from None
    row = claim_row(sandbox)
    print(json.dumps(row, indent=2) if args.output == "json" else render([row], CLAIM_COLUMNS))
    print(
        f"keep the claim token: renew, release and exec --sandbox need it ({TOKEN_ENV} or "
        "--token-file); it is not shown again",
        file=sys.stderr,
    )
    return 0


async def release(args: argparse.Namespace, config: Config, redis: Redis) -> int:
    if args.force and (args.token or args.token_file):
        raise CliError("--force releases without a token: give one or the other", EXIT_INVALID)
    token = "" if args.force else claim_token(args, needed_for=f"release {args.id}")
    try:
        await _client(config, redis).release(args.id, token, force=args.force)
    except ClaimError as exc:
        raise _cli_error(exc) from None
    print(f"released {args.id}" + (" (forced)" if args.force else ""))
    return 0


async def renew(args: argparse.Namespace, config: Config, redis: Redis) -> int:
    token = claim_token(args, needed_for=f"renew {args.id}")
    try:
        expires_ms = await _client(config, redis).renew(args.id, token, args.lease)
    except ClaimError as exc:
        raise _cli_error(exc) from None
    print(f"renewed {args.id}: lease expires {_expires(expires_ms)}")
    return 0


async def exec_command(args: argparse.Namespace, config: Config, redis: Redis) -> int:
    if not args.argv:
        raise CliError("nothing to run: sandboxd exec POOL [options] -- COMMAND [ARGS...]", 2)
    if bool(args.pool) == bool(args.sandbox):
        raise CliError("give either a POOL to claim from or --sandbox ID", EXIT_INVALID)
    if (args.token or args.token_file) and not args.sandbox:
        raise CliError("--token and --token-file go with --sandbox ID", EXIT_INVALID)
    if args.stdin and args.token == "-":
        raise CliError("-i and --token - both want stdin: use --token-file", EXIT_INVALID)
    token = claim_token(args, needed_for=f"exec --sandbox {args.sandbox}") if args.sandbox else ""
    if args.pool:
        await _check_pool_reachable(config, redis, args.pool)
    client = _client(config, redis, args.owner)
    stdin = sys.stdin.buffer.read() if args.stdin else None
    with _stopped_by(signal.SIGTERM, signal.SIGHUP) as stopped:
        try:
            if args.sandbox:
                return await _run(await client.attach(args.sandbox, token), args, stdin)
            async with client.claim(args.pool, lease_s=args.lease, timeout_s=args.wait) as box:
                return await _run(box, args, stdin)
        except ClaimError as exc:
            raise _cli_error(exc) from None
        except asyncio.CancelledError:
            if not stopped:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            # The claim was released on the way out, as on Ctrl-C; exit as if killed by it.
            print(f"error: stopped by {stopped[0].name}", file=sys.stderr)
            return 128 + stopped[0]


async def _check_pool_reachable(config: Config, redis: Redis, pool: str) -> None:
    """Refuse before claiming what this client could not reach anyway (no e2b SDK), rather
    than claim a warm sandbox, fail, and give it back to be thrown away."""
    raw = await redis.hget(Keys(config.key_prefix).pools, pool)
    try:
        provider = PoolSettings.model_validate_json(raw).provider if raw else None
    except ValueError:
        provider = None  # damaged settings: the claim script refuses and says so
    if provider is None:
        return
    try:
        check_reachable(provider)
    except UnreachableSandbox as exc:
        raise CliError(f"cannot run in pool {pool!r}: {exc}") from None


@contextlib.contextmanager
def _stopped_by(*signals: signal.Signals) -> Iterator[list[signal.Signals]]:
    """While inside: these signals cancel the current task (as SIGINT does), so the claim's
    `async with` releases it; the list names the signal that came."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    came: list[signal.Signals] = []

    def stop(sig: signal.Signals) -> None:
        if not came:
            came.append(sig)
            task.cancel()

    for sig in signals:
        loop.add_signal_handler(sig, stop, sig)
    try:
        yield came
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


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
