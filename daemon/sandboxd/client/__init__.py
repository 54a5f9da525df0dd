"""client — claim a warm sandbox, use it, give it back.

    from sandboxd.client import Client          # asyncio
    from sandboxd.client import SyncClient      # blocking

- `aio`: the asyncio `Client` and `Sandbox` (claim, exec, renew, release), speaking to Redis
  through the store's claim scripts only — the client is never a side door to the daemon;
- `sync`: the same for code without an event loop;
- `consume`: `Client.events`, reading the event stream through a consumer group, at least
  once (acknowledged after the caller's code, idle consumers' entries taken over);
- `connections`: reaching a claimed sandbox — a local agent socket (checked to be the one
  the registry holds for that id) or an E2B sandbox — with endpoints and keys of the
  client's own configuration, never taken from a record.

It imports the store and the providers' connection code; never the daemon's wings.
"""

from sandboxd.client.aio import ClaimError, ClaimTimeout, Client, Event, Sandbox
from sandboxd.client.sync import SyncClient, SyncSandbox

__all__ = [
    "ClaimError",
    "ClaimTimeout",
    "Client",
    "Event",
    "Sandbox",
    "SyncClient",
    "SyncSandbox",
]
