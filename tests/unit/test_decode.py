"""The decoding layer for values read from Redis (decode.py), the record and spec parsers on
top of it, and the plan's rollover of sandboxes made from an older build of their pool."""

import re

import pytest

from sandboxd import decode
from sandboxd.control.plan import Observed, plan
from sandboxd.spec import PoolSpec, SpecError, parse_document, parse_spec
from sandboxd.store.records import SandboxRecord


def escaped(raw: bytes) -> str:
    """What the daemon's Redis client hands over for `raw` (errors="surrogateescape")."""
    return raw.decode("utf-8", "surrogateescape")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (escaped(b"caf\xe9"), "not valid UTF-8 (byte 3: 0xe9)"),
        (b"caf\xe9", "not valid UTF-8 (byte 3: 0xe9)"),
        (escaped('{"a": 1}'.encode("utf-16")), "UTF-16 with a byte-order mark"),
        ('{"a": 1}'.encode("utf-16-le").decode(), "NUL characters (UTF-16 text?)"),
        ("a\x00b", "contains NUL characters"),
        ("x" * 11, "too long (11 characters, at most 10)"),
        (7, "expected text, got int"),
    ],
)
def test_text_refuses_with_a_reason(value, reason):
    with pytest.raises(decode.BadValue, match=re.escape(reason)):
        decode.text(value, max_chars=10 if value == "x" * 11 else 1000)


def test_text_passes_valid_utf8_through():
    assert decode.text("café ✓") == "café ✓"
    assert decode.text("café".encode()) == "café"


def test_depth_is_measured_without_parsing_and_ignores_strings():
    assert decode.json_depth('{"a": "[[[[{{{", "b": [1, [2, {"c": "]]]"}]]}') == 4
    assert decode.json_depth("[" * 100_000) == 100_000  # no recursion, no RecursionError
    assert decode.json_depth("42") == 0


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("[" * 1000 + "]" * 1000, "JSON nested 1000 deep (at most 32)"),
        ("{'a': 1}", "not valid JSON"),
        ("1" * 5000, "not usable JSON"),  # past Python's integer string limit
    ],
)
def test_json_value_refuses_before_parsing(raw, reason):
    with pytest.raises(decode.BadValue, match=re.escape(reason)):
        decode.json_value(raw)


def test_printable_replaces_what_is_not_utf8():
    assert decode.printable(escaped(b"ag\xffent")) == "ag\ufffdent"
    assert decode.printable("ok") == "ok"


def record_fields(**changes: str) -> dict[str, str]:
    record = SandboxRecord(
        id="sb-1",
        pool="p",
        provider="local",
        state="ready",
        template="base",
        spec_revision=1,
        instance="i",
    )
    return {**{k: str(v) for k, v in record.to_hash().items()}, **changes}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"spec_revision": "abc"}, "spec_revision"),
        ({"lease_expires_ms": "nan"}, "lease_expires_ms"),
        ({"claimant": escaped(b"\xff\xfe")}, "claimant"),
        ({"handle": "[" * 1000}, "handle"),
        ({"handle": "[]"}, "handle"),
        ({"state": "exploded"}, "state"),
    ],
)
def test_a_bad_record_field_is_named(changes, field):
    with pytest.raises(decode.BadValue) as caught:
        SandboxRecord.from_hash(record_fields(**changes))
    assert caught.value.field == field and caught.value.reason


def test_spec_documents_and_files_name_the_problem():
    for raw in ("[" * 1000, escaped(b'{"revision": 1, "pools": [{"name": "\xe9"}]}')):
        with pytest.raises(SpecError, match=r"^\(document\): "):
            parse_document(raw)
    with pytest.raises(SpecError) as caught:
        parse_spec('pools:\n  - name: web\n    env: {A: "a\\0b"}\n    labels: {"k\\0": v}\n')
    assert caught.value.problems == [
        "pools[0](web).env.A: must not contain NUL characters",
        "pools[0](web).labels.k\x00: must not contain NUL characters",
    ]


def test_the_build_id_follows_what_a_sandbox_is_made_from():
    base = PoolSpec(name="p")
    assert PoolSpec(name="p", min_ready=5, max_total=9).build_id == base.build_id
    for changed in ({"env": {"A": "1"}}, {"template": "python"}, {"memory_mb": 1024}):
        assert PoolSpec(name="p", **changed).build_id != base.build_id


def test_ready_sandboxes_of_an_older_build_roll_over_make_before_break():
    spec = PoolSpec(name="p", min_ready=3, max_total=4, max_surge=1, env={"A": "new"})
    old = [Observed(f"o{i}", "p", "ready", float(i), build="old") for i in range(3)]
    first = plan([spec], old, create_slots=10, now=100.0)[0]
    assert (first.create, first.terminate) == (1, [])  # make first
    fresh = Observed("n0", "p", "ready", 50.0, build=spec.build_id)
    second = plan([spec], [*old, fresh], create_slots=10, now=100.0)[0]
    assert second.terminate == [("o0", "spec_changed")] and second.create == 1
    unknown = [Observed(f"u{i}", "p", "ready", float(i)) for i in range(3)]  # before builds
    assert not plan([spec], unknown, create_slots=10, now=100.0)[0].changes
