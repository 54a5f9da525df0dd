"""api — `sandboxd api`: E2B's REST API, so unmodified E2B SDK programs get warm sandboxes.

    sandboxd apikey create alice --pools cloud --max-sandboxes 5    # prints the key once
    sandboxd api                                                    # listens on api_listen

    E2B_API_URL=http://127.0.0.1:3000 E2B_API_KEY=sbk_... python -c '
    from e2b import Sandbox
    sandbox = Sandbox.create("cloud")        # a warm claim of pool "cloud"
    print(sandbox.commands.run("echo hi").stdout)
    sandbox.kill()                           # its release'

A create (`POST /v2/sandboxes`, `templateID` = a pool's name) is a claim of a ready
sandbox, owned by the API key's name, with E2B's `timeout` as its lease (capped by the
pool's `max_lease_s`); an empty pool is waited on for a bounded time (the client's claim
wait, per the pool's `on_empty`), then a clear 503, never a hang. For an `e2b` pool the
answer is the real E2B sandbox's id, envd version and envd access token: the SDK talks to
that sandbox's envd directly and the program never holds the E2B account key. For a
`local` pool this server is the envd too (`envd`): the answer carries a per-claim envd
access token, and the SDK's commands and file calls are carried to the sandbox's agent.

Kill (`DELETE /sandboxes/{id}`) releases, `POST /sandboxes/{id}/timeout` and `/refreshes`
renew the lease, list (`GET /sandboxes`, `GET /v2/sandboxes` with `state`, `metadata`,
`limit`, `nextToken`) and get show the calling key's own sandboxes only.

- `app`: the Starlette app — auth by `X-API-KEY` (keys of `store.apikeys`, checked against
  their SHA-256), quotas, E2B's paths, bodies and `{code, message}` errors;
- `registry`: E2B id -> the sandboxd sandbox and its claim (and the claim's secret token,
  which no log, event or view shows), per key the sandboxes it holds;
- `envd`: envd's Connect-RPC process and filesystem services, `/files` and `/health` for
  local sandboxes, routed by `E2b-Sandbox-Id` (or the host name), token checked, through
  the agent's trusted socket;
- `server`: uvicorn on `api_listen`, TLS with `api_tls_cert`/`api_tls_key`.

Like the CLI it is a thin client of Redis (`sandboxd.client`, the store): it never imports
the daemon's wings (`control`, `health`, `outputs`, `daemon`), so it runs on any host that
reaches Redis, as many times as wanted. Details: docs/api.md.
"""
