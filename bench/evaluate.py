"""Evaluate the quality checks on the simulator's labelled set (and real photographs).

Prints per-check precision/recall, per-defect recall by severity, the false-retake rate on
pristine frames and focus monotonicity, as a table and as JSON. See
device_agent/camera/evaluate.py and docs/quality.md.

    python bench/evaluate.py [--seeds 40] [--json]
"""

from __future__ import annotations

import sys

from device_agent.camera.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
