"""Log output: readable lines, or one JSON object per line for log collectors.

Log calls pass what they are about as ``extra`` fields (``client``, ``peer``, ``collection``, ``code``):
the JSON format gives each its own key, the text format appends them as ``key=value``.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import orjson

FIELDS = ("client", "peer", "collection", "code", "reason", "subject")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            if (value := record.__dict__.get(name)) is not None:
                entry[name] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(f"{n}={record.__dict__[n]}" for n in FIELDS if record.__dict__.get(n) is not None)
        return f"{line} [{extra}]" if extra else line


def configure(level: str, fmt: str) -> None:
    """Log to stderr at ``level`` in format ``text`` or ``json``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
