"""The `sandboxd` command: the daemon (`run`) and a thin client of Redis for everything else."""

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError, ResponseError

from sandboxd.cli import apikeys as apikey_commands
from sandboxd.cli import claims as claim_commands
from sandboxd.cli import consumers as consumer_commands
from sandboxd.cli import specs as spec_commands
from sandboxd.cli.errors import EXIT_INTERRUPTED, EXIT_INVALID, EXIT_NO_DAEMON, CliError
from sandboxd.cli.tables import render
from sandboxd.cli.views import StateView
from sandboxd.client.consume import read_group
from sandboxd.config import Config, load_config, resolve_config_path
from sandboxd.logs import redact_url, setup_logging
from sandboxd.spec import SpecError, check_against_config, diff_specs, parse_spec
from sandboxd.store.connection import make_client
from sandboxd.store.consumers import ConsumerError, check_consumer, check_group
from sandboxd.store.events import Event
from sandboxd.store.keys import Keys
from sandboxd.store.specs import SpecStore

POOL_COLUMNS = [
    ("name", "POOL"),
    ("provider", "PROVIDER"),
    ("template", "TEMPLATE"),
    ("min_ready", "MIN_READY"),
    ("max_total", "MAX_TOTAL"),
    ("ready", "READY"),
    ("creating", "CREATING"),
    ("claimed", "CLAIMED"),
    ("total", "TOTAL"),
]
RUNTIME_COLUMNS = [
    ("state", "STATE"),
    ("health", "HEALTH"),
    ("breaker", "BREAKER"),
    ("failed", "FAILED"),
    ("note", "NOTE"),
]
DASHBOARD_COLUMNS = [
    ("name", "POOL"),
    ("provider", "PROVIDER"),
    ("ready_of", "READY/MIN"),
    ("claimed", "CLAIMED"),
    ("creating", "CREATING"),
    ("total_of", "TOTAL/MAX"),
    *RUNTIME_COLUMNS[:-1],
    ("cost", "COST"),
    ("idle", "IDLE%"),
    ("schedule", "SCHEDULE"),
    ("note", "NOTE"),
]
SANDBOX_COLUMNS = [
    ("id", "ID"),
    ("pool", "POOL"),
    ("provider", "PROVIDER"),
    ("provider_id", "PROVIDER_ID"),
    ("state", "STATE"),
    ("spec_revision", "REV"),
    ("age_s", "AGE_S"),
    ("health", "HEALTH"),
    ("pid", "PID"),
    ("isolation", "ISOLATION"),
    ("created_at", "CREATED_AT"),
]


def _parser() -> argparse.ArgumentParser:
    # --config is accepted before or after the subcommand (`sandboxd run --config ...`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help="daemon config (TOML); default /etc/sandboxd/sandboxd.toml",
    )
    parser = argparse.ArgumentParser(prog="sandboxd", description=__doc__, parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])

    command("run", "run the daemon in the foreground")
    apply = command("apply", "validate a spec file and make it the desired state")
    apply.add_argument("-f", "--file", required=True, help="YAML or JSON spec; - for stdin")
    apply.add_argument("--dry-run", action="store_true", help="validate and diff, write nothing")
    get = command("get", "list pools or sandboxes")
    get.add_argument("what", choices=["pools", "sandboxes"])
    get.add_argument("--pool", help="only this pool's sandboxes")
    _output_flag(get)
    _output_flag(command("status", "is the daemon alive, what is in force"))
    check = command("check-health", "exit 0 if the daemon's heartbeat is fresh (for monitoring)")
    check.add_argument(
        "--max-age", type=float, default=None, help="seconds (default: the heartbeat's TTL)"
    )
    spec_commands.add_parsers(command("spec", "the spec's revision history"), common)
    events = command("events", "print lifecycle events from the stream")
    events.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    events.add_argument(
        "--count",
        "-n",
        type=int,
        default=None,
        help="how many past events (default 20); with --group: stop after this many",
    )
    events.add_argument(
        "--group", help="read through this consumer group: at least once, acknowledged"
    )
    events.add_argument("--consumer", help="with --group: this consumer's name in the group")
    events.add_argument(
        "--type", action="append", default=[], help="with --group: only these types (sandbox.*)"
    )
    events.add_argument("--pool", action="append", default=[], help="with --group: only these")
    events.add_argument(
        "--claim-idle",
        type=float,
        default=30.0,
        help="with --group: take over entries pending this long at other consumers (seconds)",
    )
    _output_flag(events)
    logs = command("logs", "print the output of a sandbox's `run:` program")
    logs.add_argument("sandbox")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    logs.add_argument("--count", "-n", type=int, default=100, help="how many past lines")
    _claim_commands(command)
    command("api", "serve E2B's REST API on api_listen (docs/api.md)")
    apikey_commands.add_parsers(command("apikey", "API keys of `sandboxd api`"), common)
    consumer_commands.add_parsers(
        command("consumers", "consumer groups that hold the event stream's retention"),
        command("webhooks", "the webhooks' dead-lettered events"),
        common,
    )
    return parser


def _claim_commands(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    claim = command(
        "claim", "claim a ready sandbox (prints its id, claim id and the secret claim token)"
    )
    claim.add_argument("pool")
    _claim_flags(claim)
    _output_flag(claim)
    release = command("release", "give a claimed sandbox back (needs its claim token)")
    release.add_argument("id")
    _token_flags(release)
    release.add_argument(
        "--force",
        action="store_true",
        help="operators: release whoever holds it, no token (the event says forced)",
    )
    renew = command("renew", "extend a claimed sandbox's lease from now (needs its claim token)")
    renew.add_argument("id")
    renew.add_argument("--lease", type=int, help="seconds (default: the claim's lease)")
    _token_flags(renew)
    run = command(
        "exec",
        "claim, run a command, stream its output, release; exits with the command's code. "
        "Usage: sandboxd exec POOL [options] -- COMMAND [ARGS...]",
    )
    run.add_argument("pool", nargs="?", help="pool to claim from (not with --sandbox)")
    run.add_argument(
        "--sandbox", help="run in this already claimed sandbox (needs its token); no claim/release"
    )
    _token_flags(run)
    _claim_flags(run)
    run.add_argument("--timeout", type=float, help="kill the command after this many seconds")
    run.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    run.add_argument("--cwd", help="working directory inside the sandbox")
    run.add_argument("-i", "--stdin", action="store_true", help="send this stdin to the command")


def _token_flags(parser: argparse.ArgumentParser) -> None:
    """The claim token: a file or stdin keep it out of `ps`; else $SANDBOXD_CLAIM_TOKEN."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--token",
        metavar="TOKEN",
        help="the claim token, or - to read it from stdin. A value here is visible to other "
        "local users (ps): prefer --token-file, - or $SANDBOXD_CLAIM_TOKEN",
    )
    source.add_argument("--token-file", metavar="PATH", help="read the claim token from PATH")


def _claim_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lease", type=int, help="lease in seconds (default: the pool's)")
    parser.add_argument(
        "--wait", type=float, default=30.0, help="seconds to wait for a ready sandbox (0: none)"
    )
    parser.add_argument("--owner", help="claimant name (default user@host:pid)")


def _output_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table")


def main(argv: list[str] | None = None) -> int:
    """The `sandboxd` command. Run as the program (no `argv`), a client command ends the
    process itself once its output is flushed when the e2b SDK was loaded: the SDK's HTTP
    pool (pyqwest, a Rust runtime of its own) can abort the interpreter's teardown (SIGABRT,
    seen about once in a few hundred CLI runs after an `exec` in an e2b sandbox), which would
    turn a clean exit code into -6."""
    code = _main(argv)
    if argv is None and "pyqwest" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Everything after `--` is the command for `exec`, never options of ours.
    split = argv.index("--") if "--" in argv else len(argv)
    args = _parser().parse_args(argv[:split])
    args.argv = argv[split + 1 :]
    try:
        config = load_config(getattr(args, "config", None))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: bad config: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if args.command == "run":
        return _run_daemon(config, resolve_config_path(getattr(args, "config", None)))
    if args.command == "api":
        return _run_api(config)
    try:
        return asyncio.run(_client_command(args, config))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _run_daemon(config: Config, config_path: Path | None) -> int:
    from sandboxd.daemon import Daemon

    setup_logging(config.log_level)
    return asyncio.run(Daemon(config, config_path=config_path).run())


def _run_api(config: Config) -> int:
    from sandboxd.api.server import serve

    setup_logging(config.log_level)
    return serve(config)


async def _client_command(args: argparse.Namespace, config: Config) -> int:
    commands: dict[str, Callable[..., Coroutine[Any, Any, int]]] = {
        "apply": _apply,
        "get": _get,
        "status": _status,
        "check-health": _check_health,
        "spec": spec_commands.spec_command,
        "events": _events,
        "logs": _logs,
        "claim": claim_commands.claim,
        "release": claim_commands.release,
        "renew": claim_commands.renew,
        "exec": claim_commands.exec_command,
        "apikey": apikey_commands.apikey_command,
        "consumers": consumer_commands.consumers_command,
        "webhooks": consumer_commands.webhooks_command,
    }
    redis = make_client(config)
    try:
        return await commands[args.command](args, config, redis)
    except ResponseError as exc:  # Redis answered: a refusal, a key of the wrong type…
        raise CliError(f"Redis refused: {exc}") from None
    except RedisError as exc:
        raise CliError(f"cannot reach Redis at {redact_url(config.redis_url)}: {exc}") from None
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
        # Anyone who may write Redis can leave a value of another shape than the daemon
        # writes (a heartbeat, a log entry, an event): a clear line, never a traceback.
        raise CliError(
            f"unreadable data in Redis ({type(exc).__name__}: {str(exc)[:200]}); the daemon "
            "rewrites its own keys within seconds"
        ) from None
    finally:
        await redis.aclose()


async def _apply(args: argparse.Namespace, config: Config, redis) -> int:
    text = sys.stdin.buffer.read() if args.file == "-" else _read_file(args.file)
    try:
        spec = parse_spec(text)
        check_against_config(spec, config)
    except SpecError as exc:
        lines = "\n".join(f"  {problem}" for problem in exc.problems)
        raise CliError(
            f"invalid spec {args.file}; nothing applied:\n{lines}", EXIT_INVALID
        ) from None
    store = SpecStore(redis, Keys(config.key_prefix))
    if args.dry_run:
        changes = diff_specs(await store.active(), spec)
        print("valid; would change:" if changes else "valid; no changes")
    else:
        applied = await store.apply(spec)
        changes = diff_specs(applied.previous, spec)
        print(
            f"applied revision {applied.document.revision}" + ("" if changes else " (no changes)")
        )
    for line in changes:
        print(f"  {line}")
    return 0


def _read_file(path: str) -> bytes:
    """Bytes: `parse_spec` checks the encoding (and says so) rather than a traceback here."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}", EXIT_INVALID) from None


