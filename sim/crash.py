"""Crash injection: a simulated device that is killed with SIGKILL at a chosen moment.

``python -m sim.crash --state DIR --port N --after accepted`` runs a whole simulated device
(same code paths as on the Pi), presses its button on a good scene, and kills its own
process with SIGKILL as soon as the chosen moment comes: no clean-up, no flush, exactly
what a power cut or the kernel's OOM killer does. It prints the capture id first, so the
caller knows what must survive.

``--kill-on-rename N`` aims inside the outbox instead: the process dies right after the
Nth outbox entry is renamed into place (with ``--pair``, 1 is between a pair's two images;
for a single capture, 1 is after the durable write and before "accepted" was said).

``python -m sim.crash gateway --store DIR --port N --kill-at stored`` runs the reference
gateway (development mode: unsealed captures accepted) and SIGKILLs it at a moment of its
first store: ``commit`` just before the image is linked into place (temp files written,
nothing committed), ``linked`` right after the link (committed, before its event is
logged), ``stored`` as its ``capture.stored`` event is logged (before the ack and the
after-ack work), ``dicom`` in the middle of the DICOM export (its temp file written: the exporter
process SIGKILLs the gateway, then itself, as a power cut would). It prints ``ready`` once it
is subscribed.

``python -m sim.crash exporter --store DIR --kill-at dicom [--once FILE]`` is the gateway's
exporter process (clinic_gateway/exporter.py; a gateway runs it when its
``exporter_command`` says so) that SIGKILLs itself in the middle of a DICOM export; with
``--once`` only if FILE does not exist yet (it creates it first), so the exporter the gateway
starts again gets through. ``--kill-parent`` kills the gateway that started it first;
``--raise`` raises an exception nobody foresaw there instead of dying.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dermascope_wire.logs import add_json_handler, log_event
from sim.device import SimDevice, sim_config

log = logging.getLogger("sim.crash")


GATEWAY_MOMENTS = ("commit", "linked", "stored", "dicom")


def _die(*_args: Any, **_kwargs: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _DieOnEvent(logging.Handler):
    def __init__(self, event: str) -> None:
        super().__init__(logging.DEBUG)
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) == self.event:
            _die()


def exporter_main(argv: list[str]) -> int:
    from clinic_gateway import dicom_export, exporter  # only this mode needs them

    parser = argparse.ArgumentParser(prog="python -m sim.crash exporter", description=__doc__)
    parser.add_argument("--kill-at", choices=("dicom",), required=True)
    parser.add_argument("--once", type=Path, help="die only if this file does not exist yet")
    parser.add_argument("--kill-parent", action="store_true",
                        help="SIGKILL the gateway that started this exporter first")
    parser.add_argument("--raise", dest="raise_", action="store_true",
                        help="raise an unexpected exception instead of dying")
    args, rest = parser.parse_known_args(argv)

    def die(*_args: Any, **_kwargs: Any) -> None:
        if args.once is not None:
            if args.once.exists():
                return
            args.once.touch()
        if args.raise_:
            raise RuntimeError("a fault nobody foresaw")
        if args.kill_parent:
            os.kill(os.getppid(), signal.SIGKILL)
        _die()

    dicom_export.check = die  # called once the DICOM temp file is written
    return exporter.main(rest)


def exporter_command(*options: str) -> tuple[str, ...]:
    """A gateway's ``exporter_command`` that runs ``exporter_main`` with these options."""
    return (sys.executable, "-m", "sim.crash", "exporter", *options)


def gateway_main(argv: list[str]) -> int:
    from clinic_gateway import gateway  # only this mode needs it

    parser = argparse.ArgumentParser(prog="python -m sim.crash gateway", description=__doc__)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True, help="loopback broker port")
    parser.add_argument("--kill-at", choices=GATEWAY_MOMENTS, required=True)
    parser.add_argument("--log", type=Path, help="JSON log events to this file")
    args = parser.parse_args(argv)
    if args.log:
        add_json_handler("clinic_gateway", path=args.log)
    if args.kill_at == "commit":
        os.link = _die  # the gateway's commit point
    elif args.kill_at == "linked":
        link = os.link

        def link_and_die(*link_args: Any, **link_kwargs: Any) -> None:
            link(*link_args, **link_kwargs)  # committed, then killed before anything else
            _die()

        os.link = link_and_die
    elif args.kill_at == "stored":
        logger = logging.getLogger("clinic_gateway.gateway")
        logger.addHandler(_DieOnEvent("capture.stored"))
        logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
    gw = gateway.Gateway("127.0.0.1", args.port, args.store, allow_unsealed=True)
    if args.kill_at == "dicom":
        gw.exporter_command = exporter_command("--kill-at", "dicom", "--kill-parent")
    gw.start()
    if not gw.wait_ready(10):
        print("gateway not ready", file=sys.stderr)
        return 1
    print("ready", flush=True)
    threading.Event().wait()  # until killed
    return 1  # not reached


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gateway"]:
        return gateway_main(argv[1:])
    if argv[:1] == ["exporter"]:
        return exporter_main(argv[1:])
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
