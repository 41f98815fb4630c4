"""The GP's page and the EHR's API (clinic_gateway/web) against a real Mosquitto, the
reference gateway and a simulated device: sign-in, CSRF, the audit of every action, a case
opened from the web reaching the device, its capture coming back with its verdict and
thumbnail, and the case token never in a URL, a log line, an answer or the audit log."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from clinic_gateway.audit import audit_path, verify
from clinic_gateway.config import ConfigError, parse_config
from clinic_gateway.gateway import Gateway
from clinic_gateway.web.auth import Staff, hash_password, hash_token, parse_hash, verify_password
from clinic_gateway.web.board import parse_status
from clinic_gateway.web.desk import ANATOMIC_SITES
from clinic_gateway.web.server import WebParts, WebServer, beside
from device_agent.session import ANATOMIC_SITES as DEVICE_SITES
from sim.device import SimDevice, sim_config

DEVICE = "sim-0001"
USER, PASSWORD = "dr.hansen", "correct horse battery"
API_TOKEN = "ehr-test-token-0123456789abcdef0123456789"
CASE_TOKEN = "TD-2026-000777"
STAFF = Staff({USER: hash_password(PASSWORD)}, {"ehr": hash_token(API_TOKEN)})


class AllRecords(logging.Handler):
    """Every log record of every logger, as the text any handler could write of it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.getMessage()} {record.__dict__!r}")


@pytest.fixture
def all_logs() -> Iterator[AllRecords]:
    handler = AllRecords()
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old)


@pytest.fixture
def web(gateway: Gateway) -> Iterator[WebParts]:
    parts = beside(gateway, STAFF, command_timeout=10.0)
    assert parts.board.wait_ready(10)
    try:
        yield parts
    finally:
        parts.board.stop()


@pytest.fixture
def client(web: WebParts) -> Iterator[httpx.Client]:
    """The application served by a real uvicorn on a loopback port."""
    with WebServer(web.app) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture
def device(tmp_path: Path, broker) -> Iterator[SimDevice]:
    with SimDevice(sim_config(tmp_path / "device", broker.port, DEVICE)) as d:
        d.wait_online()
        yield d


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def sign_in(client: httpx.Client, password: str = PASSWORD) -> httpx.Response:
    page = client.get("/login")
    return client.post("/login", data={"username": USER, "password": password,
                                       "csrf_token": csrf_of(page.text)},
                       follow_redirects=False)


def device_state(client: httpx.Client, device_id: str, state: str,
                 headers: dict) -> dict:
    """The device as the API shows it once its status says ``state`` (the status travels
    through the broker: polled, at most 10 s)."""
    shown: dict = {}
    for _ in range(200):
        shown = client.get(f"/api/v1/devices/{device_id}", headers=headers).json()
        if shown.get("state") == state:
            return shown
        threading.Event().wait(0.05)
    pytest.fail(f"{device_id} is not {state} after 10 s: {shown}")


def audit_lines(store: Path) -> list[dict]:
    path = audit_path(store)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------------------------- passwords, config

def test_a_password_hash_verifies_its_password_only() -> None:
    stored = hash_password("s3cret password")
    assert stored.startswith("scrypt$15$8$1$")
    assert verify_password("s3cret password", stored)
    assert not verify_password("s3cret passwore", stored)
    assert hash_password("s3cret password") != stored  # a salt of its own each time
    with pytest.raises(ValueError, match="scrypt"):
        parse_hash("$2b$12$notscrypt")


