"""The reference tables of the docs, generated from the code so that they cannot drift.

    .venv/bin/python docs/reference.py --check   # exit 1 with a diff when a file differs
    .venv/bin/python docs/reference.py --write   # rewrite the generated blocks in place

A block is the text between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->` in
README.md or a file under docs/. The blocks:

- `config`: the daemon config, from the pydantic model `sandboxd.config.Config` and its
  nested models (name, type with its limits, default, live on reload, `Field` description);
- `spec`: one pool of the desired state, from `sandboxd.spec.PoolSpec` and its nested models;
- `events`: the event types, from `EVENT_TYPES` in `sandboxd.store.events`.

A field without a description is an error: describe it in the model, not in the docs.
"""

import argparse
import difflib
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from sandboxd.config import Config
from sandboxd.reload import LIVE
from sandboxd.spec import BUILD_FIELDS, PoolSpec
from sandboxd.store.events import EVENT_TYPES

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(
    r"(?P<open><!-- generated:(?P<name>[a-z]+) -->\n)"
    r"(?P<body>.*?)"
    r"(?P<close><!-- /generated:(?P=name) -->)",
    re.DOTALL,
)
# Config keys for the test suite's chaos tests: never set in production, listed apart.
TEST_ONLY = frozenset({"faults", "watchdog_hang_file"})
# What the key of a map of tables stands for.
MAP_KEYS = {"templates": "<name>", "faults": "<provider>"}
SCALARS = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    Path: "path",
    SecretStr: "secret string",
    time: "time",
}


@dataclass
class Row:
    path: str  # dotted, from the model's root
    top: str  # the top-level field it belongs to
    type: str
    default: str
    description: str


class Undescribed(Exception):
    pass


# --- walking the models -------------------------------------------------------------------


def _strip_none(annotation: Any) -> Any:
    """`X | None` -> X (absence is the default, shown in the default column)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kept = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(kept) == 1:
            return kept[0]
    return annotation


def _unannotated(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _model(annotation: Any) -> type[BaseModel] | None:
    annotation = _unannotated(_strip_none(annotation))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _type_name(annotation: Any) -> str:
    annotation = _unannotated(_strip_none(annotation))
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " / ".join(f"`{value}`" for value in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map of {_type_name(args[1])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if _model(annotation) is not None:
        return "table"
    if annotation in SCALARS:
        return SCALARS[annotation]
    raise TypeError(f"no name for the type {annotation!r}")


def _number(value: Any) -> str:
    if isinstance(value, float):
        return format(Decimal(repr(value)), "f")
    return str(value)


def _limits(info: FieldInfo) -> str:
    """The field's constraints, as the docs say them: `≥ 0, ≤ 10000`, `length ≤ 200`…"""
    found = []
    shortest: int | None = None
    longest: int | None = None
    for item in info.metadata:
        if isinstance(item, annotated_types.Ge):
            found.append(f"≥ {_number(item.ge)}")
        elif isinstance(item, annotated_types.Gt):
            found.append(f"> {_number(item.gt)}")
        elif isinstance(item, annotated_types.Le):
            found.append(f"≤ {_number(item.le)}")
        elif isinstance(item, annotated_types.Lt):
            found.append(f"< {_number(item.lt)}")
        elif isinstance(item, annotated_types.MinLen):
            shortest = item.min_length
        elif isinstance(item, annotated_types.MaxLen):
            longest = item.max_length
        elif getattr(item, "pattern", None):
            found.append(f"matches `{item.pattern}`")
    if shortest is not None and longest is not None:
        found.append(f"length {shortest} to {longest}")
    elif shortest is not None:
        found.append(f"length ≥ {shortest}")
    elif longest is not None:
        found.append(f"length ≤ {longest}")
    return ", ".join(found)


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if info.default_factory is not None and not isinstance(value, list | dict | BaseModel):
        return "derived"  # computed where the daemon runs (the host name...): see the meaning
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int | float):
        return f"`{_number(value)}`"
    if isinstance(value, list | dict):
        return f"`{json.dumps(value)}`"
    return f"`{value}`"


def _doc(model: type[BaseModel]) -> str:
    """The first paragraph of a model's own docstring."""
    doc = model.__dict__.get("__doc__")
    return inspect.cleandoc(doc).split("\n\n")[0] if doc else ""


