"""Log output: readable lines, or one JSON object per line for log collectors.

Log calls pass what they are about as ``extra`` fields (``client``, ``peer``, ``collection``, ``code``):
the JSON format gives each its own key, the text format appends them as ``key=value``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Hashable
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


class OncePer:
    """Says yes at most once per ``seconds`` for each key: how "reported once a minute" is done.

    ``if self._refused_log(): log.warning(...)``: the first occurrence is logged at once, the others
    within the period are not.
    """

    __slots__ = ("_last", "_seconds")

    def __init__(self, seconds: float = 60.0) -> None:
        self._seconds = seconds
        self._last: dict[Hashable, float] = {}

    def __call__(self, key: Hashable = None) -> bool:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._seconds:
            return False
        if len(self._last) > 1000:  # keys are few (a reason, an error text): never let them grow unbounded
            self._last.clear()
        self._last[key] = now
        return True
