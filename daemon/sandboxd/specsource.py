"""The daemon's view of the desired state: which revision is in force, and why."""

import logging

from sandboxd.config import Config
from sandboxd.events import EventPublisher
from sandboxd.spec import SpecDocument, SpecError, check_against_config, diff_specs, parse_document
from sandboxd.specstore import SpecStore, stored_revision

log = logging.getLogger(__name__)


class SpecSource:
    """Validates what operators write; an invalid spec never replaces the one in force."""

    def __init__(self, store: SpecStore, events: EventPublisher, config: Config):
        self._store = store
        self._events = events
        self._config = config
        self._last_raw: str | None = None
        self.in_force: SpecDocument | None = None

    @property
    def revision(self) -> int:
        return self.in_force.revision if self.in_force else 0

    async def refresh(self) -> SpecDocument | None:
        """Look at `<prefix>:spec`; put it in force if it changed and is valid."""
        raw = await self._store.raw()
        if raw is None or raw == self._last_raw:
            return self.in_force
        self._last_raw = raw
        try:
            doc = self._validate(raw)
        except SpecError as exc:
            await self._reject(raw, exc)
            if self.in_force is None:
                await self._fall_back_to_history()
            return self.in_force
        await self._put_in_force(doc)
        return self.in_force

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
