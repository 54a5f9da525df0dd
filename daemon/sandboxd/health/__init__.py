"""health — is each sandbox well, and is each pool.

- `rules`: pure judgement — from probe results and the pool's health spec, a sandbox's
  health (`healthy`, `degraded`, `unhealthy`) and a pool's state;
- `monitor`: the loop that probes ready and claimed sandboxes through their provider,
  records the results, publishes `sandbox.health` / `pool.health` events and hands failed
  sandboxes to the reconciler for replacement.
"""
