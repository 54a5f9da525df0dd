"""The layering contract (pyproject's [tool.importlinter]) holds, and it bites: a wrong import
written into a copy of the package breaks it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")
pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed")


def lint(package_parent: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run(
        [str(LINT), str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
    )


def copy_package(tmp_path: Path) -> Path:
    parent = tmp_path / "src"
    shutil.copytree(
        ROOT / "daemon" / "sandboxd",
        parent / "sandboxd",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return parent


def test_the_package_keeps_its_layers(tmp_path):
    result = lint(ROOT / "daemon", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "wrong_import", "contract"),
    [
        # a provider reaching into the control loops
        ("providers/base.py", "from sandboxd.control import reconciler", "model <- store"),
        # the store depending on what is built on it
        ("store/records.py", "from sandboxd.outputs import metrics", "model <- store"),
        # the client reaching the daemon's wings
        ("client/aio.py", "from sandboxd.health import monitor", "the client never imports"),
        # one provider importing the other
        ("providers/e2b/errors.py", "import sandboxd.providers.local.cgroups", "each provider"),
        # the in-sandbox agent importing the daemon's model
        ("providers/local/agent.py", "import sandboxd.spec", "inside a sandbox"),
        # a cycle between siblings of one wing
        ("control/plan.py", "from sandboxd.control import reconciler", "no cycles"),
    ],
)
def test_a_wrong_import_breaks_the_contract(tmp_path, module, wrong_import, contract):
    parent = copy_package(tmp_path)
    path = parent / "sandboxd" / module
    path.write_text(path.read_text() + f"\n{wrong_import}  # planted by the test\n")
    result = lint(parent, tmp_path)
    assert result.returncode != 0, result.stdout
    assert "Broken contracts" in result.stdout, result.stdout
    assert contract in result.stdout.split("Broken contracts", 1)[1], result.stdout
