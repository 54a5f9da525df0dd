"""SIGHUP (`systemctl reload`): read the config file again and apply what can change live."""

import logging
import time
from pathlib import Path

from pydantic import ValidationError

from sandboxd.config import Config, load_config
from sandboxd.outputs import sdnotify
from sandboxd.store.events import EventPublisher

log = logging.getLogger(__name__)

# Read where they are used, so assigning them takes effect at the next use. The rest
# (Redis, key prefix, providers, health concurrency…) is wired in at start.
LIVE = frozenset(
    {
        "log_level",
        "reconcile_interval_s",
        "resync_interval_s",
        "heartbeat_interval_s",
        "max_concurrent_creates",
        "create_attempts",
        "create_timeout_s",
        "create_grace_s",
        "lease_check_interval_s",
        "health_report_interval_s",
        "agent_poll_interval_s",
        "agent_log_lines",
        "janitor_interval_s",
        "on_shutdown",
        "metrics_listen",
        "sample_interval_s",
        "alerts",
        "cost",
        "mqtt",
        "events",
        "event_stream_maxlen",
        "watchdog_hang_file",
    }
)


def apply_changes(running: Config, fresh: Config) -> tuple[list[str], list[str]]:
    """Assign changed live settings into `running`; (applied, needing a restart)."""
    applied, needs_restart = [], []
    for name in type(running).model_fields:
        if getattr(running, name) == getattr(fresh, name):
            continue
        if name in LIVE:
            setattr(running, name, getattr(fresh, name))
            applied.append(name)
        else:
            needs_restart.append(name)
    if "log_level" in applied:
        logging.getLogger().setLevel(running.log_level)
    return applied, needs_restart


async def reload(running: Config, path: Path | None, events: EventPublisher) -> list[str]:
    """Returns the live settings that changed (empty when the file was invalid)."""
    sdnotify.notify(
        f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
    )
    try:
        fresh = load_config(path)
    except (ValidationError, OSError, ValueError) as exc:
        log.error("reload failed, settings unchanged: %s", exc)
        await events.publish("daemon.reload_failed", error=str(exc)[:2000])
        sdnotify.notify("READY=1\nSTATUS=reload failed: settings unchanged")
        return []
    applied, needs_restart = apply_changes(running, fresh)
    log.info("reloaded", extra={"applied": applied, "needs_restart": needs_restart})
    if needs_restart:
        log.warning("changed settings in force only after a restart: %s", ", ".join(needs_restart))
    await events.publish("daemon.reloaded", applied=applied, needs_restart=needs_restart)
    sdnotify.notify("READY=1\nSTATUS=reloaded")
    return applied