def test_hash_password_command_makes_a_hash_the_config_takes(tmp_path: Path) -> None:
    made = subprocess.run([sys.executable, "-m", "clinic_gateway", "hash-password", "--stdin"],
                          input="a long password\n", capture_output=True, text=True,
                          timeout=60, check=True).stdout.strip()
    assert verify_password("a long password", made)
    assert "a long password" not in made
    config = parse_config({"service": {"insecure_dev_mode": True},
                           "web": {"enabled": True, "users": {"dr.hansen": made}}})
    assert config.web.users == {"dr.hansen": made}
    token = subprocess.run([sys.executable, "-m", "clinic_gateway", "hash-password",
                            "--new-api-token"], capture_output=True, text=True, timeout=60,
                           check=True).stdout
    given = re.search(r"token .*: (\S+)", token).group(1)
    stored = re.search(r"hash .*: (\S+)", token).group(1)
    assert Staff({}, {"ehr": stored}).api_client(given) == "ehr"


@pytest.mark.parametrize(("web", "message"), [
    ({"enabled": True}, "nobody could sign in"),
    ({"users": {"dr.hansen": "plaintext"}}, "web.users"),
    ({"api_tokens": {"ehr": "sha256$abc"}}, "web.api_tokens"),
    ({"tls_cert_file": "/x.pem"}, "tls_key_file"),
    ({"users": {"bad name": hash_password("x" * 8)}}, "web.users"),
])
def test_a_bad_web_section_is_refused_naming_the_key(web: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({"service": {"insecure_dev_mode": True}, "web": web})


def test_the_sites_offered_are_the_devices() -> None:
    assert ANATOMIC_SITES == DEVICE_SITES


def test_a_status_message_is_read_and_a_bad_one_refused() -> None:
    status = parse_status(DEVICE, json.dumps({
        "v": 1, "type": "status", "state": "online", "device_id": DEVICE,
        "ts": "2026-11-25T12:00:00+00:00", "outbox_depth": 2,
        "calibrated_at": "2026-11-20T12:00:00+00:00"}).encode())
    assert (status.state, status.outbox_depth) == ("online", 2)
    assert status.calibrated_at.isoformat() == "2026-11-20T12:00:00+00:00"
    assert parse_status(DEVICE, b'{"type": "status", "state": "offline"}').calibrated_at is None
    for bad, why in ((b"[]", "not a status"), (b'{"type": "status", "state": "asleep"}',
                                                "neither online"),
                     (b"not json", "Expecting value"), (b"x" * 20000, "more than")):
        with pytest.raises(ValueError, match=why):
            parse_status(DEVICE, bad)


# ------------------------------------------------------------------------- signing in

def test_nothing_without_signing_in(client: httpx.Client) -> None:
    assert client.get("/", follow_redirects=False).headers["location"] == "/login"
    assert client.get(f"/devices/{DEVICE}", follow_redirects=False).status_code == 303
    assert client.get("/api/v1/devices").status_code == 401
    assert client.get("/api/v1/devices",
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post(f"/api/v1/devices/{DEVICE}/case",
                       json={"case_token": CASE_TOKEN}).status_code == 401
    assert client.get(f"/api/v1/devices/{DEVICE}/captures/c1/thumbnail").status_code == 401


def test_sign_in_and_out_are_audited_and_the_cookie_is_locked_down(
        client: httpx.Client, store: Path) -> None:
    refused = sign_in(client, password="wrong password")
    assert refused.headers["location"] == "/login"
    assert "Wrong user name or password" in client.get("/login").text
    assert client.get("/api/v1/devices").status_code == 401
    before = client.cookies.get("gp_session")
    done = sign_in(client)
    assert done.status_code == 303
    assert done.headers["location"] == "/"
    cookie = done.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie.replace("Strict", "strict")
    assert client.cookies.get("gp_session") != before  # a new session id at sign-in
    assert client.get("/api/v1/devices").status_code == 200
    page = client.get("/")
    assert page.status_code == 200
    assert USER in page.text
    assert "nonce-" in page.headers["content-security-policy"]
    out = client.post("/logout", data={"csrf_token": csrf_of(page.text)},
                      follow_redirects=False)
    assert out.headers["location"] == "/login"
    # The session is over on the server too: the old cookie opens nothing.
    client.cookies.set("gp_session", done.cookies.get("gp_session") or "")
    assert client.get("/api/v1/devices").status_code == 401
    lines = audit_lines(store)
    assert [(e["event"], e["user"]) for e in lines] == [
        ("web.sign_in_failed", USER), ("web.signed_in", USER), ("web.signed_out", USER)]
    assert verify(audit_path(store)).ok


def test_guessing_a_password_is_stopped_after_five_failures(client: httpx.Client) -> None:
    for _ in range(5):
        sign_in(client, password="guess")
    sign_in(client)  # the right password, too late
    assert client.get("/api/v1/devices").status_code == 401
    assert "Too many failed sign-ins" in client.get("/login").text


def test_forms_and_api_changes_without_the_csrf_token_are_refused(
        client: httpx.Client, store: Path, gateway: Gateway) -> None:
    page = client.get("/login")
    no_token = client.post("/login", data={"username": USER, "password": PASSWORD})
    assert no_token.status_code == 403
    wrong = client.post("/login", data={"username": USER, "password": PASSWORD,
                                        "csrf_token": csrf_of(page.text) + "x"})
    assert wrong.status_code == 403
    sign_in(client)
    form = client.post(f"/devices/{DEVICE}/case", data={"case_token": CASE_TOKEN},
                       follow_redirects=False)
    assert form.status_code == 403
    api = client.post(f"/api/v1/devices/{DEVICE}/case", json={"case_token": CASE_TOKEN})
    assert api.status_code == 403
    assert client.post("/logout", follow_redirects=False).status_code == 403
    # Nothing was opened, nothing sent.
    assert gateway.cases.cases(DEVICE) == []
    assert not any(e["event"].startswith(("command.", "web.case")) for e in audit_lines(store))


# ------------------------------------------------------------------------- cases, end to end

def test_a_case_opened_on_the_page_files_the_press_and_shows_it(
        tmp_path: Path, web: WebParts, device: SimDevice, store: Path,
        all_logs: AllRecords) -> None:
    urls: list[str] = []
    bodies: list[bytes] = []
    hooks = {"request": [lambda r: urls.append(str(r.url))],
             "response": [lambda r: (r.read(), bodies.append(r.content))]}
    with WebServer(web.app) as server, \
            httpx.Client(base_url=server.url, event_hooks=hooks, timeout=30) as http:
        sign_in(http)
        device_state(http, DEVICE, "online", {})
        listed = http.get("/api/v1/devices").json()["devices"]
        mine = next(d for d in listed if d["device_id"] == DEVICE)
        assert mine["online"] is True
        assert mine["outbox_depth"] == 0
        assert mine["last_seen"] is not None
        assert mine["calibration_age_days"] is None  # the simulated device has none
        assert "unknown" in http.get("/").text
        page = http.get(f"/devices/{DEVICE}")
        opened = http.post(f"/devices/{DEVICE}/case", follow_redirects=True, data={
            "csrf_token": csrf_of(page.text), "case_token": CASE_TOKEN,
            "anatomic_site": "lower extremity"})
        assert "Case opened." in opened.text
        assert 'id="close-case"' in opened.text
        assert device.agent.session.case().token == CASE_TOKEN
        device.show(None, seed=1)
        outcome = device.press()
        assert outcome.verdict == "accept"
        assert device.uplink.wait_idle(timeout=30)
        listed = http.get(f"/api/v1/devices/{DEVICE}/captures").json()
        assert listed["case"]["open"] is True
        assert listed["case"]["anatomic_site"] == "lower extremity"
        [capture] = listed["captures"]
        assert capture["capture_id"] == outcome.capture_id
        assert (capture["verdict"], capture["reasons"]) == ("accept", [])
        assert capture["light_mode"] == "polarised"
        assert capture["overridden"] is False
        thumb = http.get(capture["thumbnail_url"])
        assert thumb.headers["content-type"] == "image/jpeg"
        assert thumb.headers["cache-control"] == "no-store"
        image = cv2.imdecode(np.frombuffer(thumb.content, np.uint8), cv2.IMREAD_COLOR)
        assert max(image.shape[:2]) == 320
        assert outcome.capture_id in http.get(f"/devices/{DEVICE}").text
        closed = http.post(f"/api/v1/devices/{DEVICE}/case/close",
                           headers={"X-CSRF-Token": csrf_of(http.get("/").text)})
        assert closed.status_code == 200, closed.text
        assert device.agent.session.case() is None
        after = http.get(f"/api/v1/devices/{DEVICE}/captures").json()
        assert after["case"]["open"] is False
        assert len(after["captures"]) == 1

    events = audit_lines(store)
    ref = web.desk.gateway.cases.ref(CASE_TOKEN)
    opened_line = next(e for e in events if e["event"] == "web.case_open")
    assert (opened_line["user"], opened_line["case_ref"], opened_line["device_id"]) == \
        (USER, ref, DEVICE)
    assert any(e["event"] == "web.case_close" and e["user"] == USER and e["case_ref"] == ref
               for e in events)
    assert [e["command"] for e in events if e["event"] == "command.answered"] == \
        ["open_case", "close_case"]
    # The token went to the device and into the stored capture, and nowhere else.
    assert json.loads((store / DEVICE / f"{outcome.capture_id}.json").read_text())["case"] \
        == {"token": CASE_TOKEN, "assigned": True}
    assert CASE_TOKEN not in audit_path(store).read_text()
    assert not [u for u in urls if CASE_TOKEN in u]
    assert not [b for b in bodies if CASE_TOKEN.encode() in b]
    assert len(all_logs.lines) > 10
    assert not [line for line in all_logs.lines if CASE_TOKEN in line]


def test_a_calibrated_device_shows_its_calibration_age(
        tmp_path: Path, broker, client: httpx.Client) -> None:
    from device_agent.calibrate import run_calibration
    from sim.targets import Response, render_chart, render_white

    config = sim_config(tmp_path / "calibrated", broker.port, "sim-0002")
    response = Response(cast="cool", seed=2)
    made = run_calibration(config, "polarised", render_white(response),
                           render_chart(response)).calibration
    ehr = {"Authorization": f"Bearer {API_TOKEN}"}
    calibrated = SimDevice(config).start()
    try:
        calibrated.wait_online()
        shown = device_state(client, "sim-0002", "online", ehr)
    finally:
        calibrated.stop()  # a clean stop says "offline" (retained)
    assert shown["calibrated_at"] == made.created
    assert 0 <= shown["calibration_age_days"] < 0.1
    assert device_state(client, "sim-0002", "offline", ehr)["online"] is False


def test_the_ehr_opens_and_closes_with_its_token_and_no_csrf(
        client: httpx.Client, device: SimDevice, store: Path) -> None:
    ehr = {"Authorization": f"Bearer {API_TOKEN}"}
    answer = client.post(f"/api/v1/devices/{DEVICE}/case", headers=ehr,
                         json={"case_token": "REF-42", "anatomic_site": "head/neck"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["case"]["anatomic_site"] == "head/neck"
    assert "REF-42" not in answer.text
    assert device.agent.session.case().anatomic_site == "head/neck"
    assert client.post(f"/api/v1/devices/{DEVICE}/case/close", headers=ehr).status_code == 200
    users = {e["user"] for e in audit_lines(store) if e["event"].startswith("web.case")}
    assert users == {"api:ehr"}


def test_a_bad_case_is_refused_without_repeating_the_token(
        client: httpx.Client, device: SimDevice, gateway: Gateway) -> None:
    ehr = {"Authorization": f"Bearer {API_TOKEN}"}
    cpr = "010190-1234"
    refused = client.post(f"/api/v1/devices/{DEVICE}/case", headers=ehr,
                          json={"case_token": cpr})
    assert refused.status_code == 400
    assert "CPR" in refused.text
    assert cpr not in refused.text
    site = client.post(f"/api/v1/devices/{DEVICE}/case", headers=ehr,
                       json={"case_token": CASE_TOKEN, "anatomic_site": "elbow"})
    assert site.status_code == 400
    assert CASE_TOKEN not in site.text
    shape = client.post(f"/api/v1/devices/{DEVICE}/case", headers=ehr,
                        json={"case_token": [CASE_TOKEN]})
    assert shape.status_code == 422
    assert CASE_TOKEN not in shape.text
    unknown = client.post("/api/v1/devices/sim-9999/case", headers=ehr,
                          json={"case_token": CASE_TOKEN})
    assert unknown.status_code == 404
    assert gateway.cases.cases(DEVICE) == []
    assert device.agent.session.case() is None


def test_a_device_that_does_not_answer_is_reported(
        client: httpx.Client, web: WebParts, gateway: Gateway, store: Path) -> None:
    (store / "sim-0404").mkdir(parents=True)  # known (it delivered once), now switched off
    web.desk.command_timeout = 1.0
    answer = client.post("/api/v1/devices/sim-0404/case",
                         headers={"Authorization": f"Bearer {API_TOKEN}"},
                         json={"case_token": CASE_TOKEN})
    assert answer.status_code == 504
    assert "did not answer" in answer.text
    assert [e["event"] for e in audit_lines(store)][-1] == "command.unanswered"


def test_the_api_is_described_for_the_ehr(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert {"/api/v1/devices", "/api/v1/devices/{device_id}/case",
            "/api/v1/devices/{device_id}/case/close", "/api/v1/devices/{device_id}/captures",
            "/api/v1/devices/{device_id}/captures/{capture_id}/thumbnail"} <= set(paths)
    assert "case_token" in json.dumps(schema["components"]["schemas"]["OpenCase"])
    assert not any(p.startswith(("/login", "/logout", "/devices")) for p in paths)
    assert client.get("/docs").status_code == 404  # would load scripts from the internet


def test_a_case_lists_its_own_captures_only_and_each_new_one(tmp_path: Path) -> None:
    from clinic_gateway.cases import CaseRegistry
    from clinic_gateway.web.captures import CaptureShelf

    store = tmp_path / "store"
    cases = CaseRegistry(store / ".gateway")
    folder = store / DEVICE
    folder.mkdir(parents=True)
    ok, jpeg = cv2.imencode(".jpg", np.full((600, 800, 3), 128, np.uint8))
    assert ok

    def stored(capture_id: str, token: str | None) -> None:
        (folder / f"{capture_id}.jpg").write_bytes(jpeg.tobytes())
        (folder / f"{capture_id}.json").write_text(json.dumps({
            "capture_id": capture_id, "captured_at": "2099-01-01T00:00:00+00:00",
            "quality": {"verdict": "accept", "reasons": []},
            "illumination": {"mode": "polarised"},
            "case": {"token": token, "assigned": token is not None}}))

    cases.opened(DEVICE, "CASE-A", "head/neck")
    case = cases.open_case(DEVICE)
    shelf = CaptureShelf(store, cases)
    stored("a1", "CASE-A")
    stored("b1", "CASE-B")  # another patient's, delivered late
    stored("u1", None)  # filed unassigned
    old = case.opened_at + 5
    os.utime(folder, (old, old))  # long ago: this answer may be kept
    assert [c.capture_id for c in shelf.of_case(case)] == ["a1"]
    stored("a2", "CASE-A")  # the folder's time changes: the next listing has it
    assert [c.capture_id for c in shelf.of_case(case)] == ["a1", "a2"]
    thumb = cv2.imdecode(np.frombuffer(shelf.thumbnail(DEVICE, "a2"), np.uint8),
                         cv2.IMREAD_COLOR)
    assert thumb.shape == (240, 320, 3)
    assert shelf.thumbnail(DEVICE, "nothing") is None
