"""The device agent stays lean: what only calibration, the gateway or the simulator needs is
never loaded by the running agent (a Pi Zero 2 W has 512 MB and one slow core to start on).

Each check runs in a fresh interpreter, so modules a test imported earlier cannot hide a
regression.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from device_agent.calibrate import run_calibration
from device_agent.config import parse_config
from sim.targets import Response, render_chart, render_white

ROOT = Path(__file__).resolve().parent.parent
# colour-science (and scipy, which it pulls in for some features) belong to calibration;
# pydicom to the gateway's DICOM export; sim and clinic_gateway are other distributions.
HEAVY = ("colour", "scipy", "pydicom", "clinic_gateway", "sim", "matplotlib")

LOADED = ("import sys, json\n"
          f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})))\n")


def _run(script: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", script + LOADED], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_agent_loads_no_heavy_module():
    assert _run("import device_agent.agent\nimport device_agent.cli\n") == []


def test_a_running_agent_with_a_calibration_captures_without_loading_them(tmp_path):
    state = tmp_path / "state"
    data = {"device": {"id": "lean-1", "state_dir": str(state)},
            "pins": {"pin_factory": "mock"},
            "uplink": {"insecure_dev_mode": True}, "security": {"insecure_dev_mode": True}}
    # Calibrated in this process (calibration itself needs colour-science), used in the other.
    response = Response()
    run_calibration(parse_config(data), "polarised", render_white(response),
                    render_chart(response))
    assert (state / "calibration.json").exists()
    script = f"""
import time
from pathlib import Path
from gpiozero.pins.mock import MockFactory, MockPWMPin
from device_agent.agent import Agent
from device_agent.camera.picam import PicameraCamera
from device_agent.config import parse_config
from device_agent.uplink.outbox import Outbox
from tests.fake_picamera2 import FakePicamera2

config = parse_config({data!r})
camera = PicameraCamera(640, 480, 10.0, factory=FakePicamera2)
agent = Agent(config, camera, Outbox(config.outbox_dir, 1 << 26),
              pin_factory=MockFactory(pin_class=MockPWMPin))
assert agent.calibration is not None
agent.start()
try:
    assert agent.ring.wait_until(time.monotonic() + 0.3, timeout=10)
    outcome = agent.capture(agent.ring.latest().timestamp)
    assert outcome.verdict in ("accept", "retake"), outcome
finally:
    agent.close()
"""
    assert _run(script) == []
