"""The systemd units of the device and of the clinic gateway: valid, hardened (exposure <= 2.0),
and each program speaks systemd's notify protocol and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sim.broker import MosquittoBroker, free_port

UNITS = Path(__file__).parent.parent / "systemd"
DEVICE_UNIT = UNITS / "device-agent.service"
GATEWAY_UNIT = UNITS / "clinic-gateway.service"
EXPOSURE_GOAL = 2.0


@pytest.fixture(params=[(DEVICE_UNIT, "/opt/device-agent/venv/bin/device-agent"),
                        (GATEWAY_UNIT, "/opt/clinic-gateway/venv/bin/clinic-gateway")],
                ids=["device", "gateway"])
def unit_copy(request, tmp_path):
    """Each shipped unit with only ExecStart's program pointed at this venv's console script:
    ``systemd-analyze verify`` insists that the program exists."""
    unit, installed = request.param
    program = Path(sys.executable).with_name(Path(installed).name)
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace(installed, str(program)))
    return copy


def analyze(*args: str) -> subprocess.CompletedProcess:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: install the 'systemd' package"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60,
                          check=False)


def test_systemd_analyze_verify_passes(unit_copy):
    result = analyze("verify", "--man=no", str(unit_copy))
    assert result.returncode == 0, result.stderr


def test_exposure_is_at_most_the_goal(unit_copy):
    result = analyze("security", "--offline=yes", "--no-pager", str(unit_copy))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= EXPOSURE_GOAL


def test_the_device_unit_keeps_what_the_agent_needs_on_a_pi():
    text = DEVICE_UNIT.read_text()
    for line in ("SupplementaryGroups=video gpio", "DevicePolicy=closed",
                 "DeviceAllow=char-video4linux rw", "DeviceAllow=char-media rw",
                 "DeviceAllow=char-dma_heap rw", "DeviceAllow=char-gpiochip rw",
                 "StateDirectory=device-agent", "Type=notify", "UMask=0077",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "Restart=on-failure"):
        assert line in text.splitlines(), line
    assert re.search(r"^WatchdogSec=\d+", text, re.M)


def test_the_agent_reports_ready_pings_the_watchdog_and_stops_cleanly(tmp_path):
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(30)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[device]\nid = "sim-0001"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[camera]\nbackend = "sim"\n[pins]\npin_factory = "mock"\n'
        f'[uplink]\nport = {free_port()}\ninsecure_dev_mode = true\n'
        '[security]\ninsecure_dev_mode = true\n'
    )
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen([sys.executable, "-m", "device_agent", "run", "--config",
                             str(config)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        states = []
        while states.count("WATCHDOG=1") < 3:
            states.append(sock.recv(256).decode())
        assert states[0] == "READY=1"
        proc.send_signal(signal.SIGTERM)
        while states[-1] != "STOPPING=1":
            states.append(sock.recv(256).decode())
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    assert proc.returncode == 0
    assert "agent.stopped" in [json.loads(line)["event"] for line in out.splitlines()]


def test_the_gateway_unit_keeps_what_the_service_needs():
    lines = GATEWAY_UNIT.read_text().splitlines()
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
