"""The `run:` program of E2B sandboxes: the supervisor's journal read back with a cursor,
and the daemon's checks of what comes out of a sandbox (its word, never trusted)."""

import json
import os
import subprocess
import sys

import pytest

from sandboxd.providers import supervisor
from sandboxd.providers.e2b import program
from sandboxd.spec import RunSpec


def answer(**extra) -> str:
    return json.dumps({"state": "running", "seq": 10, "events": [], "lines": [], **extra})


def test_news_keeps_only_the_programs_own_events_and_bounded_lines():
    forged = [
        {"seq": 6, "type": "agent.started", "pid": 7, "restarts": 0},
        {"seq": 7, "type": "sandbox.terminated", "reason": "forged"},  # not an agent event
        {"seq": 8, "type": "agent.failed", "reason": "x", "sandbox": "sb-other"},  # not its own
        {"seq": 9, "type": "agent.failed", "reason": "y" * 10_000},  # too big
        {"seq": 3, "type": "agent.exited", "exit_code": 1},  # seen already
        "not an event",
    ]
    lines = [[6, 1.5, "ok"], [7, 1.5, "z" * 5000], [8, "soon", "x"], [2, 1.0, "old"], [9]]
    news = program.news(answer(events=forged, lines=lines), since=5)
    assert news["events"] == [{"seq": 6, "type": "agent.started", "pid": 7, "restarts": 0}]
    assert news["lines"] == [[6, 1.5, "ok"]]
    assert news["seq"] == 10 and news["state"] == "running"


def test_news_is_bounded_and_its_cursor_never_goes_back():
    many = [{"seq": i, "type": "agent.started", "pid": 1} for i in range(1, 1000)]
    news = program.news(answer(seq=3, events=many), since=0)
    assert len(news["events"]) == program.MAX_EVENTS
    assert news["seq"] == program.MAX_EVENTS  # past what it kept, even when the answer lied
    assert program.news(answer(seq=1), since=50)["seq"] == 50
    for bad in ("", "[]", "{}", answer(state="hacked"), answer(seq=-1), "x" * 100):
        with pytest.raises(ValueError, match="not the supervisor's answer"):
            program.news(bad, since=0)


def test_uploads_carry_the_supervisor_its_settings_and_the_pools_files():
    run = RunSpec(command="python3 -u bot.py", files={"bot.py": "print(1)"})
    paths = {u["path"]: u["data"] for u in program.uploads(run)}
    assert paths["bot.py"] == b"print(1)"
    settings = json.loads(paths[f"{program.DIR}/run.json"])
    assert settings["command"] == "python3 -u bot.py" and "files" not in settings
    assert settings["seq_after"] == 0
    assert b"def read(" in paths[f"{program.DIR}/supervisor.py"]


def test_the_journal_is_read_from_the_cursor_across_a_rotation(tmp_path, monkeypatch):
    monkeypatch.setattr(supervisor, "JOURNAL_BYTES", 400)
    journal = supervisor.Journal(str(tmp_path))
    for seq in range(1, 31):
        journal.append([seq, 1.0, f"line {seq}"])
    assert (tmp_path / "journal.1").exists()  # rotated at least once
    with open(tmp_path / "journal", "ab") as handle:
        handle.write(b'[31, 1.0, "being writ')  # no newline yet: not read
    kept = [line[0] for line in supervisor.read(str(tmp_path), 0)["lines"]]
    assert kept == list(range(kept[0], 31))  # what two files hold, in order, no gap
    after = supervisor.read(str(tmp_path), 25)
    assert [line[0] for line in after["lines"]] == [26, 27, 28, 29, 30] and after["seq"] == 30
    small = supervisor.read(str(tmp_path), 25, budget=60)
    assert [line[0] for line in small["lines"]] == [26, 27] and small["seq"] == 27
    monkeypatch.setattr(supervisor, "READ_ENTRIES", 3)
    assert supervisor.read(str(tmp_path), 25)["seq"] == 28  # and the next read goes on
    assert supervisor.Journal(str(tmp_path)).last_seq() == 30
    assert supervisor.stop(str(tmp_path)) == 30  # nothing to kill: no status
    events = tmp_path / "events"
    events.mkdir()
    supervisor.Journal(str(events)).append({"seq": 31, "type": "agent.started", "pid": 7})
    read = supervisor.read(str(events), 30)
    assert read["events"] == [{"seq": 31, "type": "agent.started", "pid": 7}]
    assert supervisor.read(str(events), 31)["events"] == []


def test_a_supervisor_that_is_gone_reads_as_failed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    status = {"state": "running", "pid": None, "restarts": 0, "supervisor": dead.pid}
    (tmp_path / "status.json").write_text(json.dumps(status))
    read = supervisor.read(str(tmp_path), 0)
    assert read["state"] == "failed" and "supervisor is gone" in read["reason"]
    assert [e["type"] for e in read["events"]] == ["agent.failed"]  # said once:
    assert supervisor.read(str(tmp_path), read["seq"])["events"] == []
    status["supervisor"] = os.getpid()
    (tmp_path / "status.json").write_text(json.dumps(status))
    assert supervisor.read(str(tmp_path), 0)["state"] == "running"
