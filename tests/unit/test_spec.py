from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandboxd.config import Config, LocalProviderConfig, LocalTemplate
from sandboxd.spec import (
    PoolSpec,
    Spec,
    SpecError,
    check_against_config,
    diff_specs,
    parse_document,
    parse_spec,
)

EXAMPLE = Path(__file__).parents[2] / "config" / "spec.example.yaml"


def problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse_spec(text)
    return caught.value.problems


def test_example_spec_is_valid():
    spec = parse_spec(EXAMPLE.read_text())
    assert [p.name for p in spec.pools] == ["default", "python"]
    assert spec.pool("default").min_ready == 2


def test_negative_min_ready_names_the_field():
    assert problems("pools:\n  - name: a\n    min_ready: -1\n") == [
        "pools[0](a).min_ready: Input should be greater than or equal to 0"
    ]


def test_unknown_field_is_rejected():
    (problem,) = problems("pools:\n  - name: a\n    min_redy: 1\n")
    assert problem == "pools[0](a).min_redy: unknown field"


def test_unknown_top_level_field_is_rejected():
    assert problems("pools: []\nextra: 1\n") == ["extra: unknown field"]


def test_min_ready_above_max_total():
    (problem,) = problems("pools:\n  - name: a\n    min_ready: 5\n    max_total: 2\n")
    assert problem.startswith("pools[0](a):") and "must not exceed max_total" in problem


def test_malformed_yaml_says_where():
    (problem,) = problems("pools:\n  - name: a\n   min_ready: [1\n")
    assert "malformed YAML" in problem and "line" in problem


def test_pools_must_be_a_list():
    (problem,) = problems("pools:\n  default:\n    min_ready: 1\n")
    assert problem.startswith("pools:") and "list" in problem


def test_duplicate_names_rejected():
    (problem,) = problems("pools:\n  - name: a\n  - name: a\n")
    assert "used more than once" in problem


@pytest.mark.parametrize(
    "pools, clash",
    [
        ("[{name: a, e2b_alias: [b]}, {name: b}]", "'b' of pool 'a' already names pool 'b'"),
        ("[{name: a, e2b_alias: [x]}, {name: b, e2b_alias: [x]}]", "'x' of pool 'b'"),
    ],
)
def test_an_e2b_alias_names_one_pool(pools, clash):
    (problem,) = problems(f"pools: {pools}\n")
    assert clash in problem and "a template name must find one pool" in problem


def test_e2b_aliases_are_template_names():
    spec = parse_spec("pools: [{name: a, e2b_alias: [base, a, code-interpreter-v1]}]\n")
    assert spec.pool("a").e2b_alias == ["base", "a", "code-interpreter-v1"]
    (problem,) = problems("pools: [{name: a, e2b_alias: ['Base Image']}]\n")
    assert problem.startswith("pools[0](a).e2b_alias[0]:")


@pytest.mark.parametrize("name", ["A", "-a", "a-", "a_b", "", "a" * 64, "a.b"])
def test_names_must_be_dns_labels(name):
    (problem,) = problems(f"pools:\n  - name: '{name}'\n")
    assert problem.startswith("pools[0]") and ".name:" in problem


def test_json_is_accepted_too():
    assert parse_spec('{"pools": [{"name": "a", "min_ready": 0}]}').pools[0].name == "a"


def test_document_needs_a_revision():
    with pytest.raises(SpecError) as caught:
        parse_document('{"pools": []}')
    assert caught.value.problems == ["revision: Field required"]


def test_document_not_json():
    with pytest.raises(SpecError, match="not valid JSON"):
        parse_document("{nope")


def test_unknown_template_is_checked_against_the_config():
    config = Config(local=LocalProviderConfig(templates={"py": LocalTemplate()}))
    check_against_config(Spec(pools=[PoolSpec(name="a", template="py")]), config)
    with pytest.raises(SpecError, match=r"pools\[0\]\(a\)\.template: unknown local template"):
        check_against_config(Spec(pools=[PoolSpec(name="a", template="nope")]), config)


def test_diff_lists_added_removed_and_changed():
    old = Spec(pools=[PoolSpec(name="a", min_ready=1), PoolSpec(name="b")])
    new = Spec(pools=[PoolSpec(name="a", min_ready=3), PoolSpec(name="c")])
    assert diff_specs(old, new) == ["~ pool a: min_ready 1 -> 3", "- pool b (drained)", "+ pool c"]


sizes = st.integers(min_value=-5, max_value=30)


@given(min_ready=sizes, max_total=sizes, cpu=st.floats(-2, 8, allow_nan=False))
def test_sizes_valid_exactly_when_the_rules_hold(min_ready, max_total, cpu):
    text = (
        f"pools:\n  - name: p\n    min_ready: {min_ready}\n    max_total: {max_total}\n"
        f"    cpu: {cpu}\n"
    )
    valid = 0 <= min_ready <= max_total and max_total >= 1 and cpu > 0
    try:
        spec = parse_spec(text)
    except SpecError as exc:
        assert not valid, exc.problems
        assert all(
            p.startswith("pools[0](p).") or p.startswith("pools[0](p):") for p in exc.problems
        )
    else:
        assert valid
        assert spec.pools[0].min_ready == min_ready


@given(st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True), max_size=6))
def test_valid_specs_round_trip_through_json(names):
    pools = [
        {"name": n, "min_ready": i % 3, "max_total": 3, "labels": {"k": n}}
        for i, n in enumerate(dict.fromkeys(names))
    ]
    spec = Spec.model_validate({"pools": pools})
    assert Spec.model_validate_json(spec.model_dump_json()) == spec


def test_a_diff_names_env_variables_but_never_shows_their_values():
    from sandboxd.spec import Spec, diff_specs

    old = Spec(pools=[PoolSpec(name="p", env={"TOKEN": "s3cret", "MODE": "a"})])
    new = Spec(pools=[PoolSpec(name="p", env={"TOKEN": "s3cret-v2", "MODE": "a"})])
    lines = diff_specs(old, new)
    assert lines and "TOKEN" in lines[0]
    assert "s3cret" not in "\n".join(lines)
