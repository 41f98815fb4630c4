"""The systemd unit: valid, hardened, and the agent speaks systemd's notify protocol."""

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

from sim.broker import free_port

UNIT = Path(__file__).parent.parent / "systemd" / "device-agent.service"
EXPOSURE_GOAL = 2.0


@pytest.fixture
def unit_copy(tmp_path):
    """The shipped unit with only ExecStart's program pointed at this venv's device-agent:
    ``systemd-analyze verify`` insists that the program exists."""
    program = Path(sys.executable).with_name("device-agent")
    text = UNIT.read_text().replace("/opt/device-agent/venv/bin/device-agent", str(program))
    copy = tmp_path / UNIT.name
    copy.write_text(text)
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


def test_the_unit_keeps_what_the_agent_needs_on_a_pi():
    text = UNIT.read_text()
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
