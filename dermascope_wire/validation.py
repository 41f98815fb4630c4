"""Config errors a person can act on: pydantic's validation errors as one line each, naming
the field (``uplink.port``) and what was wrong. The device's and the gateway's configs both
report through here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def describe_validation_error(error: Any) -> str:
    """A pydantic ``ValidationError`` as ``field: problem (got value)``, joined by "; "."""
    lines = []
    for err in error.errors():
        where = ".".join(str(part) for part in err["loc"]) or "(top level)"
        got = err.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        message = err["msg"]
        if err["type"] == "value_error":
            # Our own validators' messages: without pydantic's prefix, and without the section
            # when the message already names its field in full.
            message = message.removeprefix("Value error, ")
            if not err["loc"] or message.startswith(f"{where}."):
                lines.append(message)
                continue
            got_text = ""
        lines.append(f"{where}: {message}{got_text}")
    return "; ".join(lines)


def one_or_more(value: object) -> object:
    """A config value that may be one path or a list of them, as a list (a ``mode="before"``
    field validator): keys during a rotation are listed, the rest of the time one is given."""
    return [value] if isinstance(value, str) or hasattr(value, "__fspath__") else value


def loads(load: Callable[[Path], object]) -> Callable[[Any], Any]:
    """A field validator: the key file(s) of the field (None, one path or a list) must load
    with ``load``, whose KeyFileError (a ValueError) names the file and what is wrong."""

    def check(value: Any) -> Any:
        for path in [] if value is None else value if isinstance(value, list) else [value]:
            load(path)
        return value

    return check
