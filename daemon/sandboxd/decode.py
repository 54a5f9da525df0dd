"""The one door for values read from Redis: everything there is input.

Operators, clients and scripts in any language write into Redis, so a value the daemon
reads may be anything: bytes that are not UTF-8 (or UTF-16 text), JSON nested a thousand
deep, a number where a name was meant. Every value goes through here before pydantic or
`json.loads` sees it, with limits on size, nesting and encoding, and a failure is a
`BadValue` naming the reason — never a UnicodeDecodeError, RecursionError or a hang.

The clients decode replies with `errors="surrogateescape"` (`store.connection.open_redis`), so
invalid bytes reach Python as lone surrogates instead of failing inside the Redis client;
`text()` turns them into a clear error, and `printable()` into U+FFFD for display.
"""

import json
import re
from itertools import accumulate
from typing import Any

MAX_SPEC_CHARS = 64 * 1024 * 1024  # a spec of 20,000 pools with every default is ~30 MB
MAX_FIELD_CHARS = 64 * 1024  # one field of a sandbox record (handle, health checks, ...)
MAX_JSON_DEPTH = 32  # a spec is 5 deep, a record's JSON fields 3

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")
_OPENING = frozenset("[{")


class BadValue(ValueError):
    """A value from Redis (or a file) that cannot be used; `reason` says why."""

    def __init__(self, reason: str, field: str = ""):
        super().__init__(f"{field}: {reason}" if field else reason)
        self.reason = reason
        self.field = field


def plain(values: list[str], *, max_chars: int = MAX_FIELD_CHARS) -> bool:
    """The fast path for many values at once: all ASCII str, no NUL, none too long (what
    the daemon writes). False means: check each with `text` for the precise reason."""
    try:
        joined = "".join(values)  # a TypeError for anything not a str
    except TypeError:
        return False
    return (
        joined.isascii() and "\x00" not in joined and max(map(len, values), default=0) <= max_chars
    )


def text(value: Any, *, max_chars: int = MAX_FIELD_CHARS, field: str = "") -> str:
    """A str of valid UTF-8 without NUL characters, at most `max_chars` long."""
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadValue(_not_utf8(bytes(value), exc.start), field) from None
    elif not isinstance(value, str):
        raise BadValue(f"expected text, got {type(value).__name__}", field)
    if len(value) > max_chars:
        raise BadValue(f"too long ({len(value)} characters, at most {max_chars})", field)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates: bytes that were not UTF-8
            raw = value.encode("utf-8", "surrogateescape")
            start = len(value[: exc.start].encode("utf-8", "surrogateescape"))
            raise BadValue(_not_utf8(raw, start), field) from None
    if "\x00" in value:
        hint = " (UTF-16 text?)" if value.count("\x00") * 3 >= len(value) else ""
        raise BadValue(f"contains NUL characters{hint}", field)
    return value


def _not_utf8(raw: bytes, start: int) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "not valid UTF-8 (UTF-16 with a byte-order mark?)"
    return f"not valid UTF-8 (byte {start}: 0x{raw[start]:02x})"


def json_depth(raw: str) -> int:
    """How deeply arrays and objects nest in `raw` (strings ignored), without parsing it
    (so without recursion): the check that comes before `json.loads` or a YAML parser."""
    brackets = _BRACKETS.findall(_STRINGS.sub("", raw))
    if not brackets:
        return 0
    return max(0, max(accumulate(1 if b in _OPENING else -1 for b in brackets)))


def json_value(
    value: Any,
    *,
    max_chars: int = MAX_FIELD_CHARS,
    max_depth: int = MAX_JSON_DEPTH,
    field: str = "",
) -> Any:
    """Parse JSON read from Redis within the limits; BadValue otherwise."""
    raw = text(value, max_chars=max_chars, field=field)
    if raw.count("[") + raw.count("{") > max_depth:  # else it cannot nest deeper: no scan
        depth = json_depth(raw)
        if depth > max_depth:
            raise BadValue(f"JSON nested {depth} deep (at most {max_depth})", field)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BadValue(f"not valid JSON: {exc.msg} at position {exc.pos}", field) from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of 5000 digits
        raise BadValue(f"not usable JSON: {exc}", field) from None


def printable(value: Any) -> str:
    """For display only (the CLI's tables and JSON): invalid bytes become U+FFFD."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if not isinstance(value, str):
        return str(value)
    if value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
