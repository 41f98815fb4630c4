"""The ``device-agent`` command."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

from gpiozero.pins import Factory

from dermascope_wire import systemd, threads
from dermascope_wire.logs import add_json_handler, log_event
from device_agent import __version__
from device_agent.camera.imagefile import DEFAULT_MAX_PIXELS
from device_agent.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    check_tls_files,
    ensure_state_dir,
    load_config,
)

if TYPE_CHECKING:
    from device_agent.calibrate import Targets

log = logging.getLogger("device_agent.cli")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def pin_factory(name: str) -> Factory | None:
    """A gpiozero pin factory by name: "" = gpiozero's own choice, "mock" = MockFactory.

    ConfigError naming ``pins.pin_factory`` when that library cannot be loaded here.
    """
    if name == "mock":
        from gpiozero.pins.mock import MockFactory, MockPWMPin

        return MockFactory(pin_class=MockPWMPin)
    from gpiozero import Device
    from gpiozero.exc import GPIOZeroError

    try:
        if not name:
            # Chosen now rather than at the first pin, so that a machine with no GPIO library
            # stops with the field named instead of a traceback from deep in the agent.
            Device.ensure_pin_factory()
            return None
        # gpiozero registers its backends as entry points; this is how it chooses them itself.
        return entry_points(group="gpiozero_pin_factories")[name].load()()
    except (ImportError, OSError, RuntimeError, GPIOZeroError) as err:
        raise ConfigError(f'pins.pin_factory = "{name}": no usable GPIO library ({err}); on '
                          'a Pi install python3-lgpio, elsewhere use pin_factory = "mock"'
                          ) from None


def _run(args: argparse.Namespace) -> int:
    from device_agent.agent import Agent
    from device_agent.camera.backends import open_camera
    from device_agent.uplink.client import Uplink
    from device_agent.uplink.outbox import Outbox

    config: Config = load_config(args.config)
    ensure_state_dir(config)
    check_tls_files(config)
    add_json_handler("device_agent")
    threads.install_excepthook(log)
    logging.getLogger("device_agent").setLevel(config.logging.level)
    outbox = Outbox(config.outbox_dir, int(config.outbox.quota_mb * 1024 * 1024))
    uplink = Uplink(config.uplink, config.device.id, outbox, __version__)
    agent = Agent(config, open_camera(config.camera, config.sim), outbox, uplink,
                  pin_factory=pin_factory(config.pins.pin_factory))
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log_event(log, "agent.signal", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    uplink.start()
    agent.start()
    systemd.notify("READY=1")
    try:
        agent.run(stop, tick=systemd.Watchdog().ping)
    finally:
        systemd.notify("STOPPING=1")
        agent.close()
        uplink.stop()
    # A dead thread (logged as thread.crashed): exit with a failure, systemd restarts us.
    return EXIT_FAILED if agent.failed else EXIT_OK


def _assess(args: argparse.Namespace) -> int:
    from device_agent.camera.imagefile import load_image
    from device_agent.camera.quality import ImageError, assess

    thresholds = load_config(args.config).thresholds() if args.config else None
    status = EXIT_OK
    for path in args.images:
        try:
            image = load_image(path, args.max_pixels)
        except ImageError as err:
            print(f"device-agent assess: {err}", file=sys.stderr)
            status = EXIT_BAD_INPUT
            continue
        report = assess(image, thresholds)
        if args.json:
            record = {"path": str(path), "verdict": report.verdict, "reasons": report.reasons,
                      "scores": report.scores}
            print(json.dumps(record), flush=True)
        else:
            why = f" ({', '.join(report.reasons)})" if report.reasons else ""
            print(f"{path}: {report.verdict}{why}", flush=True)
    return status


def _provision(args: argparse.Namespace) -> int:
    from device_agent.provision import ProvisionError, provision

    try:
        report = provision(args.config, args.device_id, args.broker, args.ca, args.clinic_key,
                           cert_path=args.cert, rotate_key=args.rotate_key,
                           gateway_keys=args.gateway_key)
    except ProvisionError as err:
        print(f"device-agent provision: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for line in report.lines:
        print(line)
    print("ready     the device can connect" if report.ready
          else "pending   waiting for the signed certificate")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from device_agent.status import describe, is_live, read_status, status_path

    config = load_config(args.config)
    ensure_state_dir(config, create=False)
    status = read_status(status_path(config.device.state_dir))
    if args.json:
        print(json.dumps({"running": is_live(status), "status": status}))
    else:
        print("\n".join(describe(status)))
    return EXIT_OK if is_live(status) else EXIT_FAILED


def _doctor(args: argparse.Namespace) -> int:
    from dermascope_wire.checks import fit_for_clinical_use
    from device_agent.doctor import run_checks

    checks = run_checks(args.config, pin_factory, probe_broker=not args.no_broker,
                        report_path=args.report)
    fit = fit_for_clinical_use(checks)
    if args.json:
        print(json.dumps({"fit_for_clinical_use": fit,
                          "checks": [c.to_dict() for c in checks]}))
    else:
        for check in checks:
            print(check.line())
        print("\nfit for clinical use" if fit else "\nNOT fit for clinical use: fix the FAIL lines")
    return EXIT_OK if fit else EXIT_FAILED


def _targets_under_the_ring(config: Config, mode: str) -> Targets:
    """The targets from the camera, lit by the ring in ``mode`` at the agent's brightness:
    the light the calibration corrects for, and the light the camera's exposure and white
    balance settle under (picam.py locks them at the first start)."""
    from device_agent.calibrate import from_camera
    from device_agent.camera.backends import open_camera
    from device_agent.feedback.lights import Lights

    pins = config.pins
    lights = Lights(pins.status_led, pins.ring_polarised, pins.ring_plain,
                    pin_factory=pin_factory(pins.pin_factory))
    try:
        lights.illuminate(mode, config.illumination.brightness)
        return from_camera(open_camera(config.camera, config.sim), input)
    finally:
        lights.dark()
        lights.close()


def _calibrate(args: argparse.Namespace) -> int:
    from device_agent.calibrate import (
        load_frames,
        run_calibration,
        summary_lines,
    )
    from device_agent.camera.base import CameraError
    from device_agent.camera.calibration import CalibrationError
    from device_agent.camera.quality import ImageError

    config = load_config(args.config)
    ensure_state_dir(config)  # the calibration is stored there
    try:
        if args.white and args.chart:
            targets = load_frames(args.white, args.chart, args.grey, args.check_chart)
        elif args.white or args.chart or args.grey or args.check_chart:
            print("device-agent calibrate: give --white and --chart (and, for the full "
                  "procedure, --grey and --check-chart), or none of them (then the camera "
                  "is used)", file=sys.stderr)
            return EXIT_BAD_INPUT
        else:
            targets = _targets_under_the_ring(config, args.mode)
        outcome = run_calibration(config, args.mode, targets.white, targets.chart,
                                  args.report, grey=targets.grey,
                                  check_chart=targets.check_chart)
    except (ImageError, CalibrationError, CameraError) as err:
        print(f"device-agent calibrate: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except EOFError:
        print("device-agent calibrate: standard input closed before the targets were "
              "confirmed; run it in a terminal, or give --white and --chart", file=sys.stderr)
        return EXIT_BAD_INPUT
    record = {"calibration_id": outcome.calibration.calibration_id, "mode": args.mode,
              **outcome.figures, "report": str(args.report) if args.report else None}
    if args.json:
        print(json.dumps(record))
    else:
        for line in summary_lines(record["calibration_id"], args.mode, outcome.figures):
            print(line)
        if args.report:
            print(f"report      {args.report}")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    # The simulator is a development install (sim/pyproject.toml), never on a device:
    # imported only when the demo runs.
    try:
        from sim.demo import run_demo
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] not in ("sim", "clinic_gateway"):
            raise
        print("device-agent demo: the demo needs the simulator and the clinic gateway, which "
              "a device does not install: in a clone of the repository, make demo (or pip "
              "install -e '.[dev]' -e ./clinic_gateway -e ./sim)", file=sys.stderr)
        return EXIT_FAILED
    return run_demo(args.out, args.captures, seed=args.seed)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _wipe(args: argparse.Namespace) -> int:
    from device_agent.wipe import WipeRefused, wipe

    try:
        report = wipe(args.config, discard_undelivered=args.discard_undelivered)
    except WipeRefused as err:
        print(f"device-agent wipe: refused: {err}", file=sys.stderr)
        return EXIT_FAILED
    for path in report.removed:
        print(f"removed   {path}")
    if report.discarded:
        print(f"discarded {report.discarded} undelivered capture(s), as asked")
    for path in report.left:
        print(f"left      {path} (not the agent's: remove it yourself if it should go)")
    print("wiped: ask clinic IT to revoke this device's certificate (docs/provisioning.md)")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="device-agent", description="Capture agent of the dermascope."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the device service (systemd starts this)")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    run.set_defaults(func=_run)

    assess = commands.add_parser("assess", help="run the quality checks on image files")
    assess.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    assess.add_argument("--json", action="store_true", help="one JSON object per image")
    assess.add_argument("--config", type=Path, help="take the thresholds from this config")
    assess.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                        metavar="N", help="refuse, undecoded, an image whose header claims more "
                        f"pixels than this (default {DEFAULT_MAX_PIXELS}; Pillow's own guard "
                        "refuses more than about 89 million whatever this says)")
    assess.set_defaults(func=_assess)

    status = commands.add_parser("status", help="what the device is doing now")
    status.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)

    doctor = commands.add_parser("doctor", help="check everything a technician needs")
    doctor.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    doctor.add_argument("--json", action="store_true")
    doctor.add_argument("--no-broker", action="store_true", help="skip the broker connection")
    doctor.add_argument("--report", type=Path, help="write the self-test picture (PNG) here")
    doctor.set_defaults(func=_doctor)

    cal = commands.add_parser("calibrate", help="flat field, white balance and colour")
    cal.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    cal.add_argument("--mode", choices=("polarised", "non_polarised"), default="polarised")
    cal.add_argument("--white", type=Path, help="white-target image (else: the camera)")
    cal.add_argument("--chart", type=Path, help="24-patch chart image (else: the camera)")
    cal.add_argument("--grey", type=Path, help="grey (~20 %%) target image: the flat field "
                     "is checked at that level too")
    cal.add_argument("--check-chart", type=Path, help="the chart turned half a turn: scored "
                     "only, for the held-out Delta E")
    cal.add_argument("--report", type=Path, help="write the calibration report picture here")
    cal.add_argument("--json", action="store_true")
    cal.set_defaults(func=_calibrate)

    prov = commands.add_parser("provision", help="give the device its identity (technician)")
    prov.add_argument("--device-id", required=True)
    prov.add_argument("--broker", required=True, help="host, host:port or mqtts://host:port")
    prov.add_argument("--ca", type=Path, required=True, help="the clinic CA certificate (PEM)")
    prov.add_argument("--clinic-key", type=Path, required=True,
                      help="the clinic's X25519 sealing public key (PEM)")
    prov.add_argument("--gateway-key", type=Path, action="append", default=[],
                      help="the clinic gateway's Ed25519 public key (PEM) that acks and "
                           "commands are signed with; repeat during a key rotation")
    prov.add_argument("--cert", type=Path, help="the device certificate the clinic CA signed")
    prov.add_argument("--rotate-key", action="store_true",
                      help="replace the device key (needs a new certificate afterwards)")
    prov.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    prov.set_defaults(func=_provision)

    wipe = commands.add_parser("wipe", help="decommission: remove keys, identity and state")
    wipe.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    wipe.add_argument("--discard-undelivered", action="store_true",
                      help="destroy accepted captures the clinic has not yet acknowledged")
    wipe.set_defaults(func=_wipe)

    demo = commands.add_parser("demo", help="the whole device end to end on the simulator")
    demo.add_argument("--out", type=Path, default=Path("demo-out"))
    demo.add_argument("--captures", type=int, default=8)
    demo.add_argument("--seed", type=int, default=7)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"device-agent: config error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
