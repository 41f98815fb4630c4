"""The agent's one configuration object, read from TOML and validated at start.

Every error names the field (``uplink.port``) and what was expected, so a technician can fix
a config file without reading code. Unknown keys are errors too: a misspelt threshold must
never silently fall back to its default on a medical device.
"""

from __future__ import annotations

import ssl
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from dermascope_wire import seal, signing
from dermascope_wire.validation import (
    ConfigError,
    loads,
    mutual_tls_missing,
    one_or_more,
    read_toml,
    validated,
)

DEFAULT_CONFIG_PATH = Path("/etc/device-agent/config.toml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Port = Annotated[int, Field(ge=1, le=65535)]
Pin = Annotated[int, Field(ge=0, le=53)]


class DeviceConfig(_Section):
    # pydantic runs ``pattern`` on Rust's regex engine, where "$" is the very end of the
    # text (unlike Python's re, where it also matches before a trailing newline):
    # tests/test_identity.py proves "derm-1\n" is refused here and in topic_prefix.
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
    state_dir: Path = Path("/var/lib/device-agent")


class CameraConfig(_Section):
    # The real camera unless a config names the simulator: synthetic frames must never reach
    # a clinic as patient images by default. A name registered in the entry point group
    # device_agent.camera_backends (camera/backends.py): "picamera2"; "sim" where the
    # simulator is installed.
    backend: str = "picamera2"
    width: Annotated[int, Field(ge=64, le=8192)] = 1014
    height: Annotated[int, Field(ge=64, le=8192)] = 760
    fps: Annotated[float, Field(gt=0, le=120)] = 10.0
    # Frames kept for zero-shutter-lag choice, and the window around a press they come from.
    ring_seconds: Annotated[float, Field(gt=0, le=5)] = 1.0
    window_before: Annotated[float, Field(ge=0, le=2)] = 0.3
    window_after: Annotated[float, Field(ge=0, le=1)] = 0.1
    jpeg_quality: Annotated[int, Field(ge=50, le=100)] = 95
    frame_timeout: Annotated[float, Field(gt=0, le=30)] = 2.0
    # A press while the camera is still starting (or waking) waits this long for the first
    # frames, then captures from them, instead of failing with no frame (s).
    start_wait_s: Annotated[float, Field(ge=0, le=30)] = 5.0
    # The format the ring keeps frames in: "RGB888" (BGR in memory, 3 bytes a pixel) or
    # "YUV420" (picamera2's, 1.5 bytes a pixel: twice the frames in the same memory; only
    # the chosen frame is converted to BGR).
    main_format: Literal["RGB888", "YUV420"] = "RGB888"
    # Width of the camera's second, small stream (picamera2's lores, gray) that frame choice
    # scores instead of the full frames; 0 = no lores stream, choice scores the frames.
    lores_width: Annotated[int, Field(ge=0, le=4096)] = 0
    # The most the frame ring may take (MB): ring_seconds x fps + 1 frames of width x height
    # x 3 bytes, plus their lores copies. The default leaves a Pi Zero 2 W (512 MB) room for
    # the system, the agent and the capture it is judging.
    memory_budget_mb: Annotated[float, Field(gt=0, le=65536)] = 128.0
    # Cameras with autofocus: a cycle when the camera starts or wakes, after a "focus"
    # retake, and when the last cycle is older than this (s).
    autofocus_every_s: Annotated[float, Field(gt=0, le=24 * 3600)] = 60.0
    # Stop streaming (and darken the ring) after this long without a gesture; the next
    # press wakes the device. 0 = stream for as long as the agent runs.
    sleep_after_s: Annotated[float, Field(ge=0, le=24 * 3600)] = 300.0
    # The picamera2 backend's colour-fixed camera (docs/operations.md, "Colour calibration").
    # The sensor's libcamera tuning file, loaded with adaptive contrast off: "" = the one
    # named after the sensor (imx477.json for the HQ camera), else a name libcamera's
    # folders hold or an absolute path.
    tuning_file: str = ""
    # Fixed white balance and exposure, stored here by the first camera start that finds
    # none (after AE/AWB settled on the calibration's white target) and used by calibration
    # and capture alike. Keep it in device.state_dir; delete it to settle again, then
    # recalibrate both modes.
    lock_file: Path = Path("/var/lib/device-agent/camera-lock.json")
    # The longest wait for auto exposure and white balance to settle before the lock (s).
    settle_s: Annotated[float, Field(gt=0, le=30)] = 3.0

    @field_validator("backend")
    @classmethod
    def _backend_installed(cls, name: str) -> str:
        from device_agent.camera import backends  # it imports this module

        installed = backends.registered()
        if name not in installed:
            raise ValueError(backends.unknown_backend(name, installed))
        return name

    @model_validator(mode="after")
    def _lores_is_smaller(self) -> CameraConfig:
        if self.main_format == "YUV420" and (self.width % 2 or self.height % 2):
            raise ValueError(f"camera.width and camera.height ({self.width}x{self.height}) "
                             "must be even for camera.main_format = \"YUV420\" (it halves them)")
        if self.lores_width and not 64 <= self.lores_width < self.width:
            raise ValueError(f"camera.lores_width ({self.lores_width}) must be at least 64 and "
                             f"less than camera.width ({self.width}), or 0 for no lores stream")
        return self

    @model_validator(mode="after")
    def _ring_fits_the_budget(self) -> CameraConfig:
        from device_agent.camera.ring import ring_size  # it imports base, which is light

        size = ring_size(self.width, self.height, self.fps, self.ring_seconds,
                         self.lores_width, self.main_format)
        if size.megabytes > self.memory_budget_mb:
            halve = ('use camera.main_format = "YUV420" (half the bytes), '
                     if self.main_format == "RGB888" else "")
            raise ValueError(
                f"camera.memory_budget_mb: the frame ring needs {size.megabytes:.0f} MB "
                f"({size.frames} {self.main_format} frames of {self.width}x{self.height}: "
                f"camera.ring_seconds "
                f"{self.ring_seconds:g} s at camera.fps {self.fps:g}) but "
                f"camera.memory_budget_mb allows {self.memory_budget_mb:g} MB; {halve}shorten "
                "camera.ring_seconds, lower camera.fps, or stream a smaller camera.width x "
                "camera.height (the sensor's 2x2-binned mode), or raise the budget on a device "
                "that has the memory")
        return self

    @model_validator(mode="after")
    def _window_fits_the_ring(self) -> CameraConfig:
        # A window longer than the ring would silently choose among fewer frames.
        if self.window_before + self.window_after > self.ring_seconds:
            raise ValueError(f"camera.window_before + camera.window_after "
                             f"({self.window_before + self.window_after:g} s) exceed "
                             f"camera.ring_seconds ({self.ring_seconds:g} s), the frames kept")
        return self


class SimConfig(_Section):
    seed: int = 1
    # Defect of the simulated scene at start; the demo and tests change it per press.
    defect: str | None = None
    severity: Annotated[float, Field(ge=0)] = 1.0
    # The simulated camera has an autofocus lens (as the Camera Module 3), else fixed focus.
    autofocus: bool = False
    # Seconds from starting the simulated camera to its first frame (a real sensor takes
    # most of a second to start and settle its exposure).
    start_delay_s: Annotated[float, Field(ge=0, le=10)] = 0.0
    # Draw the scene this wide and scale it up to camera.width x camera.height, as a large
    # sensor behind a soft lens; 0 = draw at the camera's size. A 12 MP simulated sensor
    # needs it: drawing 12 MP takes seconds a frame.
    render_width: Annotated[int, Field(ge=0, le=8192)] = 0


class PinsConfig(_Section):
    """BCM pin numbers of the board."""

    button: Pin = 17
    status_led: Pin = 27
    ring_polarised: Pin = 12
    ring_plain: Pin = 13
    # "mock" = gpiozero's MockFactory (the simulator board); "" = gpiozero's default.
    pin_factory: Literal["", "mock", "lgpio", "rpigpio", "pigpio", "native"] = ""

    @model_validator(mode="after")
    def _distinct_pins(self) -> PinsConfig:
        # One GPIO driving two functions fails at start with gpiozero's GPIOPinInUse, far
        # from the config line that caused it.
        seen: dict[int, str] = {}
        for name in ("button", "status_led", "ring_polarised", "ring_plain"):
            pin = getattr(self, name)
            if pin in seen:
                raise ValueError(f"pins.{seen[pin]} and pins.{name} both use GPIO {pin}; "
                                 "each function needs its own pin")
            seen[pin] = name
        return self


class ButtonConfig(_Section):
    bounce_time: Annotated[float, Field(ge=0, le=0.5)] = 0.02
    hold_time: Annotated[float, Field(gt=0, le=10)] = 1.5
    double_press_window: Annotated[float, Field(ge=0, le=2)] = 0.4
    override_window: Annotated[float, Field(gt=0, le=120)] = 15.0


class IlluminationConfig(_Section):
    # "pair" takes a polarised and a non-polarised image on every press, linked.
    mode: Literal["polarised", "non_polarised", "pair"] = "polarised"
    brightness: Annotated[float, Field(ge=0.05, le=1)] = 0.8
    # What the DICOM Dermoscopic Image module records about the optics.
    magnification: Annotated[float, Field(gt=0, le=200)] = 10.0
    # The medium between lens and skin, as the standard enumerates it; "NONE" is a dry
    # contact, which the standard has no value for (the DICOM export leaves it empty).
    immersion_media: Literal["NONE", "ULTRASOUND_GEL", "ALCOHOL", "WATER", "MINERAL_OIL",
                             "PLASTIC_CAP"] = "NONE"
    # Colour temperature of the ring's LEDs (kelvin), from their datasheet; unset: unknown.
    emitter_colour_temperature_k: Annotated[float, Field(ge=1000, le=20000)] | None = None


class CaseConfig(_Section):
    # An open case closes by itself after this long without a close_case command.
    timeout_s: Annotated[float, Field(gt=0, le=7 * 24 * 3600)] = 4 * 3600.0


class OutboxConfig(_Section):
    quota_mb: Annotated[float, Field(gt=0)] = 512.0


class UplinkConfig(_Section):
    host: str = "127.0.0.1"
    port: Port = 1883
    protocol: Literal["mqtt5", "mqtt311"] = "mqtt5"
    topic_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")] = "derm/v1"
    chunk_size: Annotated[int, Field(ge=1024, le=256 * 1024 * 1024)] = 64 * 1024
    keepalive: Annotated[int, Field(ge=5, le=3600)] = 30
    ack_timeout: Annotated[float, Field(gt=0, le=3600)] = 30.0
    retry_min: Annotated[float, Field(gt=0, le=600)] = 0.5
    retry_max: Annotated[float, Field(gt=0, le=3600)] = 60.0
    heartbeat_interval: Annotated[float, Field(gt=0, le=3600)] = 60.0
    # Mutual TLS: the clinic CA (verifies the broker), the device's certificate and key.
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # Plain MQTT without TLS: for a developer's bench only; logged as a warning at every start.
    insecure_dev_mode: bool = False

    @property
    def tls(self) -> bool:
        return self.ca_file is not None

    @model_validator(mode="after")
    def _retry_range(self) -> UplinkConfig:
        if self.retry_min > self.retry_max:
            raise ValueError(f"uplink.retry_min ({self.retry_min:g}) is greater than "
                             f"uplink.retry_max ({self.retry_max:g})")
        return self


class SecurityConfig(_Section):
    # The clinic's X25519 public key (PEM): every capture is sealed to it before it is stored.
    clinic_public_key: Path | None = None
    # The clinic gateway's Ed25519 public key(s) (PEM) that acks and commands must be signed
    # with; one path or a list (during a rotation, the old and the new key).
    gateway_public_key: list[Path] = []
    # A developer's bench: a key that is not configured is not required. Without a clinic
    # key captures are stored and sent unsealed; without a gateway key unsigned acks and
    # commands are accepted. Doctor reports such a device as not fit for clinical use.
    insecure_dev_mode: bool = False

    _listed = field_validator("gateway_public_key", mode="before")(one_or_more)

    # Read now, so a wrong path stops the start with the field named instead of failing at
    # the first capture (a KeyFileError is a ValueError: pydantic names the field).
    _signing_keys_load = field_validator("gateway_public_key")(loads(signing.load_public_key))
    _clinic_key_loads = field_validator("clinic_public_key")(loads(seal.load_public_key))


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Config(_Section):
    device: DeviceConfig
    camera: CameraConfig = CameraConfig()
    sim: SimConfig = SimConfig()
    pins: PinsConfig = PinsConfig()
    button: ButtonConfig = ButtonConfig()
    illumination: IlluminationConfig = IlluminationConfig()
    case: CaseConfig = CaseConfig()
    quality: dict[str, float] = {}
    outbox: OutboxConfig = OutboxConfig()
    uplink: UplinkConfig = UplinkConfig()
    security: SecurityConfig = SecurityConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _transport_is_secure_or_declared_insecure(self) -> Config:
        up = self.uplink
        missing = mutual_tls_missing("uplink", {"ca_file": up.ca_file, "cert_file": up.cert_file,
                                                "key_file": up.key_file})
        if missing and not up.insecure_dev_mode:
            raise ValueError("uplink: no TLS configured; run device-agent provision (it sets "
                             "ca_file, cert_file, key_file), or set insecure_dev_mode = true "
                             "on a developer's bench only")
        return self

    @model_validator(mode="after")
    def _sealed_or_declared_unsealed(self) -> Config:
        # Checked here, not in SecurityConfig, so that the section's default can exist.
        sec = self.security
        if sec.clinic_public_key is None and not sec.insecure_dev_mode:
            raise ValueError("security.clinic_public_key: no clinic key configured, captures "
                             "would leave unsealed; run device-agent provision (it sets it), or "
                             "set security.insecure_dev_mode = true on a developer's bench only")
        if not sec.gateway_public_key and not sec.insecure_dev_mode:
            raise ValueError("security.gateway_public_key: no gateway signing key configured, "
                             "acks and commands could not be authenticated; run device-agent "
                             "provision with --gateway-key (it sets it), or set "
                             "security.insecure_dev_mode = true on a developer's bench only")
        if sec.clinic_public_key is not None and sec.gateway_public_key and sec.insecure_dev_mode:
            # A leftover of a bench: with both keys it changes nothing, yet doctor would call
            # the device unfit and an auditor would read it as an opt-out.
            raise ValueError("security.insecure_dev_mode = true contradicts "
                             "security.clinic_public_key and security.gateway_public_key (both "
                             "keys are configured); remove it")
        return self

    @field_validator("quality")
    @classmethod
    def _known_thresholds(cls, value: dict[str, float]) -> dict[str, float]:
        from device_agent.camera.quality import Thresholds

        known = {f.name for f in fields(Thresholds)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(
                f"unknown threshold(s) {', '.join(unknown)}; expected some of: "
                + ", ".join(sorted(known))
            )
        return value

    def thresholds(self):  # -> device_agent.camera.quality.Thresholds
        from device_agent.camera.quality import Thresholds

        return Thresholds(**self.quality)

    @property
    def outbox_dir(self) -> Path:
        return self.device.state_dir / "outbox"


def parse_config(data: dict, source: str = "<config>") -> Config:
    return validated(Config, data, source)


def load_config(path: Path) -> Config:
    """Read and validate a TOML config file; raise ConfigError naming the bad field."""
    return parse_config(read_toml(path), str(path))


def ensure_state_dir(config: Config, create: bool = True) -> Path:
    """Create ``device.state_dir`` if needed and prove it writable; ConfigError otherwise.

    Kept out of parsing because it touches the file system: commands that write state call it
    as they start, so a bad folder stops them with the field named, not a traceback later.
    With ``create`` false (commands that only read state) a folder not yet made is fine,
    one that cannot be a folder is not.
    """
    folder = config.device.state_dir
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"device.state_dir: {folder} exists but is not a directory")
    if not create:
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"device.state_dir: cannot create {folder}: "
                          f"{err.strerror or err}") from None
    try:
        # A real file: the one test that holds for every user, ACL and mount option.
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ConfigError(f"device.state_dir: cannot write in {folder}: "
                          f"{err.strerror or err}") from None
    return folder


