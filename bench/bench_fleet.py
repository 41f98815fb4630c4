"""Fleet scale: N simulated devices through one Mosquitto to K gateway workers.

Goal (issue 9): 100 devices x 10 captures through 2 workers: aggregate rate >= 0.5x the
single-device loopback rate measured in the same run; and, in a second fleet run with one
worker SIGKILLed mid-run, 0 lost and 0 duplicated. The rate is taken from the run without
the kill: after a kill, the transfers the dead worker held wait out the devices' ack
timeout (20 s here) before they are resent, which says nothing about throughput.

    python bench/bench_fleet.py [--devices 100] [--captures 10] [--workers 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import emit

from sim.fleet import run_fleet

GOAL_RATIO = 0.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--captures", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        single = run_fleet(Path(tmp) / "single", devices=1, captures=args.captures * 5,
                           workers=1)
        total = args.devices * args.captures
        fleet = run_fleet(Path(tmp) / "fleet", devices=args.devices, captures=args.captures,
                          workers=args.workers)
        killed = run_fleet(Path(tmp) / "killed", devices=args.devices, captures=args.captures,
                           workers=args.workers, kill_worker_after=total // 3)
    ratio = fleet.captures_per_second / single.captures_per_second
    ok = (ratio >= GOAL_RATIO and killed.lost == 0 and killed.duplicated == 0
          and fleet.lost == 0 and fleet.duplicated == 0)
    lines = [
        f"single device : {single.stored} captures in {single.seconds:.2f} s = "
        f"{single.captures_per_second:.1f} captures/s",
        f"fleet         : {args.devices} devices x {args.captures} through {args.workers} "
        f"workers: {fleet.stored}/{fleet.accepted} stored in {fleet.seconds:.2f} s = "
        f"{fleet.captures_per_second:.1f} captures/s = {ratio:.2f}x single "
        f"(goal >= {GOAL_RATIO}x)",
        f"worker killed : one SIGKILLed after {total // 3} stored: {killed.stored}/"
        f"{killed.accepted} stored in {killed.seconds:.2f} s, lost {killed.lost}, "
        f"duplicated {killed.duplicated}",
        f"goals {'met' if ok else 'NOT met'}",
    ]
    emit("fleet", lines, {"single": single.to_dict(), "fleet": fleet.to_dict(),
                          "worker_killed": killed.to_dict(),
                          "ratio_to_single": round(ratio, 3), "goal_met": ok})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
