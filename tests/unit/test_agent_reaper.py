"""The in-sandbox agent is PID 1 of its namespace and reaps orphaned zombies. It must never
reap a child it has just started but not yet recorded: asyncio would then report that
command's exit code as 255 (seen once in 2,560 claims of the stress test).

Run in a PID namespace of its own (unprivileged user namespace), so the agent's reaper is
the real one, reading the real /proc, as PID 1.
"""

import shutil
import subprocess
import sys
import textwrap

import pytest

UNSHARE = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc"]
SCRIPT = textwrap.dedent(
    """
    import os
    from sandboxd.providers.local import agent

    assert os.getpid() == 1

    def state(pid):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                return handle.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return "gone"

    def zombie():
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        return pid

    starting = zombie()
    with agent.RUNNING.starting():  # a start in flight: its pid is not recorded yet
        agent._reap_orphans(agent.RUNNING)
        print("in flight:", state(starting))
        agent.RUNNING.add(starting)
    agent._reap_orphans(agent.RUNNING)
    print("recorded:", state(starting))

    orphan = zombie()
    agent._reap_orphans(agent.RUNNING)
    print("orphan:", state(orphan))
    """
)


@pytest.mark.skipif(not shutil.which("unshare"), reason="needs unshare (util-linux)")
def test_the_reaper_leaves_a_child_being_started_to_asyncio():
    done = subprocess.run(
        [*UNSHARE, sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["in flight: Z", "recorded: Z", "orphan: gone"]
