"""`sandboxd api`: the app on uvicorn, listening on `api_listen` (HTTPS with
`api_tls_cert`/`api_tls_key`), a thin client of Redis like the CLI."""

import logging

import uvicorn
from starlette.types import ASGIApp

from sandboxd.api.app import Settings, create_app
from sandboxd.config import Config
from sandboxd.store.connection import make_client

log = logging.getLogger("sandboxd.api")

# An idle keep-alive connection is closed by the client first: the SDK's pool (reqwest)
# drops idle connections after 90 s, so a server closing them sooner (uvicorn's default is
# 5 s) races a client reusing one, and the request dies with "connection reset".
KEEP_ALIVE_S = 120
MAX_CONNECTIONS = 4096  # beyond this, new connections get 503 at once
# envd's streams (a watch, a followed command, a PTY) may be open for as long as their client
# wants: on SIGTERM they get this long to end, then are cut (systemd's TimeoutStopSec is 15 s).
GRACE_S = 5


def app_for(config: Config) -> ASGIApp:
    settings = Settings(
        redis=make_client(config, name="sandboxd-api"),
        prefix=config.key_prefix,
        domain=config.e2b.domain,
        e2b_sandbox_url=config.e2b.sandbox_url,
        local_root=config.local.workspace_root,
        client_kwargs={
            "event_stream_maxlen": config.event_stream_maxlen,
            "claim_durability": config.claim_durability,
            "replication_timeout_ms": config.claim_replication_timeout_ms,
        },
    )
    return create_app(settings, close_redis=True)


def serve(config: Config) -> int:
    """Run until SIGINT/SIGTERM; the exit code."""
    if (config.api_tls_cert is None) != (config.api_tls_key is None):
        log.error("api_tls_cert and api_tls_key go together: set both or neither")
        return 2
    host, _, port = config.api_listen.rpartition(":")
    server = uvicorn.Server(
        uvicorn.Config(
            app_for(config),
            host=host or "127.0.0.1",
            port=int(port),
            ssl_certfile=str(config.api_tls_cert) if config.api_tls_cert else None,
            ssl_keyfile=str(config.api_tls_key) if config.api_tls_key else None,
            log_config=None,  # sandboxd's own JSON logging, secrets scrubbed
            access_log=True,
            lifespan="on",
            loop="auto",  # uvloop and httptools (the api extra), else asyncio's and h11
            http="auto",
            timeout_keep_alive=KEEP_ALIVE_S,
            limit_concurrency=MAX_CONNECTIONS,
            timeout_graceful_shutdown=GRACE_S,
        )
    )
    scheme = "https" if config.api_tls_cert else "http"
    log.info("E2B API on %s://%s", scheme, config.api_listen)
    server.run()
    return 0 if server.started else 1
