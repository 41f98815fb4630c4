"""The gateway's systemd unit: valid, hardened (exposure <= 2.0), and the service speaks
systemd's notify protocol and stops every worker on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sim.broker import MosquittoBroker
from tests.test_systemd import EXPOSURE_GOAL, analyze

UNIT = Path(__file__).parent.parent / "systemd" / "clinic-gateway.service"


@pytest.fixture
def unit_copy(tmp_path):
    """The shipped unit with only ExecStart's program pointed at this venv's clinic-gateway:
    ``systemd-analyze verify`` insists that the program exists."""
    program = Path(sys.executable).with_name("clinic-gateway")
    text = UNIT.read_text().replace("/opt/clinic-gateway/venv/bin/clinic-gateway", str(program))
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    return copy


def test_systemd_analyze_verify_passes(unit_copy):
    result = analyze("verify", "--man=no", str(unit_copy))
    assert result.returncode == 0, result.stderr


def test_exposure_is_at_most_the_goal(unit_copy):
    result = analyze("security", "--offline=yes", "--no-pager", str(unit_copy))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= EXPOSURE_GOAL


def test_the_unit_keeps_what_the_service_needs():
    lines = UNIT.read_text().splitlines()
    for line in ("User=clinic-gateway", "StateDirectory=clinic-gateway",
                 "ConfigurationDirectory=clinic-gateway", "Type=notify", "KillMode=mixed",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                 "PrivateDevices=yes", "Restart=on-failure", "RestartPreventExitStatus=2",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
                 "ExecStart=/opt/clinic-gateway/venv/bin/clinic-gateway run --config "
                 "/etc/clinic-gateway/config.toml"):
        assert line in lines, line


def test_the_service_reports_ready_and_stops_its_workers_on_sigterm(tmp_path):
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(30)
    with MosquittoBroker(tmp_path / "broker") as broker:
        config = tmp_path / "config.toml"
        config.write_text(f'[broker]\nport = {broker.port}\n[store]\ndir = "{tmp_path / "s"}"\n'
                          '[service]\nworkers = 2\ninsecure_dev_mode = true\n'
                          '[metrics]\nenabled = false\n')
        env = {"NOTIFY_SOCKET": str(notify_path), "PATH": "/usr/bin:/bin"}
        proc = subprocess.Popen([sys.executable, "-m", "clinic_gateway", "run", "--config",
                                 str(config)], env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert sock.recv(256).decode() == "READY=1"
            proc.send_signal(signal.SIGTERM)
            assert sock.recv(256).decode() == "STOPPING=1"
            out, _ = proc.communicate(timeout=40)
        finally:
            if proc.poll() is None:
                proc.kill()
            sock.close()
    assert proc.returncode == 0
    logged = [json.loads(line) for line in out.splitlines()]
    pids = [e["pid"] for e in logged if e["event"] == "gateway.worker_started"]
    assert len(pids) == 2
    assert logged[-1]["event"] == "gateway.service_stopped"
    assert not [e for e in logged if e["event"] == "gateway.worker_died"]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
