"""Writing files so that a power cut leaves the old version or the new one, never half.

The recipe (POSIX): write a temporary file in the same folder, fsync it, rename it over the
target, fsync the folder so the rename itself is on disk. Used by everything on the device
that must survive a crash (provisioning, calibration) and by the clinic's gateway.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

#: Every temporary file of ``write_atomic`` ends so.
TEMP_SUFFIX = ".tmp"


class StateFileError(ValueError):
    """A state file that is there but cannot be used (the message names the file)."""

    def __init__(self, message: str, *, malformed: bool) -> None:
        super().__init__(message)
        #: Readable, but not what it should hold (as opposed to unreadable).
        self.malformed = malformed


def read_state(path: Path, parse: Callable[[Any], T]) -> T | None:
    """A JSON state file (as ``write_atomic`` leaves it) made into what ``parse`` builds
    from its JSON; None when there is no such file yet. StateFileError, naming the file,
    when it cannot be read, is not JSON, or ``parse`` refuses it (KeyError, TypeError or
    ValueError)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as err:
        raise StateFileError(f"{path}: cannot read: {err.strerror}", malformed=False) from None
    try:
        return parse(json.loads(text))
    except (KeyError, TypeError, ValueError) as err:
        raise StateFileError(f"{path}: malformed ({err})", malformed=True) from None


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path, mode: int = 0o750) -> None:
    """``mkdir -p`` where every folder it creates gets ``mode`` (``Path.mkdir`` gives the
    parents it creates the default mode, usually 0755: readable by everyone). The umask
    may make them stricter still."""
    missing: list[Path] = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=mode)
        except FileExistsError:
            if not folder.is_dir():
                raise
            # another process made it meanwhile


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, durable: bool = True,
                 sync_dir: bool | None = None) -> int:
    """Replace ``path`` with ``data`` atomically; ``mode`` applies from the first byte, so
    the file is never readable by others, not even for a moment. ``durable=False`` skips
    the fsyncs for files that are worthless after a power cut anyway; ``sync_dir=False``
    leaves the folder's fsync to the caller, who may make several files durable with one.
    Returns the new file's inode (taken before it is in place: a later ``stat`` of ``path``
    with the same inode is this very file, not one that replaced it meanwhile).

    The temporary file is ``.<name>.<random>.tmp`` (the random part has no dot), so what a
    crash left behind is recognisable by name, and told apart from other files' leftovers."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        os.fchmod(fd, mode)
        inode = os.fstat(fd).st_ino
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable if sync_dir is None else sync_dir:
        fsync_dir(path.parent)
    return inode
