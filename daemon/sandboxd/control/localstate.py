"""The node's own copy of what Redis must not lose: the spec in force and the records of the
sandboxes this daemon runs (claims included: claimant, claim id, the claim token's hash,
lease deadline).

Redis may lose its data (FLUSHDB, a restart without persistence, a failover to an empty
replica). The sandboxes do not: they are processes on this host (or the provider's). So the
daemon keeps this journal in a root-only directory (`state_dir`, 0700; files 0600, written
atomically) and, when it finds Redis without the spec or without records of sandboxes that
still run, writes them back (`state.restored`) instead of draining the pools or reaping the
sandboxes as leaks. Only this daemon writes and reads these files: nothing in them comes
from a place a tenant or a Redis writer controls, except the records themselves, which are
validated as any record read from Redis is.
"""

import contextlib
import hashlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
MAX_FILE_BYTES = 256 * 1024 * 1024


def fields_json(fields: dict[str, str]) -> str:
    """A record's fields as `records.json` holds them (keys sorted, no spaces)."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


class LocalState:
    """`spec.json` ({revision, document}) and `records.json` ({id: record fields})."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._written: dict[str, str] = {}  # file -> digest of what is on disk
        self._spec_revision: int | None = None

    def _ensure(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(self.directory)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise OSError(f"{self.directory} is not a directory of the daemon's user")
        if stat.S_IMODE(info.st_mode) != 0o700:
            os.chmod(self.directory, 0o700)

    def _write(self, name: str, data: Any, *, always: bool = False) -> bool:
        """Write `data` as JSON unless the file already holds exactly that (as far as this
        object wrote it; `always`: another process may write it too); True if written."""
        return self._write_parts(
            name, [json.dumps(data, sort_keys=True, separators=(",", ":"))], always=always
        )

    def _write_parts(self, name: str, parts: list[str], *, always: bool = False) -> bool:
        """Write the concatenation of `parts` (see `_write`)."""
        hashing = hashlib.sha256()
        for part in parts:
            hashing.update(part.encode())
        digest = hashing.hexdigest()
        if self._written.get(name) == digest and not always:
            return False
        self._ensure()
        path = self.directory / name
        tmp = path.with_name(f".{name}.tmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as out:
            out.writelines(parts)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        self._written[name] = digest
        return True

    def _read(self, name: str) -> Any:
        path = self.directory / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if (
                not stat.S_ISREG(info.st_mode)
                or info.st_uid != os.geteuid()
                or info.st_size > MAX_FILE_BYTES
            ):
                log.warning("ignoring %s: not a private file of the daemon", path)
                return None
            raw = handle.read()
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            log.warning("ignoring %s: not valid JSON", path)
            return None
        self._written[name] = hashlib.sha256(
            json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
        return data

    def save_spec(self, revision: int, document: str) -> bool:
        """Written once per revision (a document of many pools is megabytes)."""
        if self._spec_revision == revision:
            return False
        written = self._write("spec.json", {"revision": int(revision), "document": document})
        self._spec_revision = revision
        return written

    def load_spec(self) -> tuple[int, str] | None:
        data = self._read("spec.json")
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("revision"), int)
            or not isinstance(data.get("document"), str)
        ):
            return None
        self._spec_revision = data["revision"]
        return data["revision"], data["document"]

    def save_holder(self, token: str) -> None:
        """The token of the daemon that acts on this node's sandboxes now (`holder.json`):
        written by every daemon that takes the node's lease, read by one that lost touch
        with Redis before it acts on a sandbox (`daemon.Custody`)."""
        self._write("holder.json", {"token": token}, always=True)

    def holder(self) -> str | None:
        data = self._read("holder.json")
        token = data.get("token") if isinstance(data, dict) else None
        return token if isinstance(token, str) else None

    def save_outbox(self, entries: list[dict[str, Any]]) -> None:
        """What this node changed while Redis could not be reached, in order
        (`outbox.json`; see control/outbox.py)."""
        self._write("outbox.json", entries, always=True)

    def load_outbox(self) -> list[dict[str, Any]]:
        data = self._read("outbox.json")
        if not isinstance(data, list):
            return []
        return [e for e in data if isinstance(e, dict)]

    def save_records(self, records: dict[str, str]) -> bool:
        """The node's records, by id, as the fields of their Redis hashes; each given as the
        JSON of its fields (`fields_json`): the file is written from those parts, without
        building it whole in memory (10,000 records are ~15 MB)."""
        parts = ["{"]
        for i, sandbox_id in enumerate(sorted(records)):
            parts.append(f"{',' if i else ''}{json.dumps(sandbox_id)}:{records[sandbox_id]}")
        parts.append("}")
        return self._write_parts("records.json", parts)

    def load_records(self) -> dict[str, dict[str, str]]:
        data = self._read("records.json")
        if not isinstance(data, dict):
            return {}
        return {
            k: {str(f): str(v) for f, v in fields.items()}
            for k, fields in data.items()
            if isinstance(k, str) and isinstance(fields, dict)
        }
