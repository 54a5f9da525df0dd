"""JSON logs with stable keys, and scrubbing of secrets from anything logged."""

import logging
import sys
from urllib.parse import urlsplit, urlunsplit

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

REDACTED = "***"
_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Any registered value is replaced by *** wherever it would appear in a log line."""
    if value and len(value) >= 3:
        _secrets.add(value)


def redact_url(url: str) -> str:
    """The URL with its passwords (userinfo, `sentinel_password=`) replaced, safe to log or
    show. Works on URLs naming several hosts (redis+sentinel://h1:p1,h2:p2/...)."""
    parts = original = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        parts = parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:{REDACTED}@{hosts}")
    if "password=" in parts.query:
        query = "&".join(
            f"{k}={REDACTED}" if k.endswith("password") else f"{k}={v}"
            for k, _, v in (item.partition("=") for item in parts.query.split("&"))
        )
        parts = parts._replace(query=query)
    return url if parts == original else urlunsplit(parts)


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
            # uvicorn's terminal copy of its message (ANSI colour codes): not a key of ours
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
