"""Structured JSON log events.

Every event is one JSON object per line with a stable ``event`` name (DESIGN.md section 10)
and, for anything about a capture, its ``capture_id``. Patient data never goes into an
event: callers pass identifiers and figures only.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

# Field names that ``logging.LogRecord`` owns; an event field with one of these names would
# make ``logger.info(extra=...)`` raise, so they are renamed instead of lost.
_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event: ``{"event": event, **fields}``."""
    extra = {("f_" + k if k in _RESERVED else k): v for k, v in fields.items()}
    extra["event"] = event
    logger.log(level, event, extra=extra)


class EventName(logging.Filter):
    """Gives a library's log records (paho's) an ``event`` name, so every line of the JSON
    log has one, as the log's contract says."""

    def __init__(self, event: str) -> None:
        super().__init__()
        self.event = event

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "event"):
            record.event = self.event
        return True


def json_formatter() -> logging.Formatter:
    return JsonFormatter(
        "{asctime}{levelname}{name}{message}",
        style="{",
        rename_fields={"asctime": "ts", "levelname": "level", "name": "logger"},
        datefmt="%Y-%m-%dT%H:%M:%S%z",
        json_ensure_ascii=False,
    )


def add_json_handler(
    logger_name: str, stream: TextIO | None = None, path: Path | None = None
) -> logging.Handler:
    """Send the events of ``logger_name`` (and its children) as JSON lines to a stream or file."""
    handler: logging.Handler
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    else:
        handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(json_formatter())
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler
