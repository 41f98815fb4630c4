"""Reading a device's JSON state files (calibration, the camera's exposure lock): missing is
"none yet", anything else wrong is an error that names the file and says whether it could
not be read or holds the wrong thing."""

from __future__ import annotations

from pathlib import Path

import pytest

from dermascope_wire.durable import StateFileError, read_state, write_atomic


def _pair(data: object) -> tuple[int, int]:
    a, b = data["pair"]  # type: ignore[index]
    return int(a), int(b)


def test_a_state_file_reads_back_what_was_written(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    assert read_state(path, _pair) is None  # none yet
    inode = write_atomic(path, b'{"pair": [1, 2]}')
    assert read_state(path, _pair) == (1, 2)
    assert path.stat().st_ino == inode  # the file it wrote (the gateway's journal checks so)


@pytest.mark.parametrize(("content", "malformed", "says"), [
    (None, False, "cannot read"),  # a folder where the file should be
    (b"{not json", True, "malformed"),
    (b'{"other": 1}', True, "malformed ('pair')"),  # the parser's KeyError
    (b'{"pair": [1]}', True, "malformed"),  # its ValueError
    (b'{"pair": 3}', True, "malformed"),  # its TypeError
])
def test_a_bad_state_file_is_named_and_told_apart(tmp_path: Path, content: bytes | None,
                                                  malformed: bool, says: str) -> None:
    path = tmp_path / "state.json"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(StateFileError) as caught:
        read_state(path, _pair)
    assert str(path) in str(caught.value)
    assert says in str(caught.value)
    assert caught.value.malformed is malformed
