"""`sandboxd apikey create|list|revoke`: the API keys of `sandboxd api` (store/apikeys.py)."""

import argparse
import json
import sys

from redis.asyncio import Redis

from sandboxd.cli.errors import EXIT_INVALID, CliError
from sandboxd.cli.tables import render
from sandboxd.config import Config
from sandboxd.store.apikeys import ApiKeyError, ApiKeyStore
from sandboxd.store.claims import ClaimStore
from sandboxd.store.keys import Keys

COLUMNS = [
    ("name", "NAME"),
    ("pools", "POOLS"),
    ("max_sandboxes", "MAX_SANDBOXES"),
    ("creates_per_s", "CREATES_PER_S"),
    ("created_at", "CREATED_AT"),
]


def add_parsers(apikey: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    sub = apikey.add_subparsers(dest="apikey_command", required=True)
    create = sub.add_parser(
        "create", help="issue a key; its secret is printed once", parents=[common]
    )
    create.add_argument("name", help="the key's name: the owner of the claims made with it")
    create.add_argument("--pools", help="comma-separated pools it may use (default: all)")
    create.add_argument(
        "--max-sandboxes", type=int, help="sandboxes it may hold at once (default: no limit)"
    )
    create.add_argument(
        "--creates-per-s",
        type=float,
        help="creates it may make a second, in bursts of up to a second's worth (default: no "
        "limit); more are refused with 429",
    )
    listing = sub.add_parser("list", help="the keys (never their secrets)", parents=[common])
    listing.add_argument("-o", "--output", choices=["table", "json"], default="table")
    revoke = sub.add_parser("revoke", help="delete a key", parents=[common])
    revoke.add_argument("name")


async def apikey_command(args: argparse.Namespace, config: Config, redis: Redis) -> int:
    prefix = Keys(config.key_prefix)
    store = ApiKeyStore(redis, prefix)
    try:
        if args.apikey_command == "create":
            pools = [p.strip() for p in (args.pools or "").split(",") if p.strip()]
            secret = await store.create(
                args.name,
                pools=pools,
                max_sandboxes=args.max_sandboxes,
                creates_per_s=args.creates_per_s,
            )
            print(
                f"API key {args.name!r} created; its secret, shown this once (use it as "
                "E2B_API_KEY against `sandboxd api`):",
                file=sys.stderr,
            )
            print(secret)
        elif args.apikey_command == "list":
            keys = [k.model_dump(exclude={"sha256"}) for k in await store.list()]
            if args.output == "json":
                print(json.dumps(keys, indent=2))
            else:
                rows = [k | {"pools": ",".join(k["pools"]) or "(all)"} for k in keys]
                print(render(rows, COLUMNS))
        else:
            claims = ClaimStore(redis, prefix, maxlen=config.event_stream_maxlen)
            ended = await store.revoke(args.name, claims)
            print(f"revoked {args.name!r}; ended the {ended} claim(s) made with it")
    except ApiKeyError as exc:
        raise CliError(str(exc), EXIT_INVALID) from None
    return 0
