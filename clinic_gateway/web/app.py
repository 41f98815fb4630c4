"""The GP's page and the EHR's JSON API, one FastAPI application (docs/gateway.md, "The GP's
page and the API").

Pages are rendered here (Jinja2, autoescaped) with a small inline script that asks the API
for the devices and a case's captures every second or two: no front-end build, nothing
loaded from anywhere but this server. The API is described at ``/openapi.json`` (FastAPI's
``/docs`` page would load its scripts from the internet: it is switched off).

Who: staff sign in with a password (``web.users``) and get a session cookie; the EHR sends
``Authorization: Bearer <token>`` (``web.api_tokens``). Every form carries the session's
CSRF token, and so does every state-changing API call made with the cookie
(``X-CSRF-Token``). The case token travels only in request bodies: it is never in a URL,
never logged, never shown again (pages and answers name a case by its reference).
"""

# No "from __future__ import annotations": FastAPI reads the routes' annotations, which
# name dependencies local to create_app.
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import jinja2
from fastapi import Depends, FastAPI, Form, Request
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from clinic_gateway.audit import AuditError
from clinic_gateway.web.auth import USER_NAME, Session, Sessions, Staff, Throttle, csrf_ok
from clinic_gateway.web.captures import CaptureView
from clinic_gateway.web.desk import ANATOMIC_SITES, CaseView, Desk, DeskError, DeviceView
from dermascope_wire.logs import log_event

log = logging.getLogger("clinic_gateway.web")

COOKIE = "gp_session"
_CAPTURE_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True, undefined=jinja2.StrictUndefined)


# ------------------------------------------------------------------------------ API models

class OpenCase(BaseModel):
    """Open a case on a device. ``case_token``: the clinic's opaque case reference or the
    referral id (1-128 of ``A-Z a-z 0-9 . _ : -``; never a name or CPR number)."""

    case_token: str
    anatomic_site: str | None = Field(None, description="ISIC anatom_site_general: "
                                      + ", ".join(ANATOMIC_SITES))


class CaseOut(BaseModel):
    ref: str = Field(description="the case's keyed hash, as in the audit log (never the token)")
    open: bool
    opened_at: str
    ends_at: str | None
    anatomic_site: str | None


class DeviceOut(BaseModel):
    device_id: str
    online: bool
    state: str = Field(description="online, offline, or unknown (no status seen yet)")
    outbox_depth: int | None
    last_seen: str | None = Field(description="the time of the device's latest status")
    calibrated_at: str | None = Field(description="null: the device does not say")
    calibration_age_days: float | None
    software_version: str | None
    case: CaseOut | None = Field(description="the case open on the device, if any")


class DevicesOut(BaseModel):
    devices: list[DeviceOut]


class CaptureOut(BaseModel):
    capture_id: str
    captured_at: str | None
    kind: str = Field(description="capture or self_test")
    verdict: str | None = Field(description="accept or retake")
    reasons: list[str]
    light_mode: str | None = Field(description="polarised or non_polarised")
    pair: dict[str, Any] | None = Field(description="pair_id, index (1 or 2), of")
    overridden: bool = Field(description="a retake the clinician kept deliberately")
    thumbnail_url: str


class CaseCapturesOut(BaseModel):
    device_id: str
    case: CaseOut | None = Field(description="the open case, or the last one")
    captures: list[CaptureOut]


class Done(BaseModel):
    device_id: str
    case: CaseOut | None


def _device_out(d: DeviceView) -> DeviceOut:
    return DeviceOut(**{**d.__dict__, "case": _case_out(d.case)})


def _case_out(c: CaseView | None) -> CaseOut | None:
    return CaseOut(**c.__dict__) if c is not None else None


def _capture_out(device_id: str, c: CaptureView) -> CaptureOut:
    return CaptureOut(**c.__dict__, thumbnail_url=f"/api/v1/devices/{device_id}/captures/"
                                                  f"{c.capture_id}/thumbnail")


# ---------------------------------------------------------------------------- the app

@dataclass(frozen=True)
class Principal:
    """Who asks: a staff member's name, or ``api:<client>`` for a bearer token."""

    name: str
    via: str  # "session" or "token"


class NotSignedIn(Exception):
    pass


