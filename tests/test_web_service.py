"""The web process under the service's supervisor (``clinic-gateway run --config`` with
``[web] enabled = true``): it serves the page and the API, is started again when it dies,
and stops with the service."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from clinic_gateway.web.auth import hash_password, hash_token
from sim.device import SimDevice, sim_config
from sim.pki import TestCA
from tests.jsonlog import read_events

USER, PASSWORD = "dr.hansen", "correct horse battery"
API_TOKEN = "service-test-token-0123456789abcdef"


def events(log: Path, name: str) -> list[dict]:
    return read_events(log, name)

def wait_events(log: Path, name: str, count: int = 1, timeout: float = 30.0) -> list[dict]:
    """Until ``count`` such events are in the service's log (written by other processes:
    polled, with a deadline)."""
    deadline = time.monotonic() + timeout
    while len(found := events(log, name)) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"fewer than {count} {name} within {timeout} s: {found}")
        time.sleep(0.05)
    return found


def test_the_supervisor_serves_the_page_and_restarts_it(tmp_path: Path, broker) -> None:
    log = tmp_path / "events.jsonl"
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[broker]\nhost = "127.0.0.1"\nport = {broker.port}\n'
        f'[store]\ndir = "{tmp_path / "store"}"\n'
        f'[service]\nworkers = 1\ninsecure_dev_mode = true\nlog_file = "{log}"\n'
        f'[metrics]\nenabled = false\n'
        f'[web]\nenabled = true\nport = 0\n'
        f'users = {{ "{USER}" = "{hash_password(PASSWORD)}" }}\n')
    service = subprocess.Popen([sys.executable, "-m", "clinic_gateway", "run", "--config",
                                str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        [started] = wait_events(log, "gateway.web_started")
        [listening] = wait_events(log, "web.listening")
        assert listening["address"] == "127.0.0.1"  # loopback unless configured otherwise
        url = f"http://127.0.0.1:{listening['port']}"
        with httpx.Client(base_url=url, timeout=10) as http:
            page = http.get("/login")
            csrf = page.text.split('name="csrf_token" value="')[1].split('"')[0]
            http.post("/login", data={"username": USER, "password": PASSWORD,
                                      "csrf_token": csrf})
            assert http.get("/api/v1/devices").status_code == 200
        os.kill(started["pid"], signal.SIGKILL)
        wait_events(log, "gateway.web_died")
        [_, again] = wait_events(log, "gateway.web_started", count=2)
        assert again["pid"] != started["pid"]
        port = wait_events(log, "web.listening", count=2)[1]["port"]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            assert http.get("/api/v1/devices").status_code == 401  # served, sign-in needed
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=40) == 0
        assert events(log, "web.stopped")
        assert events(log, "gateway.worker_started")  # the workers run as before
    finally:
        if service.poll() is None:
            service.kill()
            service.wait(timeout=10)


def test_the_ehr_opens_a_case_over_https_through_the_service(tmp_path: Path, broker) -> None:
    """The web process as the service makes it (from the config: its own command connection
    and status board) over HTTPS, opening and closing a case on a simulated device."""
    log = tmp_path / "events.jsonl"
    ca = TestCA(tmp_path / "pki")
    web_cert = ca.issue("localhost", server=True)
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[broker]\nhost = "127.0.0.1"\nport = {broker.port}\n'
        f'[store]\ndir = "{tmp_path / "store"}"\n'
        f'[service]\nworkers = 1\ninsecure_dev_mode = true\nlog_file = "{log}"\n'
        f'[metrics]\nenabled = false\n'
        f'[web]\nenabled = true\nport = 0\ntls_cert_file = "{web_cert.cert}"\n'
        f'tls_key_file = "{web_cert.key}"\n'
        f'api_tokens = {{ "ehr" = "{hash_token(API_TOKEN)}" }}\n'
        f'users = {{ "{USER}" = "{hash_password(PASSWORD)}" }}\n')
    trust = ssl.create_default_context(cafile=str(ca.cert_path))
    service = subprocess.Popen([sys.executable, "-m", "clinic_gateway", "run", "--config",
                                str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    device = SimDevice(sim_config(tmp_path / "device", broker.port, "sim-0007")).start()
    try:
        device.wait_online()
        [listening] = wait_events(log, "web.listening")
        assert listening["tls"] is True
        ehr = {"Authorization": f"Bearer {API_TOKEN}"}
        with httpx.Client(base_url=f"https://localhost:{listening['port']}", verify=trust,
                          headers=ehr, timeout=30) as http:
            opened = http.post("/api/v1/devices/sim-0007/case",
                               json={"case_token": "REF-7", "anatomic_site": "palms/soles"})
            assert opened.status_code == 200, opened.text
            assert device.agent.session.case().token == "REF-7"
            assert http.post("/api/v1/devices/sim-0007/case/close").status_code == 200
            assert device.agent.session.case() is None
            cookie = http.get("/login").headers["set-cookie"]
            assert "Secure" in cookie  # over HTTPS the cookie never goes out in clear
            assert "HttpOnly" in cookie
    finally:
        device.stop()
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(timeout=40)
        finally:
            if service.poll() is None:
                service.kill()
                service.wait(timeout=10)
    assert service.returncode == 0
    assert [e["user"] for e in events(log, "web.case_open")] == ["api:ehr"]
    assert not [line for line in log.read_text().splitlines() if "REF-7" in line]
