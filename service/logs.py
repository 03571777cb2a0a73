"""Server logging: plain text lines, or one JSON object per line for log shippers."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Literal

from ..contract.errors import shorten

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The attribute of a LogRecord that carries a request line's fields (logging's `extra`).
FIELDS_ATTRIBUTE = "featmap_fields"
# A message quotes what callers sent (ids, names, error messages): capped, in both formats.
MAX_LOGGED_MESSAGE_CHARS = 4096
# What could end a text log line early, or rewrite it on a terminal: C0 controls (newline,
# carriage return, escape...), DEL, C1 controls, and Unicode's line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def escape_controls(text: str) -> str:
    """`text` with control characters escaped as JSON writes them (`\\n`, `\\u001b`), so
    that nothing a caller sent can start a log line of its own."""
    return _CONTROL.sub(
        lambda match: _SHORT_ESCAPES.get(match.group(), f"\\u{ord(match.group()):04x}"), text
    )


def logged_message(record: logging.LogRecord) -> str:
    """A record's message as a log line carries it: capped at MAX_LOGGED_MESSAGE_CHARS."""
    return shorten(record.getMessage(), MAX_LOGGED_MESSAGE_CHARS)


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, one line per message: its control characters escaped, its length capped.

    A traceback (exc_info) still follows on lines of its own, as Python writes it.
    """

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The line, with the message made safe (format() calls this after getMessage)."""
        record.message = escape_controls(logged_message(record))
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and any request fields."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a single line of JSON."""
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": logged_message(record),
        }
        entry.update(getattr(record, FIELDS_ATTRIBUTE, None) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: a field of an unexpected type must not lose the line.
        return json.dumps(entry, default=str)


def configure_logging(level: str, log_format: Literal["text", "json"] = "text") -> None:
    """Send every logger's records to stderr, formatted as `log_format` asks."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Python's warnings print straight to stderr; through logging they stay one format.
    logging.captureWarnings(True)
