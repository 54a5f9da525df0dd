"""What the tests share (fixtures are in tests/conftest.py): waiting on Redis with a
deadline, the CLI, the real daemon as a process, a test's sandboxes, free ports, a record."""

import os

from tests.support.processes import (
    E2B_TEST_KEY,
    Broker,
    DaemonProcess,
    free_port,
    sandbox_processes,
    toml_config,
)
from tests.support.records import a_record
from tests.support.waiting import (
    KEYS,
    PREFIX,
    apply,
    cli,
    events_of,
    eventually,
    ready_ids,
    sample_totals,
    until,
    wait_event,
    wait_ready,
)

# The long soak versions of the stress and chaos tests: SANDBOXD_SOAK=1 make test.
SOAK = os.environ.get("SANDBOXD_SOAK") == "1"

__all__ = [
    "E2B_TEST_KEY",
    "KEYS",
    "PREFIX",
    "SOAK",
    "Broker",
    "DaemonProcess",
    "a_record",
    "apply",
    "cli",
    "events_of",
    "eventually",
    "free_port",
    "ready_ids",
    "sample_totals",
    "sandbox_processes",
    "toml_config",
    "until",
    "wait_event",
    "wait_ready",
]
