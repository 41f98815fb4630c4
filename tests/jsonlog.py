"""Reading a JSON event log that other processes are writing (the service's log_file)."""

from __future__ import annotations

import json
from pathlib import Path


def read_events(log: Path, name: str, **match: object) -> list[dict]:
    """The events named ``name`` (with these field values) logged so far, oldest first."""
    if not log.exists():
        return []
    found = []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line being written by another process right now
        if event.get("event") == name and all(event.get(k) == v for k, v in match.items()):
            found.append(event)
    return found