async def _get(args: argparse.Namespace, config: Config, redis) -> int:
    view = StateView(redis, Keys(config.key_prefix))
    if args.what == "pools":
        rows, columns = await view.pools(), POOL_COLUMNS
    else:
        rows, columns = await view.sandboxes(args.pool), SANDBOX_COLUMNS
    print(json.dumps(rows, indent=2) if args.output == "json" else render(rows, columns))
    return 0


async def _status(args: argparse.Namespace, config: Config, redis) -> int:
    status = await StateView(redis, Keys(config.key_prefix)).status()
    if args.output == "json":
        print(json.dumps(status, indent=2))
    else:
        print(_status_text(status))
    return 0 if status["daemon"]["alive"] else EXIT_NO_DAEMON


async def _check_health(args: argparse.Namespace, config: Config, redis) -> int:
    """The heartbeat key expires after three missed beats, so its presence means alive."""
    daemon = await StateView(redis, Keys(config.key_prefix)).daemon()  # not every pool's
    age = time.time() - daemon.get("heartbeat_at", 0) if daemon is not None else None
    if daemon is None or age is None or (args.max_age is not None and age > args.max_age):
        seen = "no heartbeat" if age is None else f"heartbeat {age:.1f}s old"
        print(f"UNHEALTHY: {seen}")
        return EXIT_NO_DAEMON
    print(f"OK: heartbeat {age:.1f}s old, pid {daemon['pid']} on {daemon['host']}")
    return 0


def _status_text(status: dict[str, Any]) -> str:
    """The dashboard: daemon, host, endpoints, spec, then one line per pool."""
    daemon = status["daemon"]
    head = _daemon_lines(daemon) if daemon["alive"] else ["daemon:    NOT RUNNING (no heartbeat)"]
    head += _node_lines(status.get("daemons") or [])
    revision = status["revision_in_force"]
    stored = status["revision_stored"]
    spec_line = f"spec:      revision {revision if revision is not None else '-'} in force"
    if stored is not None and stored != revision:
        spec_line += f" (revision {stored} stored: pending or rejected, see `sandboxd events`)"
    rows = [
        _with_runtime(row, daemon.get("pools", {}).get(row["name"], {})) for row in status["pools"]
    ]
    return "\n".join([*head, spec_line, "", render(rows, DASHBOARD_COLUMNS)])


