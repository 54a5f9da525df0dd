import io
import json
import logging

from sandboxd.config import Config
from sandboxd.logs import redact_url, register_secret, setup_logging
from sandboxd.store.connection import make_client


def test_redact_url_hides_only_the_password():
    assert redact_url("redis://user:s3cret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact_url("redis://:s3cret@host/1") == "redis://:***@host/1"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"


def test_logs_are_json_and_never_show_secrets(monkeypatch, capsys):
    setup_logging("INFO")
    client = make_client(Config(redis_url="redis://u:hunter2pw@127.0.0.1:1/0"))
    register_secret("other-secret-value")
    log = logging.getLogger("sandboxd.test")
    log.info("connecting with hunter2pw", extra={"url": "redis://u:hunter2pw@h", "pool": "a"})
    log.warning("key other-secret-value")
    lines = capsys.readouterr().out.strip().splitlines()
    records = [json.loads(line) for line in lines]
    assert {"time", "level", "logger", "message"} <= records[0].keys()
    assert records[0]["pool"] == "a"
    assert all("hunter2pw" not in line and "other-secret-value" not in line for line in lines)
    assert "***" in records[0]["message"]
    del client
    logging.getLogger().handlers[:] = [logging.StreamHandler(io.StringIO())]


def test_uvicorns_coloured_copy_of_a_message_is_not_logged(capsys):
    """uvicorn passes `color_message` (its message with ANSI codes) as an extra: the JSON
    line keeps the plain message and no terminal escapes."""
    setup_logging("INFO")
    # (as uvicorn.error logs it; a logger of its own: the suite's servers configure uvicorn's)
    logging.getLogger("sandboxd.test.uvicorn").info(
        "Started server process [%d]",
        7,
        extra={"color_message": "Started server process [\x1b[36m%d\x1b[0m]"},
    )
    line = capsys.readouterr().out.strip().splitlines()[-1]
    record = json.loads(line)
    assert record["message"] == "Started server process [7]"
    assert "color_message" not in record and "\\u001b" not in line
    logging.getLogger().handlers[:] = [logging.StreamHandler(io.StringIO())]
