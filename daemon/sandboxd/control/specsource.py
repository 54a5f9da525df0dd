"""The daemon's view of the desired state: which revision is in force, and why."""

import logging

from redis.exceptions import ResponseError

from sandboxd.config import Config
from sandboxd.spec import SpecDocument, SpecError, check_against_config, diff_specs, parse_document
from sandboxd.store.events import EventPublisher
from sandboxd.store.specs import SpecStore, stored_revision

log = logging.getLogger(__name__)


class SpecSource:
    """Validates what operators write; an invalid spec never replaces the one in force."""

    def __init__(self, store: SpecStore, events: EventPublisher, config: Config):
        self._store = store
        self._events = events
        self._config = config
        self._last_raw: str | None = None
        self._wrong_type: str | None = None  # reported once while `<prefix>:spec` is one
        self._floor: int | None = None  # at start: the revision a previous daemon had in force
        self.in_force: SpecDocument | None = None

    @property
    def revision(self) -> int:
        return self.in_force.revision if self.in_force else 0

    async def refresh(self) -> SpecDocument | None:
        """Look at `<prefix>:spec`; put it in force if it changed, is valid and is newer
        than the revision in force (revisions only move forward)."""
        try:
            raw = await self._store.raw()
        except ResponseError as exc:
            if "WRONGTYPE" not in str(exc):
                raise
            await self._report_wrong_type()
            return self.in_force
        self._wrong_type = None
        if raw is None or raw == self._last_raw:
            return self.in_force
        self._last_raw = raw
        try:
            doc = self._validate(raw)
            if self._floor is None:
                active = await self._store.active()
                self._floor = active.revision if active else 0
            if self._same_as_in_force(doc):
                return self.in_force
            if not await self._redis_forgot_it():
                self._check_forward(doc)
        except SpecError as exc:
            await self._reject(raw, exc)
            if self.in_force is None:
                await self._fall_back_to_history()
            return self.in_force
        await self._put_in_force(doc)
        return self.in_force

    def _same_as_in_force(self, doc: SpecDocument) -> bool:
        """The revision in force written again (e.g. put back after Redis lost it)."""
        current = self.in_force
        return current is not None and (current.revision, current.pools) == (
            doc.revision,
            doc.pools,
        )

    async def _redis_forgot_it(self) -> bool:
        """Redis lost the spec in force (`<prefix>:spec:active` is gone: a FLUSHDB, a
        restart without persistence), so `sandboxd apply` numbered from scratch: what it
        wrote is the operator's intent, not an old spec written back."""
        return self.in_force is not None and not await self._store.has_active()

    def _check_forward(self, doc: SpecDocument) -> None:
        """A revision below the one in force (or, at start, below the one the previous
        daemon had in force) is an old spec written back by hand: refused."""
        current = self.in_force.revision if self.in_force else 0
        if doc.revision <= current or doc.revision < (self._floor or 0):
            newest = max(current, self._floor or 0)
            raise SpecError(
                [
                    f"revision: {doc.revision} is older than revision {newest} in force "
                    "(revisions only move forward: apply it with `sandboxd apply`)"
                ]
            )

    async def _report_wrong_type(self) -> None:
        kind = await self._store.raw_type()
        if kind == self._wrong_type:
            return  # reported already; the spec in force stays until the key is fixed
        self._wrong_type = kind
        key = self._store.key
        reason = f"holds a {kind}, not a string"
        log.error(
            "%s %s: keeping spec revision %s in force",
            key,
            reason,
            self.revision,
            extra={"key": key, "type": kind},
        )
        await self._events.publish(
            "state.corrupt",
            key=key,
            field="",
            reason=reason,
            key_type=kind,
            action=f"spec revision {self.revision} stays in force",
        )

    def _validate(self, raw: str) -> SpecDocument:
        doc = parse_document(raw)
        check_against_config(doc, self._config)
        return doc

    async def _reject(self, raw: str, exc: SpecError) -> None:
        log.error(
            "spec rejected, keeping revision %s in force",
            self.revision,
            extra={"errors": exc.problems, "revision_in_force": self.revision},
        )
        await self._events.publish(
            "spec.rejected",
            revision=stored_revision(raw) or None,
            errors=exc.problems,
            revision_in_force=self.revision,
        )

    async def _fall_back_to_history(self) -> None:
        """At start with an invalid spec: the newest valid accepted revision stays in force."""
        for doc in await self._store.history():
            try:
                check_against_config(doc, self._config)
            except SpecError:
                continue
            log.warning("falling back to spec revision %s from the history", doc.revision)
            await self._put_in_force(doc)
            return

    async def _put_in_force(self, doc: SpecDocument) -> None:
        changes = diff_specs(self.in_force, doc)
        self.in_force = doc
        await self._store.set_active(doc)
        log.info(
            "spec revision %s in force",
            doc.revision,
            extra={"revision": doc.revision, "changes": changes},
        )
        await self._events.publish(
            "spec.applied",
            revision=doc.revision,
            pools=[p.name for p in doc.pools],
            changes=changes,
        )