def _daemon_lines(daemon: dict[str, Any]) -> list[str]:
    age = time.time() - daemon.get("heartbeat_at", time.time())
    isolation = ", ".join(f"{k}: {v}" for k, v in daemon.get("isolation", {}).items())
    lines = [
        f"daemon:    alive (pid {daemon['pid']} on {daemon['host']}, instance "
        f"{daemon['instance']}, v{daemon['version']}, heartbeat {age:.1f}s ago)",
        f"isolation: {isolation}"
        + (
            "   << WARNING: sandboxes are NOT isolated (install bubblewrap)"
            if "none" in isolation
            else ""
        ),
        *_security_lines(daemon.get("security") or {}),
    ]
    host = daemon.get("host_resources") or {}
    if host:
        lines.append(
            f"host:      cpu {host['cpu_percent']:.0f}%  memory {host['memory_percent']:.0f}%  "
            f"disk {host['disk_percent']:.0f}%  "
            f"load {host['load1']} {host['load5']} {host['load15']}"
        )
    mqtt = daemon.get("mqtt")
    bridge = "off"
    if mqtt is not None:
        state = "connected" if mqtt["connected"] else "DISCONNECTED"
        bridge = f"{state}, {mqtt['published']} published, {mqtt['dropped']} dropped"
    lines.append(f"outputs:   metrics {daemon.get('metrics_listen') or 'off'}  mqtt {bridge}")
    lines += _consumer_lines(daemon)
    return lines


def _consumer_lines(daemon: dict[str, Any]) -> list[str]:
    """Registered consumer groups and webhooks, one line each (the heartbeat's; every group:
    `sandboxd consumers list`)."""
    lines = []
    for name, group in sorted((daemon.get("consumers") or {}).items()):
        lag = "?" if group.get("lag") is None else group["lag"]
        state = "" if group.get("exists", True) else "  (no such group on the stream)"
        lost = f", LOST {group['lost']}" if group.get("lost") else ""
        lines.append(f"consumer:  {name}: lag {lag}, pending {group.get('pending')}{lost}{state}")
    for name, hook in sorted((daemon.get("webhooks") or {}).items()):
        lines.append(
            f"webhook:   {name} -> {hook.get('url')}: {hook.get('delivered')} delivered, "
            f"{hook.get('dead')} dead"
            + (f", last error {hook['last_error']}" if hook.get("last_error") else "")
        )
    return lines


def _node_lines(daemons: list[dict[str, Any]]) -> list[str]:
    """Per node: the active daemon (its epoch) and its standbys."""
    by_node: dict[str, list[str]] = {}
    for d in daemons:
        role = d["role"] or "?"
        epoch = f", epoch {d['epoch']}" if role == "active" and d["epoch"] else ""
        by_node.setdefault(d["node"] or "?", []).append(
            f"{role} {d['instance']} (pid {d['pid']} on {d['host']}{epoch}, "
            f"heartbeat {d['age_s']}s ago)"
        )
    return [f"node {node}: " + "; ".join(found) for node, found in sorted(by_node.items())]


def _security_lines(security: dict[str, Any]) -> list[str]:
    """Local sandboxes' limits and uids, and loudly what is missing."""
    local = security.get("local") or {}
    if not local:
        return []
    lines = [f"limits:    {local.get('limits', '?')}; sandbox uids {local.get('uids', '?')}"]
    lines += [f"WEAKER ISOLATION: {weakness}" for weakness in local.get("weaknesses", [])]
    return lines


def _with_runtime(row: dict[str, Any], runtime: dict[str, Any]) -> dict[str, Any]:
    """A pool row plus what only the daemon knows: sizes in force, health, breaker, cost,
    schedule, why it is short."""
    health = runtime.get("health", {})
    score = health.get("score")
    cost = runtime.get("cost") or {}
    schedule = runtime.get("schedule")
    share = cost.get("idle_share")
    return {
        **row,
        "ready_of": f"{row['ready']}/{runtime.get('min_ready', row['min_ready'])}",
        "total_of": f"{row['total']}/{runtime.get('max_total', row['max_total'])}",
        "state": runtime.get("state", "-"),
        "health": f"{health.get('state', '-')}" + (f" {score:.0%}" if score is not None else ""),
        "breaker": runtime.get("breaker", "-"),
        "failed": runtime.get("failed_attempts", 0),
        "cost": f"{cost['cost']:.4f} {runtime.get('currency', '')}".strip() if cost else None,
        "idle": f"{share:.0%}" if share is not None else None,
        "schedule": _schedule_cell(schedule),
        "note": runtime.get("below_target", ""),
    }


