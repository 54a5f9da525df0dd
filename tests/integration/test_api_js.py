"""`sandboxd api` from the unmodified e2b JS SDK (npm's `e2b`, pinned in tests/js): a Node
program whose only change is its environment creates a warm sandbox of an e2b pool, runs
commands, writes and reads a file, lists, and kills it (tests/js/e2b_client.mjs).

The SDK is installed into tests/js/node_modules (git-ignored) with `npm ci` when it is not
there yet; without Node, or when npm cannot reach its registry, the test is skipped and says
why."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import E2B_TEST_KEY, KEYS, apply, cli, wait_event, wait_ready

from .test_api import ApiServer, new_key
from .test_e2b import e2b_pool, e2b_settings

pytestmark = pytest.mark.timeout(300)

JS = Path(__file__).resolve().parent.parent / "js"
UNREACHABLE = re.compile(
    r"ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|EHOSTUNREACH|"
    r"network|proxy|socket hang up|request to .* failed"
)


def pinned_version() -> str:
    return json.loads((JS / "package.json").read_text())["dependencies"]["e2b"]


def installed_version() -> str | None:
    try:
        return json.loads((JS / "node_modules/e2b/package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the pinned `e2b` package installed in tests/js/node_modules."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js and npm are not installed: the JS SDK test needs them")
    major = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    if int(major.stdout.strip().lstrip("v").split(".")[0]) < 20:
        pytest.skip(f"the e2b JS SDK needs Node 20 or later, this is {major.stdout.strip()}")
    if installed_version() != pinned_version():
        try:
            done = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--prefer-offline", "--fetch-retries=1"],
                cwd=JS,
                capture_output=True,
                text=True,
                timeout=240,
            )
        except subprocess.TimeoutExpired:
            pytest.skip("npm ci did not finish in 240 s: the npm registry is not reachable")
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip()
            why = [line for line in output.splitlines() if UNREACHABLE.search(line)]
            if why:
                pytest.skip(f"npm cannot reach its registry, so no e2b JS SDK: {why[0]}")
            pytest.fail(f"npm ci failed in tests/js:\n{output}")
        assert installed_version() == pinned_version()
    return node


def run_program(node: str, template: str, api_url: str, sandbox_url: str, key: str, home) -> dict:
    """tests/js/e2b_client.mjs with the program's whole environment: sandboxd's URLs and
    key, no E2B account key, no E2B_DOMAIN, no debug mode. What it saw."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "E2B_API_URL": api_url,
        "E2B_SANDBOX_URL": sandbox_url,
        "E2B_API_KEY": key,
    }
    done = subprocess.run(
        [node, "e2b_client.mjs", template],
        cwd=JS,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    return json.loads(done.stdout.strip().splitlines()[-1])


def saw_the_program_run(seen: dict, sandbox_id: str) -> None:
    """What e2b_client.mjs saw, whichever pool served it."""
    assert seen["run"] == {
        "stdout": f"hi from {sandbox_id}\n",
        "stderr": "oops\n",
        "exitCode": 0,
        "streamed": f"hi from {sandbox_id}\n",
    }
    assert seen["exit"] == {"thrown": True, "exitCode": 3}
    assert seen["read"] == seen["catOfFile"] == "written by the JS SDK"
    assert seen["listed"] == [{"sandboxId": sandbox_id, "metadata": {"job": "js"}}]
    assert seen["unknownTemplate"]["thrown"] and seen["unknownTemplate"]["statusCode"] == 404
    assert seen["badKey"] == {"thrown": True}
    assert seen["afterKill"] == [] and seen["killAgain"] is False


async def test_the_e2b_js_sdk_gets_a_warm_sandbox_of_an_e2b_pool_through_sandboxd_api(
    node, fake_e2b, redis, redis_server, daemon_factory, tmp_path
):
    daemon = daemon_factory(e2b=e2b_settings(fake_e2b))
    daemon.env["E2B_API_KEY"] = E2B_TEST_KEY  # the daemon's own, nobody else's
    daemon.start()
    await apply(redis, [e2b_pool(min_ready=2, max_total=4)])
    await wait_ready(redis, "cloud", 2)
    key = new_key(redis_server, "js")
    warm = {s.id: s.metadata["sandboxd-id"] for s in fake_e2b.ours()}  # E2B id -> sandboxd's

    with ApiServer(redis_server, tmp_path / "api.log") as api:
        seen = run_program(node, "cloud", api.url, fake_e2b.url, key, tmp_path)

    e2b_id = seen["sandboxId"]
    assert e2b_id in warm  # a warm one: the fake E2B's own sandbox, made before the program ran
    saw_the_program_run(seen, e2b_id)
    assert "template 'nope' not found" in seen["unknownTemplate"]["message"]

    # An ordinary claim, owned by the key's name, ended by the kill; the pool refills.
    sandbox = warm[e2b_id]
    claimed = await wait_event(redis, "sandbox.claimed", sandbox=sandbox)
    assert (claimed["data"]["claimant"], claimed["data"]["lease_s"]) == ("js", 120)
    await wait_event(redis, "sandbox.released", sandbox=sandbox)
    assert not await redis.keys(KEYS.api_sandbox("*"))
    await wait_ready(redis, "cloud", 2)
    assert key not in cli(redis_server, "events", "-n", "1000", "-o", "json").stdout
    assert key not in (tmp_path / "api.log").read_text()


async def test_the_e2b_js_sdk_runs_commands_and_files_in_a_warm_local_sandbox(
    node, redis, redis_server, daemon_factory, tmp_path
):
    """The same program against a local pool: sandboxd serves the sandbox's envd too
    (`E2B_SANDBOX_URL` at sandboxd), carried to the local sandbox's agent."""
    daemon = daemon_factory().start()
    await apply(redis, [{"name": "default", "min_ready": 2, "max_total": 3}])
    warm = set(await wait_ready(redis, "default", 2))
    key = new_key(redis_server, "js")
    env = {"SANDBOXD_LOCAL__WORKSPACE_ROOT": str(daemon.workspace)}
    with ApiServer(redis_server, tmp_path / "api.log", **env) as api:
        seen = run_program(node, "default", api.url, api.url, key, tmp_path)
    sandbox = seen["sandboxId"]
    assert sandbox in warm  # a warm one, made before the program ran
    saw_the_program_run(seen, sandbox)
    claimed = await wait_event(redis, "sandbox.claimed", sandbox=sandbox)
    assert (claimed["data"]["claimant"], claimed["data"]["via"]) == ("js", "api")
    await wait_event(redis, "sandbox.released", sandbox=sandbox)
    assert key not in (tmp_path / "api.log").read_text()
