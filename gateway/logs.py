"""Logging: one JSON object per line (or a console line), with the call bound.

`bind_call()` stores the call's identifiers in a context variable, so every
line logged by the call's tasks (and the Live session's, which inherit the
context) carries `call_sid` and `stream_sid` without passing them around.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

_call: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "gateway_call", default=None
)

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


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
        return json.dumps(payload, default=str)


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
        return f"{line}  {extras}" if extras else line


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Route the root logger to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    handler.addFilter(_CallFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Access logs would be one line per webhook; keep them but quiet the per-frame noise.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("websockets").setLevel(logging.WARNING)
    logging.getLogger("google_genai").setLevel(logging.WARNING)


def call_filter() -> logging.Filter:
    """The filter that adds bound call fields; for handlers installed by tests."""
    return _CallFilter()
