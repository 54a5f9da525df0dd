"""control — the loops that make what runs match the spec (level-triggered).

- `specsource`: watches the spec in Redis, validates it, keeps the last good one in force;
- `plan`: the pure decision of one pass — per pool, what to create, drain, terminate —
  from observed counts (no I/O, strictly typed, unit-tested alone);
- `reconciler`: one pass per tick over every pool: observe, `plan`, act;
- `creator` (with `pacing`: the circuit `breaker` and `slowstart`) creates sandboxes;
  `terminator` ends them with a reason; `recycler` resets or replaces returned ones;
  `replacements` tracks each lost sandbox until its replacement is ready (`recovery.*` events);
- `schedule`: windows of the week that change a pool's sizes, ramped;
- `adoption` (at start) and `janitor` (periodically) match records to what the provider
  lists, adopting or reaping; `leases` expires claims; `keepalive` keeps E2B sandboxes alive
  while they are wanted;
- `repair` quarantines damaged records; `restore` and `localstate` put Redis back after it
  lost its data; `outbox` keeps what the node changed while Redis could not be reached
  (records closed, events flagged `late`) and writes it, in order and once, when it answers.

Control imports the model, the store and the providers; never the client, the CLI, health
or outputs.
"""
