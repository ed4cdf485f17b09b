"""Logging: one JSON object per line (or a console line), with the call bound.

`bind_call()` stores the call's identifiers in a context variable, so every
line logged by the call's tasks (and the Live session's, which inherit the
context) carries `call_sid` and `stream_sid` without passing them around.

Secrets are kept out at the source (nothing logs a token or a key), and the
formatters also redact, as a backstop, every value given to `register_secret()`
and anything shaped like a stream token: a library that logs its request
headers at DEBUG (websockets does) must not print the API key.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from typing import Any

_call: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "gateway_call", default=None
)

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

#: Library loggers kept quiet whatever LOG_LEVEL says: per-request or per-frame noise,
#: and websockets logs every request header (the API key among them) at DEBUG.
LIBRARY_LEVELS: dict[str, int] = {
    "aiohttp.access": logging.WARNING,
    "websockets": logging.WARNING,
    "google_genai": logging.WARNING,
}

REDACTED = "[redacted]"
_secrets: set[str] = set()
#: A stream token as gateway.twilio.webhooks issues it: base64url(payload) "." base64url(HMAC).
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])")


def register_secret(value: str) -> None:
    """Never print `value` (an auth token, an API key) in a log line, whoever logs it."""
    if len(value) >= 4:
        _secrets.add(value)


def redact(text: str) -> str:
    """`text` with registered secrets and stream tokens replaced by [redacted]."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _TOKEN_SHAPE.sub(REDACTED, text)


def bind_call(**fields: str) -> None:
    """Attach identifiers (call_sid, stream_sid) to every log line of this context."""
    current = dict(_call.get() or {})
    current.update(fields)
    _call.set(current)


class _CallFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        bound = _call.get()
        if bound:
            for key, value in bound.items():
                if not hasattr(record, key):
                    setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """A JSON object per record: time, level, logger, message, bound fields, extras."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                payload[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            payload["error"] = record.exc_info[0].__name__
        return redact(json.dumps(payload, default=str))


class ConsoleFormatter(logging.Formatter):
    """A readable line for a person at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={v}"
            for k, v in record.__dict__.items()
            if k not in _STANDARD and not k.startswith("_")
        )
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        return redact(f"{line}  {extras}" if extras else line)


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Route the root logger to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    handler.addFilter(_CallFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet_libraries()


def quiet_libraries() -> None:
    """Apply LIBRARY_LEVELS (done by configure_logging; tests call it to log the same)."""
    for name, level in LIBRARY_LEVELS.items():
        logging.getLogger(name).setLevel(level)


def call_filter() -> logging.Filter:
    """The filter that adds bound call fields; for handlers installed by tests."""
    return _CallFilter()
