"""Remote commands from the clinic's gateway: validated, executed, always answered.

A command is a JSON object ``{"id": "...", "command": "<name>", "args": {...}}`` on the
device's command topic (docs/protocol.md). Every command gets exactly one answer,
``{"id", "ok": true, "result": {...}}`` or ``{"id", "ok": false, "error": {"code",
"message"}}``; a malformed or unknown command is answered with a clear error and the agent
carries on. Validation is pydantic's, one model per command, unknown fields refused, and
numbers must be finite (a NaN threshold would pass every check). Every payload is hostile
until parsed: it is read by the protocol's own bounded JSON reader (size, nesting, no NaN,
no huge integers, no duplicate keys).

On a device, commands are signed by the clinic (``signing``, docs/protocol.md §11, §13):
the agent's ``CommandGuard`` checks the signature, the device id, the expiry and the
sequence before anything is parsed further, and refuses with ``unauthenticated``,
``wrong_device``, ``expired`` or ``replayed``. Unsigned commands pass only in development
mode without a gateway key.
"""

from __future__ import annotations

import base64
import binascii
import logging
import traceback
from collections.abc import Callable
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dermascope_wire.logs import log_event
from dermascope_wire.protocol import ProtocolError, load_json
from dermascope_wire.signing import CommandGuard, CommandRefused
from device_agent.session import SessionError

log = logging.getLogger(__name__)
MAX_COMMAND_BYTES = 16 * 1024


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class OpenCase(_Args):
    case_token: str
    anatomic_site: str | None = None
    timeout_s: Annotated[float, Field(gt=0, le=7 * 24 * 3600)] | None = None


class NoArgs(_Args):
    pass


class SetIllumination(_Args):
    mode: Literal["polarised", "non_polarised", "pair"]
    brightness: Annotated[float, Field(ge=0.05, le=1.0)] | None = None


class SetSettings(_Args):
    """Only what is safe to change remotely, and only until the next restart: the device's
    config file stays the technician's."""

    quality: dict[str, float] | None = None
    override_window: Annotated[float, Field(gt=0, le=120)] | None = None


ARGS: dict[str, type[_Args]] = {
    "open_case": OpenCase,
    "close_case": NoArgs,
    "set_illumination": SetIllumination,
    "set_settings": SetSettings,
    "self_test": NoArgs,
    "status": NoArgs,
    "resend_pending": NoArgs,
}


class CommandTarget(Protocol):
    """What the agent offers to commands (each returns a JSON-able result)."""

    def open_case(self, args: OpenCase) -> dict[str, Any]: ...
    def close_case(self, args: NoArgs) -> dict[str, Any]: ...
    def set_illumination(self, args: SetIllumination) -> dict[str, Any]: ...
    def set_settings(self, args: SetSettings) -> dict[str, Any]: ...
    def self_test(self, args: NoArgs) -> dict[str, Any]: ...
    def status(self, args: NoArgs) -> dict[str, Any]: ...
    def resend_pending(self, args: NoArgs) -> dict[str, Any]: ...


class CommandError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _error(request_id: str | None, code: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message}}


def parse(payload: bytes, guard: CommandGuard | None = None
          ) -> tuple[str | None, str, _Args]:
    """(request id, command name, validated args); CommandError for anything malformed or,
    with a ``guard``, not authentic (None: the caller vouches for the payload)."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError("too_large", f"command is {len(payload)} bytes; at most "
                           f"{MAX_COMMAND_BYTES}")
    if guard is not None:
        try:
            request, _signed = guard.open(payload)
        except CommandRefused as err:
            raise CommandError(err.code, str(err)) from None
        return _validate(request)
    try:
        request = load_json(payload, "command")
    except ProtocolError as err:
        raise CommandError("bad_json", f"not a JSON object: {err.detail}") from None
    return _validate(request)


def _validate(request: dict[str, Any]) -> tuple[str | None, str, _Args]:
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise CommandError("bad_request", "id must be a string")
    name = request.get("command")
    if name not in ARGS:
        raise CommandError("unknown_command", f"unknown command {name!r}; expected one of "
                           f"{', '.join(ARGS)}")
    extra = set(request) - {"id", "command", "args"}
    if extra:
        raise CommandError("bad_request", f"unknown field(s) {', '.join(sorted(extra))}")
    try:
        args = ARGS[name].model_validate(request.get("args") or {})
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'args'}: {e['msg']}"
                             for e in err.errors())
        raise CommandError("invalid_args", f"{name}: {problems}") from None
    return request_id, name, args


def _request_id(payload: bytes) -> str | None:
    """Best effort: the id of a refused command, signed or not, so that its answer pairs
    with the request over MQTT 3.1.1 too (nothing else of it is used)."""
    try:
        obj = load_json(payload, "command")
        if isinstance(obj.get("body"), str):
            obj = load_json(base64.b64decode(obj["body"], validate=True), "command")
    except (ProtocolError, binascii.Error, ValueError):
        return None
    request_id = obj.get("id")
    return request_id if isinstance(request_id, str) and len(request_id) <= 128 else None


def execute(payload: bytes, target: CommandTarget,
            guard: CommandGuard | None = None) -> dict[str, Any]:
    """Parse, run and answer one command. Never raises: a bad or unauthentic command is
    refused, and a command that fails inside the agent is answered ``internal_error`` and
    logged with its traceback (a bug behind one command must not take the device down)."""
    request_id: str | None = None
    name = "?"
    try:
        request_id, name, args = parse(payload, guard)
        handler: Callable[[Any], dict[str, Any]] = getattr(target, name)
        result = handler(args)
    except CommandError as err:
        request_id = request_id or _request_id(payload)
        log_event(log, "command.refused", logging.WARNING, request_id=request_id,
                  code=err.code, error=str(err))
        return _error(request_id, err.code, str(err))
    except SessionError as err:
        log_event(log, "command.refused", logging.WARNING, request_id=request_id,
                  code="invalid_args", error=str(err))
        return _error(request_id, "invalid_args", str(err))
    except Exception as err:  # noqa: BLE001 - the commands' supervisor, logs the traceback
        log_event(log, "command.failed", logging.ERROR, request_id=request_id, command=name,
                  error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        return _error(request_id, "internal_error", f"{name} failed: {type(err).__name__}")
    log_event(log, "command.done", request_id=request_id, command=name)
    return {"id": request_id, "ok": True, "result": result}
