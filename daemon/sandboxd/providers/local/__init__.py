"""The `local` provider: bubblewrap sandboxes on this host, the embedded default.

- `provider`: `LocalProvider` — launches, probes, resets and terminates sandboxes as
  unprivileged per-sandbox uids in their own namespaces, and keeps the on-disk registry;
- `seccomp`: the syscall filter (libseccomp); `cgroups`: whole-sandbox limits (pids,
  memory, cpu) on cgroup v1 or v2;
- `agent` (with `providers/supervisor.py`): the programs that run *inside* a sandbox
  (passed in by fd);
- `agentclient`: the host side of the agent's socket protocol, used by clients.
"""
