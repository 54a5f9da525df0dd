"""A sandbox record as the daemon would write it, for tests that need one."""

from typing import Any

from sandboxd.store.records import SandboxRecord


def a_record(sandbox_id: str = "sb-1", **fields: Any) -> SandboxRecord:
    """A `ready` record of pool `p` (local provider, template `base`); `fields` override."""
    base: dict[str, Any] = {
        "id": sandbox_id,
        "pool": "p",
        "provider": "local",
        "state": "ready",
        "template": "base",
        "spec_revision": 1,
        "instance": "i",
    }
    return SandboxRecord(**(base | fields))
