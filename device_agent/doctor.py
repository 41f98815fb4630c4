"""``device-agent doctor``: every check a technician needs, one clear line each.

Each check says ok, warn or fail, what it saw, and for anything not ok what to do. The
device is fit for clinical use when nothing fails. While the service runs it holds the
camera and the pins, so their checks read the running agent's live status instead of
opening the hardware a second time.
"""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from dermascope_wire.checks import CERT_WARN_DAYS, Check
from dermascope_wire.seal import KeyFileError, load_public_key
from dermascope_wire.sockets import mqtt_connects
from device_agent.camera.metadata import clock_synced
from device_agent.config import Config, ConfigError, ensure_state_dir, load_config
from device_agent.status import is_live, read_status, status_path

DISK_WARN_BYTES = 1 << 30
DISK_FAIL_BYTES = 100 << 20
OUTBOX_WARN_AGE = 24 * 3600.0


# -- the checks ---------------------------------------------------------------------------
def check_camera(config: Config, live: dict | None, seen: list[np.ndarray]) -> Check:
    """``seen`` receives the last frame when the camera is opened directly."""
    expected = config.camera.fps
    if live is not None:
        camera = live.get("camera", {})
        fps = float(camera.get("fps", 0.0))
        source = "running agent"
        if camera.get("asleep"):
            return Check("camera", "ok", f"{camera.get('model')} asleep after idling "
                         "(a press wakes it)")
    else:
        try:
            fps, found, model = _probe_camera(config, seen)
        except ConfigError as err:
            return Check("camera", "fail", str(err), "install picamera2 (apt) on the Pi")
        camera = {"streaming": fps > 0, "model": model}
        source = "opened directly"
        if fps > 0 and not found:
            return Check("camera", "warn", f"{model} streams {fps:.1f} fps but no lens field is "
                         "seen", "put the lens on skin or the white target and check again")
    if not camera.get("streaming"):
        return Check("camera", "fail", f"no frames ({source})",
                     "check the camera ribbon cable and `rpicam-hello --list-cameras`")
    if fps < 0.7 * expected:
        return Check("camera", "warn", f"{camera.get('model')} at {fps:.1f} fps, configured "
                     f"{expected:g} ({source})", "lower camera.width/height or check CPU load")
    return Check("camera", "ok", f"{camera.get('model')} streaming at {fps:.1f} fps ({source})")


def check_backend(config: Config) -> Check | None:
    """Synthetic frames must never pass for a patient's skin."""
    if config.camera.backend == "sim":
        return Check("backend", "fail", "simulated camera: not fit for clinical use",
                     'set camera.backend = "picamera2" (device-agent provision writes it)')
    return None


def _probe_camera(config: Config, seen: list[np.ndarray], seconds: float = 2.0
                  ) -> tuple[float, bool, str]:
    """Open the camera, read for ``seconds``: (fps, lens field found, model)."""
    from device_agent.camera.backends import open_camera
    from device_agent.camera.base import CameraError
    from device_agent.camera.lens import find_lens_field

    camera = open_camera(config.camera, config.sim)
    stamps: list[float] = []
    last = None
    try:
        with camera:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                last = camera.next_frame(config.camera.frame_timeout)
                stamps.append(last.timestamp)
    except CameraError:
        return 0.0, False, camera.model
    if len(stamps) < 2 or last is None:
        return 0.0, False, camera.model
    fps = (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-6)
    seen.append(last.image)
    field = find_lens_field(last.image)
    return fps, bool(field and field.found), camera.model


def check_pins(config: Config, live: dict | None,
               pin_factory: Callable[[str], object]) -> list[Check]:
    if live is not None:
        detail = f"in use by the running agent (LED shows {live.get('signal')})"
        return [Check("leds", "ok", detail), Check("button", "ok", detail)]
    from gpiozero import LED, PWMLED, Button
    from gpiozero.exc import GPIOZeroError

    try:
        factory = pin_factory(config.pins.pin_factory)
    except ConfigError as err:
        return [Check("leds", "fail", str(err), "fix pins.pin_factory"),
                Check("button", "fail", "not read: no GPIO library", "fix pins.pin_factory")]
    pins = config.pins
    checks = []
    try:
        devices = [LED(pins.status_led, pin_factory=factory),
                   PWMLED(pins.ring_polarised, pin_factory=factory),
                   PWMLED(pins.ring_plain, pin_factory=factory)]
        for device in devices:
            device.on()
            device.off()
            device.close()
        checks.append(Check("leds", "ok", f"status LED (GPIO {pins.status_led}) and ring "
                            f"(GPIO {pins.ring_polarised}, {pins.ring_plain}) drive"))
    except GPIOZeroError as err:
        checks.append(Check("leds", "fail", f"cannot drive the LEDs: {err}",
                            "check [pins] and that nothing else holds the pins"))
    try:
        button = Button(pins.button, pull_up=True, pin_factory=factory)
        stuck = button.is_pressed
        button.close()
        checks.append(Check("button", "fail", f"GPIO {pins.button} reads pressed at rest",
                            "the button is stuck or wired to the wrong pin") if stuck else
                      Check("button", "ok", f"GPIO {pins.button} released at rest"))
    except GPIOZeroError as err:
        checks.append(Check("button", "fail", f"cannot read the button: {err}",
                            "check pins.button"))
    return checks


