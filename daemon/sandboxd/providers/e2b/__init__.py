"""The `e2b` provider: sandboxes in the E2B cloud through the `e2b` SDK.

- `provider`: `E2BProvider` — create (with the account's concurrency cap), list, probe,
  extend and kill E2B sandboxes;
- `errors`: which SDK errors mean gone, retry later, or give up; `ratelimit`: pacing of
  creates against E2B's rate limits;
- `connection`: a claimant's connection to one sandbox's envd (commands, files);
- `program`: a pool's `run:` program in an E2B sandbox — the supervisor uploaded and started
  through envd, its news read back and checked (it is the sandbox's word).
"""
