"""`sandboxd spec history | rollback`: the accepted revisions kept in Redis, and making an
earlier one the desired state again (as a new revision: revisions never repeat)."""

import argparse
import json

from redis.asyncio import Redis

from sandboxd.cli.errors import EXIT_INVALID, CliError
from sandboxd.cli.tables import render
from sandboxd.config import Config
from sandboxd.spec import Spec, SpecError, check_against_config, diff_specs
from sandboxd.store.keys import Keys
from sandboxd.store.specs import SpecStore

HISTORY_COLUMNS = [
    ("revision", "REVISION"),
    ("applied_at", "APPLIED_AT"),
    ("pools", "POOLS"),
    ("in_force", "IN_FORCE"),
]


def add_parsers(spec: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    sub = spec.add_subparsers(dest="spec_command", required=True)
    history = sub.add_parser("history", help="accepted revisions, newest first", parents=[common])
    history.add_argument("-o", "--output", choices=["table", "json"], default="table")
    rollback = sub.add_parser(
        "rollback", help="apply an earlier revision again (as a new revision)", parents=[common]
    )
    rollback.add_argument("revision", type=int)


async def spec_command(args: argparse.Namespace, config: Config, redis: Redis) -> int:
    store = SpecStore(redis, Keys(config.key_prefix))
    if args.spec_command == "history":
        return await _history(args, store)
    return await _rollback(args, config, store)


async def _history(args: argparse.Namespace, store: SpecStore) -> int:
    active = await store.active()
    in_force = active.revision if active else None
    docs = await store.history()
    if args.output == "json":
        print(json.dumps([d.model_dump() | {"in_force": d.revision == in_force} for d in docs]))
        return 0
    rows = [
        {
            "revision": d.revision,
            "applied_at": d.applied_at,
            "pools": ", ".join(p.name for p in d.pools) or "-",
            "in_force": "*" if d.revision == in_force else "",
        }
        for d in docs
    ]
    print(render(rows, HISTORY_COLUMNS))
    return 0


async def _rollback(args: argparse.Namespace, config: Config, store: SpecStore) -> int:
    docs = {d.revision: d for d in await store.history()}
    target = docs.get(args.revision)
    if target is None:
        kept = ", ".join(str(r) for r in sorted(docs)) or "none"
        raise CliError(
            f"revision {args.revision} is not in the history (kept: {kept})", EXIT_INVALID
        )
    spec = Spec(pools=list(target.pools))
    try:
        check_against_config(spec, config)
    except SpecError as exc:
        raise CliError(
            f"revision {args.revision} no longer fits the config: {exc}", EXIT_INVALID
        ) from None
    applied = await store.apply(spec)
    print(f"applied revision {applied.document.revision} (the spec of revision {args.revision})")
    for line in diff_specs(applied.previous, spec):
        print(f"  {line}")
    return 0
