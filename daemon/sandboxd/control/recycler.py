"""Released sandboxes: terminated, or with `reuse: reset` wiped and made ready again."""

import asyncio
import logging
import time

from redis.exceptions import RedisError

from sandboxd.control.terminator import Terminator
from sandboxd.providers import Provider
from sandboxd.spec import PoolSpec
from sandboxd.store.events import EventPublisher
from sandboxd.store.records import SandboxRecord, SandboxStore

log = logging.getLogger(__name__)
ERROR_CHARS = 2000  # of a failed reset's reason in its event (providers bound theirs too)


class Recycler:
    def __init__(
        self,
        *,
        store: SandboxStore,
        providers: dict[str, Provider],
        events: EventPublisher,
        terminator: Terminator,
        reset_timeout_s: float,
    ):
        self._store = store
        self._providers = providers
        self._events = events
        self._terminator = terminator
        self._reset_timeout_s = reset_timeout_s
        self.running: set[str] = set()  # ids being recycled by this process right now

    async def recycle(self, record: SandboxRecord, spec: PoolSpec | None) -> None:
        """Called once per released sandbox, which the caller has put in `running` before
        starting this task; safe against a concurrent terminate. Errors are logged, not
        raised: what is left half-done is closed by a later reconcile pass."""
        try:
            if spec is None or spec.reuse == "never":
                await self._terminator.terminate(record, "released", "released")
            elif await self._store.transition(record, "resetting", "released"):
                await self._reset(record, spec)
        except RedisError as exc:  # Redis away: a later pass finds it released again
            log.warning("recycling interrupted: %s", exc, extra={"sandbox": record.id})
        except Exception:
            log.exception("recycling failed", extra={"sandbox": record.id})
        finally:
            self.running.discard(record.id)

    async def _reset(self, record: SandboxRecord, spec: PoolSpec) -> None:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._reset_timeout_s):
                fresh = await self._providers[record.provider].reset(record.id, record.handle, spec)
        except Exception as exc:  # any failure means the sandbox cannot be trusted again
            error = _bounded(str(exc) or type(exc).__name__)
            log.warning("reset failed", extra={"sandbox": record.id, "error": error})
            await self._terminator.terminate(record, "reset_failed", "resetting", error=error)
            return
        ready = self._events.build(
            "sandbox.reset",
            pool=record.pool,
            sandbox=record.id,
            reset_ms=round((time.perf_counter() - started) * 1000, 1),
            uses=record.uses,
        )
        await self._store.mark_ready(
            record,
            fresh or record.handle,
            ready,
            from_state="resetting",
            maxlen=self._events.maxlen,
        )


def _bounded(error: str) -> str:
    """At most ERROR_CHARS: its start (what failed) and its end (the last words of stderr)."""
    if len(error) <= ERROR_CHARS:
        return error
    head = ERROR_CHARS // 4
    return error[:head] + " … " + error[-(ERROR_CHARS - head - 3) :]