def _rows(model: type[BaseModel], prefix: str = "", top: str = "") -> Iterator[Row]:
    for name, info in model.model_fields.items():
        key = info.alias or name
        path, root = f"{prefix}{key}", top or key
        annotation = _strip_none(info.annotation)
        origin = typing.get_origin(annotation)
        inner = _model(annotation)
        suffix = "."
        if inner is None and origin is dict:
            inner = _model(typing.get_args(annotation)[1])
            suffix = f".{MAP_KEYS.get(name, '<key>')}."
        elif inner is None and origin is list:
            inner = _model(typing.get_args(annotation)[0])
            suffix = "[]."
        description = info.description or (_doc(inner) if inner else "")
        if not description:
            raise Undescribed(f"{model.__name__}.{name} has no description")
        kind = _type_name(annotation)
        limits = _limits(info)
        yield Row(
            path=path,
            top=root,
            type=f"{kind}, {limits}" if limits else kind,
            default=_default(info),
            description=description,
        )
        if inner is not None:
            yield from _rows(inner, path + suffix, root)


# --- the tables ---------------------------------------------------------------------------


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _note(source: str) -> str:
    return (
        f"<!-- Generated from {source} by docs/reference.py: edit the code, then run "
        "`.venv/bin/python docs/reference.py --write`. -->"
    )


def config_block() -> list[str]:
    rows = list(_rows(Config))

    def table(keep: Callable[[Row], bool]) -> list[str]:
        return _table(
            ["key", "type", "default", "reload", "meaning"],
            [
                [
                    f"`{r.path}`",
                    r.type,
                    r.default,
                    "live" if r.top in LIVE else "restart",
                    r.description,
                ]
                for r in rows
                if keep(r)
            ],
        )

    return [
        _note("the `Field` descriptions of `sandboxd.config.Config` and its nested models"),
        "",
        *table(lambda r: r.top not in TEST_ONLY),
        "",
        "For tests only (chaos tests; never set in production):",
        "",
        *table(lambda r: r.top in TEST_ONLY),
    ]


def spec_block() -> list[str]:
    rows = list(_rows(PoolSpec))
    build = ", ".join(f"`{name}`" for name in BUILD_FIELDS)
    return [
        _note("the `Field` descriptions of `sandboxd.spec.PoolSpec` and its nested models"),
        "",
        *_table(
            ["field", "type", "default", "meaning"],
            [[f"`{r.path}`", r.type, r.default, r.description] for r in rows],
        ),
        "",
        f"A pool's build is {build}: when one of these changes, its ready sandboxes are "
        "rolled over (`sandbox.terminated` reason `spec_changed`).",
    ]


def events_block() -> list[str]:
    lines = [
        _note("`EVENT_TYPES` in `sandboxd.store.events`"),
        "",
        "| type | meaning | `data` fields |",
        "|---|---|---|",
    ]
    lines += [
        f"| `{type_}` | {meaning} | {fields} |" for type_, (meaning, fields) in EVENT_TYPES.items()
    ]
    return lines


BLOCKS: dict[str, Callable[[], list[str]]] = {
    "config": config_block,
    "spec": spec_block,
    "events": events_block,
}


# --- the files ----------------------------------------------------------------------------


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def regenerate(text: str, made: dict[str, str], seen: set[str], where: Path) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in made:
            raise SystemExit(f"{where}: unknown generated block {name!r}")
        seen.add(name)
        return match["open"] + made[name] + match["close"]

    return MARKER.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 when a file differs")
    mode.add_argument("--write", action="store_true", help="rewrite the generated blocks")
    args = parser.parse_args(argv)
    try:
        made = {name: "\n".join(build()) + "\n" for name, build in BLOCKS.items()}
    except Undescribed as exc:
        print(f"error: {exc}: give it a Field description", file=sys.stderr)
        return 1
    seen: set[str] = set()
    differ = []
    for path in documents():
        old = path.read_text()
        new = regenerate(old, made, seen, path)
        if new == old:
            continue
        differ.append(path)
        name = path.relative_to(ROOT)
        if args.write:
            path.write_text(new)
            print(f"rewrote {name}")
        else:
            diff = difflib.unified_diff(
                old.splitlines(keepends=True),
                new.splitlines(keepends=True),
                f"{name} (as it is)",
                f"{name} (generated)",
            )
            sys.stdout.writelines(diff)
    missing = sorted(BLOCKS.keys() - seen)
    if missing:
        print(f"error: no file holds the generated blocks {missing}", file=sys.stderr)
        return 1
    if differ and args.check:
        print(
            f"\n{len(differ)} file(s) differ from the code: run "
            "`.venv/bin/python docs/reference.py --write`",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
