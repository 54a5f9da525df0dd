"""Gradual scaling: how many creates a pool may have in flight (slow start, TCP-style).

The window starts at 1 and grows by one with every create that succeeds (so it doubles per
round of creates), up to the pool's `max_surge`; a failure halves it. A large spec
change or a flapping provider therefore never produces a burst of doomed creates.
"""


class SlowStart:
    def __init__(self, max_surge: int):
        self.max_surge = max_surge
        self.window = 1

    def allowed(self, inflight: int) -> int:
        """Creates that may start now, given `inflight` already running for the pool."""
        return max(0, min(self.window, self.max_surge) - inflight)

    def succeeded(self) -> None:
        self.window = min(self.window + 1, self.max_surge)

    def failed(self) -> None:
        self.window = max(1, self.window // 2)

    def reconfigure(self, max_surge: int) -> None:
        self.max_surge = max_surge
        self.window = min(self.window, max_surge)
