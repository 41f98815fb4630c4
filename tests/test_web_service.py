"""The web process under the service's supervisor (``clinic-gateway run --config`` with
``[web] enabled = true``): it serves the page and the API, is started again when it dies,
and stops with the service."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from clinic_gateway.web.auth import hash_password

USER, PASSWORD = "dr.hansen", "correct horse battery"


def events(log: Path, name: str) -> list[dict]:
    if not log.exists():
        return []
    found = []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line being written by another process right now
        if event.get("event") == name:
            found.append(event)
    return found


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