def check_tls(config: Config) -> Check:
    up = config.uplink
    if not up.tls:  # the config allows this only with insecure_dev_mode
        return Check("tls", "warn", "plain MQTT (insecure_dev_mode): development only",
                     "provision the device (device-agent provision) for a clinic")
    try:
        ca = x509.load_pem_x509_certificate(up.ca_file.read_bytes())
        cert = x509.load_pem_x509_certificate(up.cert_file.read_bytes())
    except (OSError, ValueError) as err:
        return Check("tls", "fail", f"cannot read the CA or device certificate: {err}",
                     "run device-agent provision with --cert")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return Check("tls", "fail", "device certificate is not signed by the configured CA",
                     "install the certificate the clinic CA signed")
    days = (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds() / 86400
    if days < 0:
        return Check("tls", "fail", f"device certificate expired {-days:.0f} days ago",
                     "renew it: docs/provisioning.md, certificate renewal")
    if days < CERT_WARN_DAYS:
        return Check("tls", "warn", f"device certificate expires in {days:.0f} days",
                     "renew it soon: docs/provisioning.md")
    return Check("tls", "ok", f"chain verifies; certificate valid {days:.0f} more days")


def check_broker(config: Config, timeout: float = 5.0) -> Check:
    up = config.uplink
    where = f"{up.host}:{up.port}"
    try:
        with socket.create_connection((up.host, up.port), timeout=timeout):
            pass
    except OSError as err:
        return Check("broker", "fail", f"{where} unreachable: {err}",
                     "check the network and uplink.host/port")
    tls = ({"ca_certs": str(up.ca_file), "certfile": str(up.cert_file),
            "keyfile": str(up.key_file)} if up.tls else None)
    problem = mqtt_connects(up.host, up.port, client_id=f"{config.device.id}-doctor",
                            mqtt5=up.protocol == "mqtt5", tls=tls, timeout=timeout)
    if problem is not None:
        return Check("broker", "fail", f"{where}: MQTT/TLS {problem}",
                     "check the device certificate, the broker's CA and the broker ACL")
    return Check("broker", "ok", f"{where} accepts this device")


def check_sealing(config: Config) -> Check:
    path = config.security.clinic_public_key
    if path is None:  # the config allows this only with security.insecure_dev_mode
        return Check("sealing", "fail", "captures unsealed (security.insecure_dev_mode): not "
                     "fit for clinical use", "run device-agent provision with --clinic-key")
    try:
        load_public_key(path)
    except KeyFileError as err:
        return Check("sealing", "fail", str(err), "re-run device-agent provision")
    return Check("sealing", "ok", f"captures sealed to the clinic key {path.name}")


CALIBRATION_WARN_DAYS = 180
DELTA_E_WARN = 2.0  # held-out mean Delta E 2000: the colour goal
FLAT_WARN = 0.02


def check_calibration(config: Config) -> Check:
    from device_agent.camera.calibration import (
        CalibrationError,
        calibration_path,
        load_calibration,
    )

    try:
        calibration = load_calibration(calibration_path(config.device.state_dir))
    except CalibrationError as err:
        return Check("calibration", "fail", str(err), "calibrate again: device-agent calibrate")
    if calibration is None:
        return Check("calibration", "warn", "never calibrated: colours are uncorrected",
                     "device-agent calibrate with the calibration cap")
    mode = config.illumination.mode
    missing = [m for m in ("polarised", "non_polarised") if m not in calibration.modes]
    age = calibration.age_days()
    # The held-out figure (patches the fit did not see), never the fit's own.
    held = [m.heldout_delta_e_mean for m in calibration.modes.values()]
    unscored = any(h is None for h in held)
    worst = max((h for h in held if h is not None), default=None)
    flat = [v for m in calibration.modes.values()
            for v in (m.flat_white_worst_sector, m.flat_grey_worst_sector) if v is not None]
    methods = sorted({m.heldout_method for m in calibration.modes.values() if m.heldout_method})
    detail = (f"{calibration.calibration_id}, {age:.0f} days old, "
              + ("no held-out Delta E (calibrated before it was measured)" if worst is None
                 else f"held-out mean Delta E {worst:.2f} ({', '.join(methods)})")
              + (f", flat field worst sector {100 * max(flat):.1f} %" if flat else "")
              + (f"; {', '.join(missing)} not calibrated" if missing else ""))
    if (mode in missing or age > CALIBRATION_WARN_DAYS or unscored
            or (worst is not None and worst > DELTA_E_WARN)
            or (flat and max(flat) > FLAT_WARN)):
        return Check("calibration", "warn", detail, "calibrate again: device-agent calibrate")
    return Check("calibration", "ok", detail)


def check_clock() -> Check:
    if clock_synced():
        return Check("clock", "ok", "synchronised (timesyncd)")
    return Check("clock", "warn", "not known to be synchronised: capture times may be off",
                 "check `timedatectl` and network time")


def check_disk(config: Config, live: dict | None) -> list[Check]:
    folder = config.device.state_dir
    try:
        ensure_state_dir(config, create=False)
    except ConfigError as err:
        return [Check("disk", "fail", str(err), "fix device.state_dir")]
    probe = folder if folder.exists() else folder.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError as err:
        return [Check("disk", "fail", f"{folder}: {err.strerror}", "check the SD card")]
    gb = free / (1 << 30)
    if free < DISK_FAIL_BYTES:
        disk = Check("disk", "fail", f"{gb:.2f} GB free", "free space on the SD card")
    elif free < DISK_WARN_BYTES:
        disk = Check("disk", "warn", f"{gb:.2f} GB free", "free space soon")
    else:
        disk = Check("disk", "ok", f"{gb:.1f} GB free")
    if live is None:
        return [disk, Check("outbox", "warn", "agent not running: figures unknown",
                            "start the service: systemctl start device-agent")]
    box = live.get("outbox", {})
    oldest = box.get("oldest_created")
    age = time.time() - oldest if oldest else 0.0
    detail = (f"{box.get('depth', 0)} waiting, {box.get('used_bytes', 0) / 1e6:.1f} of "
              f"{box.get('quota_bytes', 0) / 1e6:.0f} MB, {box.get('quarantined', 0)} "
              "quarantined")
    if box.get("quarantined"):
        return [disk, Check("outbox", "warn", detail,
                            "send the quarantine folder to support; nothing else is blocked")]
    if age > OUTBOX_WARN_AGE:
        return [disk, Check("outbox", "warn", f"{detail}; oldest waits {age / 3600:.0f} h",
                            "check the uplink and the clinic gateway")]
    return [disk, Check("outbox", "ok", detail)]


def run_checks(config_path: Path, pin_factory: Callable[[str], object],
               probe_broker: bool = True, report_path: Path | None = None) -> list[Check]:
    try:
        config = load_config(config_path)
    except ConfigError as err:
        return [Check("config", "fail", str(err), "fix the named field")]
    checks = [Check("config", "ok", f"{config_path} valid (device {config.device.id})")]
    status = read_status(status_path(config.device.state_dir))
    live = status if is_live(status) else None
    checks.append(Check("service", "ok", f"running (pid {live.get('pid')})") if live else
                  Check("service", "warn", "agent not running",
                        "systemctl start device-agent (hardware is tested directly meanwhile)"))
    seen: list[np.ndarray] = []
    backend = check_backend(config)
    if backend is not None:
        checks.append(backend)
    checks.append(check_camera(config, live, seen))
    checks.extend(check_pins(config, live, pin_factory))
    checks.append(check_tls(config))
    if probe_broker:
        checks.append(check_broker(config))
    checks.append(check_sealing(config))
    checks.append(check_calibration(config))
    checks.append(check_clock())
    checks.extend(check_disk(config, live))
    if report_path is not None:
        checks.append(_self_test_picture(config, seen, report_path))
    return checks


def _self_test_picture(config: Config, seen: list[np.ndarray], path: Path) -> Check:
    from device_agent.camera.quality import assess
    from device_agent.report import write_report

    if not seen:
        return Check("report", "warn", "no frame to draw: the running agent holds the camera",
                     "stop the service to take a self-test picture")
    image = seen[-1]
    stamp = dt.datetime.now(dt.UTC)
    try:
        write_report(path, image, assess(image, config.thresholds()),
                     f"self-test  {config.device.id}  {stamp:%Y-%m-%d %H:%M} UTC")
    except OSError as err:
        return Check("report", "fail", str(err), "check the path")
    return Check("report", "ok", f"self-test picture written to {path}")
