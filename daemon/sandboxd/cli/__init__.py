"""cli — the `sandboxd` command: a thin client of Redis, never a side door into the daemon.

- `main`: argument parsing and the commands that read or write desired state (`apply`,
  `get`, `status`, `events`, ...), plus `run`, which starts the daemon;
- `claims`: `claim`, `exec`, `renew`, `release`, `logs` through the client;
- `specs`: `spec` history, diff and rollback;
- `views`: the status dashboard's rows, from Redis; `tables`: human tables (`-o json` for
  machines); `errors`: exit codes and the one-line error every failure becomes.
"""

from sandboxd.cli.main import main

__all__ = ["main"]
