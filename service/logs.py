"""Server logging: plain text lines, or one JSON object per line for log shippers."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The attribute of a LogRecord that carries a request line's fields (logging's `extra`).
FIELDS_ATTRIBUTE = "featmap_fields"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and any request fields."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a single line of JSON."""
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
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
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Python's warnings print straight to stderr; through logging they stay one format.
    logging.captureWarnings(True)
