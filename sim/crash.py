"""Crash injection: a simulated device that is killed with SIGKILL at a chosen moment.

``python -m sim.crash --state DIR --port N --after accepted`` runs a whole simulated device
(same code paths as on the Pi), presses its button on a good scene, and kills its own
process with SIGKILL as soon as the chosen moment comes: no clean-up, no flush, exactly
what a power cut or the kernel's OOM killer does. It prints the capture id first, so the
caller knows what must survive.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from device_agent.logs import add_json_handler, log_event
from sim.device import SimDevice, sim_config

log = logging.getLogger("sim.crash")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.crash", description=__doc__)
    parser.add_argument("--state", type=Path, required=True, help="the device's state_dir")
    parser.add_argument("--port", type=int, required=True, help="loopback broker port")
    parser.add_argument("--device-id", default="sim-0001")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--after", choices=("accepted",), default="accepted",
                        help="the moment to die at")
    parser.add_argument("--log", type=Path, help="JSON log events to this file")
    args = parser.parse_args(argv)
    if args.log:
        add_json_handler("device_agent", path=args.log)
    config = sim_config(args.state, args.port, args.device_id, sim={"seed": args.seed})
    device = SimDevice(config).start()
    outcome = device.press()
    if outcome is None or outcome.verdict != "accept":
        print(f"no accepted capture: {outcome}", file=sys.stderr)
        return 1
    print(outcome.capture_id, flush=True)
    log_event(log, "crash.kill", capture_id=outcome.capture_id, moment=args.after)
    os.kill(os.getpid(), signal.SIGKILL)
    return 1  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
