"""``make demo`` serves the GP's page: its URL and a demo login are printed, and the
captures the simulated device delivered under the demo's case are on it, with their
verdicts and thumbnails (checked by the demo itself through the page's API, signed in with
that login, over the shipped broker config: the page's status connection is the ACL's
"monitor")."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_the_demo_shows_its_captures_on_the_gps_page(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "device_agent", "demo", "--out", str(out),
                             "--captures", "3"], capture_output=True, text=True, timeout=240,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"(?m)^web +the GP's page: http://127\.0\.0\.1:\d+/ +\(demo login gp / "
                     r"\S+;", result.stdout), result.stdout
    stored = len(list((out / "gateway" / "demo-0001").glob("*.jpg")))
    assert stored == 2  # PLAN: good, defocus (retake, not sent), good
    assert f"web       {stored} captures of the case on the GP's page with their thumbnails " \
           "(accept, accept)" in result.stdout
    assert "PROBLEM" not in result.stdout
