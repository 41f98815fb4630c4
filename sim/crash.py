"""Crash injection: a simulated device that is killed with SIGKILL at a chosen moment.

``python -m sim.crash --state DIR --port N --after accepted`` runs a whole simulated device
(same code paths as on the Pi), presses its button on a good scene, and kills its own
process with SIGKILL as soon as the chosen moment comes: no clean-up, no flush, exactly
what a power cut or the kernel's OOM killer does. It prints the capture id first, so the
caller knows what must survive.

``--kill-on-rename N`` aims inside the outbox instead: the process dies right after the
Nth outbox entry is renamed into place (with ``--pair``, 1 is between a pair's two images;
for a single capture, 1 is after the durable write and before "accepted" was said).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
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
    parser.add_argument("--pair", action="store_true", help="illumination mode pair")
    parser.add_argument("--kill-on-rename", type=int, metavar="N",
                        help="die right after the Nth outbox entry is renamed into place")
    args = parser.parse_args(argv)
    if args.log:
        add_json_handler("device_agent", path=args.log)
    config = sim_config(args.state, args.port, args.device_id, sim={"seed": args.seed},
                        illumination={"mode": "pair" if args.pair else "polarised"})
    if args.kill_on_rename:
        os.rename = _killing_rename(os.rename, args.kill_on_rename)
    device = SimDevice(config).start()
    outcome = device.press()
    if outcome is None or outcome.verdict != "accept":
        print(f"no accepted capture: {outcome}", file=sys.stderr)
        return 1
    print(outcome.capture_id, flush=True)
    log_event(log, "crash.kill", capture_id=outcome.capture_id, moment=args.after)
    os.kill(os.getpid(), signal.SIGKILL)
    return 1  # not reached


def _killing_rename(rename: Callable[..., None], n: int) -> Callable[..., None]:
    count = 0

    def killing_rename(src: object, dst: object, *args: object, **kwargs: object) -> None:
        nonlocal count
        rename(src, dst, *args, **kwargs)
        if str(dst).endswith(".entry"):
            count += 1
            if count == n:
                os.kill(os.getpid(), signal.SIGKILL)

    return killing_rename


if __name__ == "__main__":
    raise SystemExit(main())
