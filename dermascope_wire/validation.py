"""Config errors a person can act on: pydantic's validation errors as one line each, naming
the field (``uplink.port``) and what was wrong. The device's and the gateway's configs both
report through here."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """The configuration is missing, unreadable or invalid; the message names the field."""


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


def validated(model: Any, data: dict, source: str) -> Any:
    """``model.model_validate(data)`` (a pydantic model), or ConfigError naming each field."""
    from pydantic import ValidationError  # both configs use pydantic; the wire itself not

    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {describe_validation_error(err)}") from None


def read_toml(path: Path) -> dict:
    """A config file's TOML as a dict; ConfigError saying why it cannot be read."""
    try:
        text = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config: {err.strerror}") from None
    try:
        return tomllib.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None


def mutual_tls_missing(section: str, files: dict[str, object]) -> list[str]:
    """The names of the unset TLS files (all or none); ValueError if only some are set."""
    missing = [name for name, path in files.items() if path is None]
    if missing and len(missing) < len(files):
        *first, last = files
        raise ValueError(f"{section}: mutual TLS needs {', '.join(first)} and {last}; "
                         f"missing {', '.join(missing)}")
    return missing