def _schedule_cell(schedule: dict[str, Any] | None) -> str | None:
    if not schedule:
        return None
    window = "in window" if schedule["window"] else "base sizes"
    upcoming = schedule.get("next_change_at")
    return f"{window}, next {upcoming[:16].replace('T', ' ')}Z" if upcoming else window


async def _events(args: argparse.Namespace, config: Config, redis) -> int:
    if args.group or args.consumer:
        return await _group_events(args, config, redis)
    if args.type or args.pool:
        raise CliError("--type and --pool go with --group", EXIT_INVALID)
    stream = Keys(config.key_prefix).events
    count = 20 if args.count is None else args.count
    entries = await redis.xrevrange(stream, count=count) if count > 0 else []
    newest = entries or await redis.xrevrange(stream, count=1)
    last_id = newest[0][0] if newest else "0-0"  # a concrete id: no gap between reads
    for stream_id, fields in reversed(entries):
        _print_event(stream_id, fields, args.output)
    while args.follow:
        reply = await redis.xread({stream: last_id}, block=5000, count=100)
        for _, batch in reply:
            for stream_id, fields in batch:
                _print_event(stream_id, fields, args.output)
                last_id = stream_id
    return 0


async def _group_events(args: argparse.Namespace, config: Config, redis) -> int:
    """Through a consumer group: each event printed, then acknowledged (at least once)."""
    if not (args.group and args.consumer):
        raise CliError("--group and --consumer go together", EXIT_INVALID)
    if args.count is not None and args.count < 1:
        raise CliError("--count with --group must be at least 1", EXIT_INVALID)
    if not 0 < args.claim_idle <= 86_400:
        raise CliError("--claim-idle must be from 0 to 86400 seconds", EXIT_INVALID)
    try:
        check_group(args.group)
        check_consumer(args.consumer)
    except ConsumerError as exc:
        raise CliError(str(exc), EXIT_INVALID) from None
    events = read_group(
        redis,
        Keys(config.key_prefix),
        args.group,
        args.consumer,
        types=args.type,
        pools=args.pool,
        claim_idle_s=args.claim_idle,
        limit=args.count,
    )
    async with contextlib.aclosing(events):  # what was printed is acknowledged, even on ^C
        async for event in events:
            _print_event(event.stream_id, event.to_fields(), args.output)
    return 0


async def _logs(args: argparse.Namespace, config: Config, redis) -> int:
    keys = Keys(config.key_prefix)
    stream = keys.sandbox_logs(args.sandbox)
    exists = await redis.exists(keys.sandbox(args.sandbox))
    entries = await redis.xrevrange(stream, count=args.count) if args.count > 0 else []
    if not exists and not entries:
        raise CliError(f"no sandbox {args.sandbox!r} and no logs of it (kept 1 h after it ends)")
    last_id = entries[0][0] if entries else "0-0"
    for _, fields in reversed(entries):
        print(fields.get("line", ""), flush=True)
    # --follow ends with the sandbox: its logs can only grow while it has a record.
    while args.follow and await redis.exists(keys.sandbox(args.sandbox)):
        for _, batch in await redis.xread({stream: last_id}, block=1000, count=500):
            for stream_id, fields in batch:
                print(fields.get("line", ""), flush=True)
                last_id = stream_id
    return 0


def _print_event(stream_id: str, fields: dict[str, str], output: str) -> None:
    try:
        event = Event.from_fields(fields)
        when = datetime.fromisoformat(event.time).astimezone(UTC).strftime("%H:%M:%S.%f")[:-3]
    except (ValueError, TypeError, RecursionError):  # appended by someone else, not an event
        print(f"{stream_id}  (not a sandboxd event: skipped)", file=sys.stderr, flush=True)
        return
    if output == "json":
        print(json.dumps({"stream_id": stream_id, **event.model_dump()}), flush=True)
        return
    data = " ".join(f"{k}={json.dumps(v)}" for k, v in event.data.items())
    print(
        f"{when}  {event.type:<22} {event.pool or '-':<12} {event.sandbox or '-':<20} {data}",
        flush=True,
    )
