"""store — everything that reads or writes Redis, and nothing else.

The daemon, the CLI and the client all meet in Redis; this wing owns its shape:

- `keys`: every key name under the configured prefix (one place to read the layout);
- `records`: sandbox records (`SandboxRecord`, `SandboxStore`), the per-pool state sets and
  the ready lists, validated on every read (a record is input, never trusted);
- `claims`: the Lua scripts that claim, renew and release atomically, and the claim tokens;
- `specs`: the desired-state spec as operators write it, its revisions and history;
- `events`: event shapes (`EVENT_TYPES`, `Event`) and the publisher of the event stream;
  `eventtail` reads the stream back for metrics and the MQTT bridge; `view` keeps the
  reconciler's records in memory, read again only where the stream says they changed;
- `connection`: opening clients (timeouts, pool size, secrets kept out of logs) and
  waiting for Redis at start; `loops`: the `every`/`forever`/`survive` helpers that let a
  control loop outlive a Redis outage;
- `localredis`: a redis-server for `make run` and the tests.

It imports only the model (`sandboxd.config`, `sandboxd.spec`, `sandboxd.decode`,
`sandboxd.logs`); providers, control loops and outputs build on it.
"""