def check_tls_files(config: Config) -> None:
    """Load the uplink's CA, certificate and key as the MQTT client will; ConfigError naming
    the field otherwise.

    Not part of parsing: provisioning writes a valid config before the clinic has signed the
    certificate. ``run`` calls it as it starts, so a missing file stops the service at once
    instead of killing the uplink's thread on its first connection.
    """
    up = config.uplink
    if not up.tls:
        return
    context = ssl.create_default_context()
    for field, path in (("ca_file", up.ca_file), ("cert_file", up.cert_file),
                        ("key_file", up.key_file)):
        try:
            with open(path, "rb"):
                pass
        except OSError as err:
            raise ConfigError(f"uplink.{field}: cannot read {path}: "
                              f"{err.strerror or err}") from None
    try:
        context.load_verify_locations(cafile=str(up.ca_file))
    except ssl.SSLError as err:
        raise ConfigError(f"uplink.ca_file: {up.ca_file} is not a PEM certificate "
                          f"({err.reason or err})") from None
    try:
        # An empty password: an encrypted key fails here instead of prompting on a terminal.
        context.load_cert_chain(str(up.cert_file), str(up.key_file), password="")
    except ssl.SSLError as err:
        raise ConfigError(f"uplink.cert_file, uplink.key_file: {up.cert_file} and "
                          f"{up.key_file} are not a PEM certificate and its unencrypted "
                          f"private key ({err.reason or err})") from None
