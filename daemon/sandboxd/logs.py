"""JSON logs with stable keys, and scrubbing of secrets from anything logged."""

import logging
import sys
from urllib.parse import urlsplit, urlunsplit

from pythonjsonlogger.json import JsonFormatter

REDACTED = "***"
_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Any registered value is replaced by *** wherever it would appear in a log line."""
    if value and len(value) >= 3:
        _secrets.add(value)


def redact_url(url: str) -> str:
    """The URL with its password (if any) replaced, safe to log or show."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    netloc = f"{user}:{REDACTED}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def scrub(text: str) -> str:
    for secret in _secrets:
        text = text.replace(secret, REDACTED)
    return text


class _ScrubbingJsonFormatter(JsonFormatter):
    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


def setup_logging(level: str = "INFO") -> None:
    """One JSON object per line on stdout (journald): time, level, logger, message, extras."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        _ScrubbingJsonFormatter(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            datefmt="%Y-%m-%dT%H:%M:%S%z",
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