def create_app(desk: Desk, staff: Staff, *, session_idle: float = 3600.0,
               secure_cookie: bool = False) -> FastAPI:
    """The application; ``secure_cookie``: the page is served over HTTPS."""
    sessions = Sessions(session_idle)
    throttle = Throttle()
    app = FastAPI(title="Dermascope gateway: the GP's page and the API", version="1",
                  docs_url=None, redoc_url=None,
                  description=__doc__.split("\n\n", 1)[1] if __doc__ else "")
    app.state.sessions = sessions

    # -------------------------------------------------------------------- who is asking

    def session_of(request: Request) -> Session | None:
        return sessions.get(request.cookies.get(COOKIE))

    def api_principal(request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            name = staff.api_client(header[7:].strip())
            if name is None:
                raise DeskError(401, "unknown API token")
            return Principal(name=f"api:{name}", via="token")
        session = session_of(request)
        if session is None or session.user is None:
            raise DeskError(401, "sign in first (or send Authorization: Bearer <token>)")
        if request.method not in ("GET", "HEAD") and \
                not csrf_ok(session, request.headers.get("x-csrf-token")):
            raise DeskError(403, "missing or wrong X-CSRF-Token header")
        return Principal(name=session.user, via="session")

    def page_session(request: Request) -> Session:
        session = session_of(request)
        if session is None or session.user is None:
            raise NotSignedIn()
        return session

    def form_session(request: Request, csrf_token: Annotated[str, Form()] = "") -> Session:
        session = page_session(request)
        if not csrf_ok(session, csrf_token):
            raise DeskError(403, "the form is stale or forged (CSRF token); reload the page")
        return session

    # -------------------------------------------------------------------- error answers

    @app.exception_handler(DeskError)
    async def desk_error(request: Request, err: DeskError) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": str(err)}, status_code=err.status,
                                headers=_SECURITY_HEADERS)
        return _html(request, "error.html", status=err.status, message=str(err), user=None)

    @app.exception_handler(NotSignedIn)
    async def not_signed_in(request: Request, err: NotSignedIn) -> Response:
        return RedirectResponse("/login", status_code=303)

    @app.exception_handler(AuditError)
    async def audit_down(request: Request, err: AuditError) -> Response:
        log_event(log, "web.audit_failed", level=logging.ERROR, error=str(err))
        return JSONResponse({"detail": "the audit log cannot be written: nothing was done"},
                            status_code=503, headers=_SECURITY_HEADERS)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> Response:
        # What was sent is not repeated back (it may be a case token): only where and why.
        errors = [{"loc": e.get("loc"), "msg": e.get("msg"), "type": e.get("type")}
                  for e in err.errors()]
        return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422,
                            headers=_SECURITY_HEADERS)

    # -------------------------------------------------------------------- signing in

    def set_cookie(response: Response, session: Session) -> None:
        response.set_cookie(COOKIE, session.sid, httponly=True, samesite="strict",
                            secure=secure_cookie, path="/")

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(request: Request) -> Response:
        session = session_of(request)
        if session is not None and session.user is not None:
            return RedirectResponse("/", status_code=303)
        session = session or sessions.new(None)
        response = _html(request, "login.html", csrf=session.csrf, user=None,
                         messages=_take_flash(session))
        set_cookie(response, session)
        return response

    @app.post("/login", include_in_schema=False)
    def login(request: Request, username: Annotated[str, Form()] = "",
              password: Annotated[str, Form()] = "",
              csrf_token: Annotated[str, Form()] = "") -> Response:
        session = session_of(request)
        if not csrf_ok(session, csrf_token):
            raise DeskError(403, "the sign-in form is stale or forged (CSRF token); reload it")
        # A name as typed goes to the audit only if it has a user name's form.
        shown = username if USER_NAME.match(username) else "<not a user name>"
        if throttle.blocked(shown):
            desk.record("web.sign_in_failed", shown, reason="too many failures")
            session.say("Too many failed sign-ins for this user; wait 15 minutes.")
            return RedirectResponse("/login", status_code=303)
        if not staff.check_password(username, password):
            throttle.failed(shown)
            desk.record("web.sign_in_failed", shown, reason="wrong user name or password")
            session.say("Wrong user name or password.")
            return RedirectResponse("/login", status_code=303)
        throttle.succeeded(shown)
        desk.record("web.signed_in", username)
        # A new session id at sign-in: an id planted before it is worth nothing after.
        sessions.end(session.sid)
        signed_in = sessions.new(username)
        response = RedirectResponse("/", status_code=303)
        set_cookie(response, signed_in)
        return response

    @app.post("/logout", include_in_schema=False)
    def logout(session: Annotated[Session, Depends(form_session)]) -> Response:
        desk.record("web.signed_out", session.user or "")
        sessions.end(session.sid)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                               secure=secure_cookie)
        return response

    # -------------------------------------------------------------------- pages

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def devices_page(request: Request,
                     session: Annotated[Session, Depends(page_session)]) -> Response:
        return _html(request, "devices.html", user=session.user, csrf=session.csrf,
                     devices=desk.devices(), messages=_take_flash(session))

    @app.get("/devices/{device_id}", response_class=HTMLResponse, include_in_schema=False)
    def device_page(request: Request, device_id: str,
                    session: Annotated[Session, Depends(page_session)]) -> Response:
        _known(device_id)
        device = desk.device(device_id)
        case, captures = desk.last_case(device_id)
        return _html(request, "device.html", user=session.user, csrf=session.csrf,
                     device=device, case=case, captures=captures, sites=ANATOMIC_SITES,
                     messages=_take_flash(session))

    @app.post("/devices/{device_id}/case", include_in_schema=False)
    def open_case_form(device_id: str, session: Annotated[Session, Depends(form_session)],
                       case_token: Annotated[str, Form()] = "",
                       anatomic_site: Annotated[str, Form()] = "") -> Response:
        _known(device_id)
        try:
            desk.open_case(session.user or "", device_id, case_token.strip(),
                           anatomic_site or None)
            session.say("Case opened.")
        except DeskError as err:
            session.say(f"Not opened: {err}")
        return RedirectResponse(f"/devices/{device_id}", status_code=303)

    @app.post("/devices/{device_id}/case/close", include_in_schema=False)
    def close_case_form(device_id: str,
                        session: Annotated[Session, Depends(form_session)]) -> Response:
        _known(device_id)
        try:
            desk.close_case(session.user or "", device_id)
            session.say("Case closed.")
        except DeskError as err:
            session.say(f"Not closed: {err}")
        return RedirectResponse(f"/devices/{device_id}", status_code=303)

    # -------------------------------------------------------------------- the API

    api = "/api/v1"
    responses: dict[int | str, dict[str, Any]] = {
        401: {"description": "not signed in, or an unknown API token"},
        403: {"description": "a cookie-authenticated change without the X-CSRF-Token header"},
        404: {"description": "no such device"},
    }

    @app.get(f"{api}/anatomic-sites", responses=responses)
    def anatomic_sites(who: Annotated[Principal, Depends(api_principal)]) -> list[str]:
        """The anatomic sites a case may name (ISIC ``anatom_site_general``)."""
        return list(ANATOMIC_SITES)

    @app.get(f"{api}/devices", responses=responses)
    def list_devices(who: Annotated[Principal, Depends(api_principal)]) -> DevicesOut:
        """Every device: online or offline, outbox depth, last seen, calibration age, and
        the case open on it."""
        return DevicesOut(devices=[_device_out(d) for d in desk.devices()])

    @app.get(f"{api}/devices/{{device_id}}", responses=responses)
    def get_device(device_id: str,
                   who: Annotated[Principal, Depends(api_principal)]) -> DeviceOut:
        _known(device_id)
        return _device_out(desk.device(device_id))

    @app.post(f"{api}/devices/{{device_id}}/case", responses={
        **responses, 400: {"description": "a bad case token or anatomic site"},
        502: {"description": "the device refused"},
        504: {"description": "the device did not answer"}})
    def open_case(device_id: str, body: OpenCase,
                  who: Annotated[Principal, Depends(api_principal)]) -> Done:
        """Open a case on the device (the case it had open ends). The gateway files the
        captures taken while it is open under it; the token is never returned."""
        _known(device_id)
        case = desk.open_case(who.name, device_id, body.case_token, body.anatomic_site)
        return Done(device_id=device_id, case=_case_out(case))

    @app.post(f"{api}/devices/{{device_id}}/case/close", responses={
        **responses, 502: {"description": "the device refused"},
        504: {"description": "the device did not answer (the gateway files no more "
                              "captures under the case all the same)"}})
    def close_case(device_id: str, who: Annotated[Principal, Depends(api_principal)]) -> Done:
        """Close the device's case."""
        _known(device_id)
        desk.close_case(who.name, device_id)
        return Done(device_id=device_id, case=None)

    @app.get(f"{api}/devices/{{device_id}}/captures", responses=responses)
    def case_captures(device_id: str,
                      who: Annotated[Principal, Depends(api_principal)]) -> CaseCapturesOut:
        """The captures filed under the device's open case (or its last case), oldest
        first: verdict and reasons, light mode, pair, override, and the thumbnail's URL."""
        _known(device_id)
        case, captures = desk.last_case(device_id)
        return CaseCapturesOut(device_id=device_id, case=_case_out(case),
                               captures=[_capture_out(device_id, c) for c in captures])

    @app.get(f"{api}/devices/{{device_id}}/captures/{{capture_id}}/thumbnail",
             responses={**responses, 200: {"content": {"image/jpeg": {}}}},
             response_class=Response)
    def thumbnail(device_id: str, capture_id: Annotated[str, PathParam(pattern=_CAPTURE_ID)],
                  who: Annotated[Principal, Depends(api_principal)]) -> Response:
        """A capture's thumbnail (JPEG, at most 320 pixels on its longest side)."""
        data = desk.thumbnail(device_id, capture_id)
        if data is None:
            raise DeskError(404, "no such capture")
        return Response(data, media_type="image/jpeg",
                        headers={**_SECURITY_HEADERS, "Cache-Control": "no-store"})

    def _known(device_id: str) -> None:
        desk.device(device_id)  # a malformed id: 404 with why
        if not desk.known(device_id):
            raise DeskError(404, f"no device {device_id} is known here")

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    return app


_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def _take_flash(session: Session) -> list[str]:
    messages, session.flash = session.flash, []
    return messages


def _html(request: Request, template: str, status: int = 200, **context: Any) -> Response:
    # The inline script runs only with this response's nonce; nothing is loaded from
    # anywhere but this server.
    nonce = secrets.token_urlsafe(16)
    context.setdefault("messages", [])
    context.setdefault("csrf", "")
    body = _TEMPLATES.get_template(template).render(nonce=nonce, **context)
    csp = (f"default-src 'self'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
           "img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
           "base-uri 'none'")
    return HTMLResponse(body, status_code=status,
                        headers={**_SECURITY_HEADERS, "Content-Security-Policy": csp})
