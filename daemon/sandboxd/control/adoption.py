"""At start: take over sandboxes that outlived the previous daemon, close what is gone.

Records in Redis are compared with what each provider actually holds:
- alive and recorded as ready/claimed/released: adopted as they are (claims keep their
  leases; released ones are recycled by the next reconcile pass);
- recorded but gone: record closed (`died`);
- recorded mid-create or mid-terminate: the previous daemon never finished, so stopped;
- alive but unrecorded: an orphan (e.g. killed between start and record), stopped.
"""

import logging
from dataclasses import dataclass, field
from typing import Any

from sandboxd.providers import Provider, list_all
from sandboxd.store.events import EventPublisher
from sandboxd.store.records import SandboxRecord, SandboxStore

log = logging.getLogger(__name__)
ADOPTABLE = ("ready", "claimed", "released")


@dataclass
class AdoptionReport:
    adopted: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)


async def adopt(
    store: SandboxStore, providers: dict[str, Provider], events: EventPublisher
) -> AdoptionReport:
    report = AdoptionReport()
    listing = await list_all(providers)
    live = listing.sandboxes
    for record in await store.records():
        provider = providers.get(record.provider)
        unknown = record.provider in listing.failed  # kept as they are until it answers
        if provider is not None and record.state in ADOPTABLE and (record.id in live or unknown):
            report.adopted.append(record.id)
            await events.publish(
                "sandbox.adopted",
                pool=record.pool,
                sandbox=record.id,
                state=record.state,
                pid=record.handle.get("pid"),
            )
            continue
        reason = "died" if record.state in ADOPTABLE else "interrupted"
        found = live.pop(record.id, None)
        handle = found[1].handle if found else record.handle
        await _close(record, reason, provider, handle, store, events)
        report.dropped.append(record.id)
    recorded = set(report.adopted) | set(report.dropped)
    for provider, sandbox in live.values():
        if sandbox.id not in recorded:
            await _terminate(provider, sandbox.id, sandbox.handle)
            await events.publish(
                "sandbox.terminated",
                pool=sandbox.pool,
                sandbox=sandbox.id,
                reason="orphan",
                state="unrecorded",
            )
            report.orphans.append(sandbox.id)
    for provider in providers.values():
        await provider.cleanup_leftovers(keep=set(report.adopted))
    log.info(
        "adoption done",
        extra={
            "adopted": len(report.adopted),
            "dropped": len(report.dropped),
            "orphans": len(report.orphans),
        },
    )
    return report


async def _close(
    record: SandboxRecord,
    reason: str,
    provider: Provider | None,
    handle: dict[str, Any],
    store: SandboxStore,
    events: EventPublisher,
) -> None:
    if provider is not None:
        await _terminate(provider, record.id, handle)
    await store.remove(record)
    await events.publish(
        "sandbox.terminated", pool=record.pool, sandbox=record.id, reason=reason, state=record.state
    )


async def _terminate(provider: Provider, sandbox_id: str, handle: dict[str, Any]) -> None:
    """Best effort at start: what a failing provider keeps, the janitor finds later."""
    try:
        await provider.terminate(sandbox_id, handle)
    except Exception as exc:
        log.warning(
            "terminate at adoption failed", extra={"sandbox": sandbox_id, "error": str(exc)}
        )
