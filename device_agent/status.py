"""What the device is doing now: a small JSON file the running agent keeps up to date.

``device-agent status`` and ``device-agent doctor`` read it, so they can answer while the
service holds the camera and the pins. It carries figures and identifiers only, never
patient data. Written atomically (temp + rename): a reader never sees half a file. Not
fsynced: it is rewritten every second and worthless after a power cut.

On a full disk a new file cannot be made, and a status that stops changing would go on
saying "ready" while the device refuses captures. So the file is padded to whole blocks,
and when the rename route fails for lack of space it is overwritten in place, inside the
blocks it already has (one write of less than a page, which readers see whole).
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any

from dermascope_wire.durable import write_atomic

STATUS_FILE = "status.json"
#: A status file older than this means the agent is not running (it rewrites it every second).
STALE_AFTER = 10.0
#: The file's size: whole blocks, room for the status to grow while the disk is full.
_PADDED = 4096


def status_path(state_dir: Path) -> Path:
    return state_dir / STATUS_FILE


def write_status(path: Path, status: dict[str, Any]) -> None:
    text = json.dumps(status, sort_keys=True).encode()
    # JSON allows trailing white space: the padding is invisible to readers.
    data = text + b" " * (_PADDED - len(text)) if len(text) < _PADDED else text
    try:
        write_atomic(path, data, mode=0o644, durable=False)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT) or len(data) > _PADDED:
            raise
        _overwrite_in_place(path, data)


def _overwrite_in_place(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        if os.pwrite(fd, data, 0) != len(data):
            raise OSError(errno.ENOSPC, f"{path}: short write")
    finally:
        os.close(fd)


def read_status(path: Path) -> dict[str, Any] | None:
    """The last status the agent wrote, or None if there is none (or it is unreadable)."""
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def is_live(status: dict[str, Any] | None, now: float | None = None) -> bool:
    if not status or not isinstance(status.get("updated_at"), int | float):
        return False
    return (now or time.time()) - status["updated_at"] <= STALE_AFTER


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def describe(status: dict[str, Any] | None, now: float | None = None) -> list[str]:
    """Lines for a person."""
    now = now or time.time()
    if status is None:
        return ["agent     not running (no status yet: has it ever started?)"]
    if not is_live(status, now):
        lines = [f"agent     NOT RUNNING (last seen {_age(now - status['updated_at'])} ago)"]
    else:
        lines = [f"agent     running, version {status.get('version')}, "
                 f"device {status.get('device_id')}"]
    camera = status.get("camera", {})
    if camera.get("asleep"):
        state = "asleep (idle; a press wakes it)"
    elif camera.get("streaming"):
        state = f"streaming at {camera.get('fps', 0):.1f} fps"
    else:
        state = "NOT streaming"
    lines.append(f"camera    {camera.get('model')}, {state}")
    lines.append(f"light     {status.get('illumination')}; LED shows {status.get('signal')}")
    lines.append("case      " + ("open" if status.get("case_open") else "none (captures are "
                                                                          "kept unassigned)"))
    last = status.get("last_capture")
    if last:
        why = f" ({', '.join(last['reasons'])})" if last.get("reasons") else ""
        flag = ", overridden" if last.get("overridden") else ""
        lines.append(f"last      {last['verdict']}{why}{flag}, "
                     f"{_age(now - last['at'])} ago [{last['capture_id'][:8]}]")
    else:
        lines.append("last      no capture since start")
    outbox = status.get("outbox", {})
    oldest = outbox.get("oldest_created")
    lines.append(
        f"outbox    {outbox.get('depth', 0)} waiting "
        f"({outbox.get('used_bytes', 0) / 1e6:.1f} of {outbox.get('quota_bytes', 0) / 1e6:.0f} MB)"
        f", oldest {_age(now - oldest) if oldest else '-'}, "
        f"{outbox.get('quarantined', 0)} quarantined")
    lines.append("uplink    " + ("online" if status.get("uplink_online") else "OFFLINE"))
    return lines
