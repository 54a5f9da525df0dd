"""`sandboxd consumers add|list|remove` (the consumer groups that hold the event stream's
retention) and `sandboxd webhooks dead|redeliver` (the webhooks' dead letters)."""

import argparse
import json
import re
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

from sandboxd.cli.errors import EXIT_INVALID, CliError
from sandboxd.cli.tables import render
from sandboxd.config import WEBHOOK_NAME, Config
from sandboxd.store.consumers import STREAM_ID, ConsumerError, ConsumerRegistry
from sandboxd.store.keys import Keys

GROUP_COLUMNS = [
    ("name", "GROUP"),
    ("registered", "REGISTERED"),
    ("consumers", "CONSUMERS"),
    ("pending", "PENDING"),
    ("lag", "LAG"),
    ("idle_s", "IDLE_S"),
    ("last_delivered", "LAST_DELIVERED"),
]
DEAD_COLUMNS = [
    ("webhook", "WEBHOOK"),
    ("dead_id", "DEAD_ID"),
    ("id", "EVENT_ID"),
    ("type", "TYPE"),
    ("pool", "POOL"),
    ("attempts", "ATTEMPTS"),
    ("failed_at", "FAILED_AT"),
    ("reason", "REASON"),
]
MAX_DEAD_LISTED = 10_000


def add_parsers(
    consumers: argparse.ArgumentParser,
    webhooks: argparse.ArgumentParser,
    common: argparse.ArgumentParser,
) -> None:
    sub = consumers.add_subparsers(dest="consumers_command", required=True)
    add = sub.add_parser(
        "add",
        help="register a consumer group: the stream is kept until it has read it "
        "(up to events.max_len / events.max_age_s)",
        parents=[common],
    )
    add.add_argument("group")
    add.add_argument(
        "--from",
        dest="start",
        default="new",
        help="where a group that does not exist yet starts: new (default), all, or a stream id",
    )
    listing = sub.add_parser(
        "list", help="groups: registered, lag, pending, idle, last delivered", parents=[common]
    )
    listing.add_argument("-o", "--output", choices=["table", "json"], default="table")
    remove = sub.add_parser(
        "remove", help="unregister a group (it no longer holds retention)", parents=[common]
    )
    remove.add_argument("group")
    remove.add_argument(
        "--destroy", action="store_true", help="also delete the group and its pending entries"
    )

    hooks = webhooks.add_subparsers(dest="webhooks_command", required=True)
    dead = hooks.add_parser(
        "dead", help="events a webhook gave up on (its dead-letter stream)", parents=[common]
    )
    dead.add_argument("name", nargs="?", help="one webhook (default: every configured one)")
    dead.add_argument("-o", "--output", choices=["table", "json"], default="table")
    again = hooks.add_parser(
        "redeliver", help="send dead-lettered events again (the daemon does)", parents=[common]
    )
    again.add_argument("name")
    again.add_argument("ids", nargs="*", metavar="DEAD_ID", help="entries of `webhooks dead`")
    again.add_argument("--all", action="store_true", help="every dead-lettered event")


async def consumers_command(args: argparse.Namespace, config: Config, redis: Redis) -> int:
    registry = ConsumerRegistry(redis, Keys(config.key_prefix))
    try:
        if args.consumers_command == "add":
            start = {"new": "$", "all": "0"}.get(args.start, args.start)
            added = await registry.add(args.group, start=start, by="cli")
            print(
                f"registered consumer group {args.group!r}"
                if added
                else f"consumer group {args.group!r} was registered already"
            )
        elif args.consumers_command == "remove":
            removed = await registry.remove(args.group, destroy=args.destroy)
            if not removed:
                raise CliError(f"no registered consumer group {args.group!r}", EXIT_INVALID)
            print(f"removed consumer group {args.group!r}" + (" (destroyed)" * args.destroy))
        else:
            groups = [g.as_dict() for g in await registry.stats()]
            if args.output == "json":
                print(json.dumps(groups, indent=2))
            elif groups:
                print(render(groups, GROUP_COLUMNS))
            else:
                print("no consumer groups (register one: sandboxd consumers add GROUP)")
    except ConsumerError as exc:
        raise CliError(str(exc), EXIT_INVALID) from None
    return 0


async def webhooks_command(args: argparse.Namespace, config: Config, redis: Redis) -> int:
    keys = Keys(config.key_prefix)
    if args.webhooks_command == "dead":
        names = [args.name] if args.name else [w.name for w in config.webhooks]
        rows = []
        for name in names:
            _check_name(name)
            entries = await redis.xrange(keys.webhook_dead(name), count=MAX_DEAD_LISTED)
            rows += [_dead_row(name, dead_id, fields) for dead_id, fields in entries]
        if args.output == "json":
            print(json.dumps(rows, indent=2))
        elif rows:
            print(render(rows, DEAD_COLUMNS))
        else:
            print("no dead-lettered events")
        return 0
    _check_name(args.name)
    dead = keys.webhook_dead(args.name)
    if args.all == bool(args.ids):
        raise CliError("name the DEAD_IDs to send again, or --all", EXIT_INVALID)
    if args.all:
        ids = [i for i, _ in await redis.xrange(dead, count=MAX_DEAD_LISTED)]
    else:
        for dead_id in args.ids:
            if not STREAM_ID.match(dead_id):
                raise CliError(f"{dead_id[:40]!r} is not a DEAD_ID (ms-seq)", EXIT_INVALID)
            if not await redis.xrange(dead, dead_id, dead_id):
                raise CliError(
                    f"webhook {args.name!r} has no dead-lettered event {dead_id}", EXIT_INVALID
                )
        ids = list(args.ids)
    if ids:
        await redis.rpush(keys.webhook_redeliver(args.name), *ids)
    print(f"{len(ids)} event(s) queued for redelivery by webhook {args.name!r}")
    return 0


def _check_name(name: str) -> None:
    if not re.match(WEBHOOK_NAME, name):
        raise CliError(f"{name[:40]!r} is not a webhook name", EXIT_INVALID)


def _dead_row(webhook: str, dead_id: str, fields: dict[str, Any]) -> dict[str, Any]:
    failed = fields.get("failed_at", "")
    when = ""
    if isinstance(failed, str) and failed.isdigit() and len(failed) < 16:
        when = datetime.fromtimestamp(int(failed) / 1000, UTC).isoformat(timespec="seconds")
    return {
        "webhook": webhook,
        "dead_id": dead_id,
        **{k: str(fields.get(k, ""))[:200] for k in ("id", "type", "pool", "reason", "attempts")},
        "stream_id": str(fields.get("stream_id", ""))[:40],
        "failed_at": when,
    }
