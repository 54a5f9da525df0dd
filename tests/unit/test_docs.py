"""The docs cannot drift: generated tables match the code, and what the docs name exists."""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sandboxd.spec import DENIED_SYSCALLS
from sandboxd.store.records import SandboxRecord

ROOT = Path(__file__).parents[2]
PACKAGE = ROOT / "daemon" / "sandboxd"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
SPAN = re.compile(r"`([^`\n]+)`")
PATH = re.compile(r"^[\w.-]+(/[\w.-]+)*(\.(py|sh|conf|yaml|toml|service)|/)$")


def _spans(path: Path) -> list[str]:
    """Inline code of a markdown file (fenced blocks left out)."""
    return SPAN.findall(FENCE.sub("", path.read_text()))


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end != -1 else len(text)]


def test_the_generated_tables_match_the_code():
    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "reference.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, (
        "README.md or docs/ differ from the code; run "
        "`.venv/bin/python docs/reference.py --write`\n" + done.stdout + done.stderr
    )


def test_the_readme_is_short_and_keeps_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 400
    # .ci/run runs "the README's test command".
    assert "\nmake run    # venv + install" in readme
    assert "\nmake test   # the whole suite" in readme


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_the_files_the_docs_name_exist(doc):
    """A path is relative to the repository or to daemon/sandboxd/ (so `control/plan.py`):
    a module that moved cannot keep its old name in the docs."""
    missing = []
    for span in _spans(doc):
        if not PATH.match(span) or span.startswith((".", "/")):
            continue
        if span.endswith("/") and span.count("/") < 2:
            continue  # `unit/`, `docs/`: a folder named in passing
        if not any((base / span).exists() for base in (ROOT, PACKAGE)):
            missing.append(span)
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_the_python_names_the_docs_use_exist(doc):
    missing = []
    for span in _spans(doc):
        if not re.fullmatch(r"sandboxd(\.\w+)+", span):
            continue
        parts = span.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                found = importlib.import_module(".".join(parts[:cut]))
                break
            except ImportError:
                continue
        for name in parts[cut:]:
            found = getattr(found, name, None)
        if found is None:
            missing.append(span)
    assert not missing, f"{doc.name} names what the package does not have: {missing}"


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", path.read_text()), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_the_links_of_the_docs_resolve(doc):
    broken = []
    prose = SPAN.sub("", FENCE.sub("", doc.read_text()))
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if target.startswith(("http://", "https://")):
            continue
        name, _, anchor = target.partition("#")
        linked = (doc.parent / name).resolve() if name else doc
        if not linked.exists() or (anchor and anchor not in _anchors(linked)):
            broken.append(target)
    assert not broken, f"{doc.name} links to what is not there: {broken}"


def test_every_test_the_security_docs_name_exists():
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    named = {s for s in _spans(ROOT / "docs" / "security.md") if re.fullmatch(r"test_\w+", s)}
    assert named
    missing = sorted(n for n in named if f"def {n}(" not in sources)
    assert not missing, f"docs/security.md names tests that do not exist: {missing}"


def test_the_seccomp_table_lists_every_denied_call():
    table = _section((ROOT / "docs" / "security.md").read_text(), "## The seccomp filter")
    missing = [name for name in DENIED_SYSCALLS if f"`{name}`" not in table]
    assert not missing, f"docs/security.md's seccomp table lacks {missing}"


def test_the_key_table_lists_every_record_field():
    row = next(
        line
        for line in (ROOT / "docs" / "redis.md").read_text().splitlines()
        if line.startswith("| `<prefix>:sandbox:<id>` |")
    )
    listed = re.search(r"\| hash \| `([^`]+)`", row)
    assert listed
    fields = {name.strip() for name in listed.group(1).split(",")}
    assert fields == set(SandboxRecord.model_fields)


def _modules() -> set[str]:
    """The package's modules as paths below daemon/sandboxd/ without `.py`: those git tracks
    (a module being written is not there yet), or every file outside a checkout."""
    done = subprocess.run(
        ["git", "ls-files", "daemon/sandboxd"], capture_output=True, text=True, cwd=ROOT
    )
    files = (
        [ROOT / line for line in done.stdout.splitlines()]
        if done.returncode == 0
        else list(PACKAGE.rglob("*.py"))
    )
    return {
        f.relative_to(PACKAGE).with_suffix("").as_posix()
        for f in files
        if f.suffix == ".py" and f.exists() and not f.name.startswith("__")
    }


def _layout() -> set[str]:
    """The modules the README's Layout tree names, in the same form."""
    section = _section((ROOT / "README.md").read_text(), "## Layout")
    tree = re.search(r"```\n(.*?)```", section, re.DOTALL)
    assert tree
    named: set[str] = set()
    top = wing = ""
    for line in tree.group(1).splitlines()[1:]:
        rest = line.lstrip("│├└─ ")
        depth = len(line) - len(rest)
        names, _, description = rest.partition("  ")
        if not (names.endswith("/") or names.endswith(".py")):
            names, description = "", rest  # a wing's list, continued
        if names.endswith(".py"):
            named |= {n.removesuffix(".py") for n in names.split()}
            wing = ""
            continue
        if names:
            top = names if depth <= 4 else top
            wing = names if depth <= 4 else top + names
        if wing:
            listed = re.sub(r"\([^)]*\)", "", description).split(":")[-1]
            named |= {wing + n.strip() for n in listed.split(",") if n.strip()}
    return named


def test_the_readme_layout_names_every_module():
    assert _layout() == _modules()


def test_the_readme_lists_every_cli_command():
    done = subprocess.run(
        [sys.executable, "-m", "sandboxd", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    commands = re.search(r"\{([a-z,-]+)\}", done.stdout)
    assert commands, done.stdout + done.stderr
    table = _section((ROOT / "README.md").read_text(), "## CLI commands")
    missing = [c for c in commands.group(1).split(",") if f"`sandboxd {c}" not in table]
    assert not missing, f"README's CLI commands lack {missing}"
