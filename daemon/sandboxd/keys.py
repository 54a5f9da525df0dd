"""Every Redis key, stream and channel name sandboxd uses, in one place.

Client programs in other languages rely on these names; they are part of the public interface.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "sandboxd"

    @property
    def spec(self) -> str:
        """Desired state written by operators: JSON with an integer `revision`."""
        return f"{self.prefix}:spec"

    @property
    def spec_history(self) -> str:
        """List of accepted specs, newest first, trimmed to SPEC_HISTORY_LEN."""
        return f"{self.prefix}:spec:history"

    @property
    def spec_active(self) -> str:
        """The spec the daemon has in force (differs from `spec` while that is invalid)."""
        return f"{self.prefix}:spec:active"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    @property
    def nudge(self) -> str:
        """Pub/sub channel: any message wakes the reconciler at once."""
        return f"{self.prefix}:nudge"

    @property
    def daemon(self) -> str:
        """Daemon heartbeat: JSON, expires unless refreshed."""
        return f"{self.prefix}:daemon"

    @property
    def sandboxes(self) -> str:
        """Set of every sandbox id that has a record."""
        return f"{self.prefix}:sandboxes"

    def sandbox(self, sandbox_id: str) -> str:
        return f"{self.prefix}:sandbox:{sandbox_id}"

    def pool_ready(self, pool: str) -> str:
        """List of ready sandbox ids, oldest at the head (LPOP takes the oldest)."""
        return f"{self.prefix}:pool:{pool}:ready"


SPEC_HISTORY_LEN = 20
