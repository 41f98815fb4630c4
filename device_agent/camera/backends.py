"""Camera backends chosen by name, as gpiozero chooses pin factories."""

from __future__ import annotations

from device_agent.camera.base import Camera
from device_agent.config import CameraConfig, ConfigError, SimConfig


def open_camera(camera: CameraConfig, sim: SimConfig) -> Camera:
    """The configured backend, not yet started; ConfigError when it cannot exist here."""
    if camera.backend == "picamera2":
        # Found out now, as a config error naming the field, rather than as a traceback when
        # the agent starts the camera.
        try:
            import picamera2  # noqa: F401
        except ImportError:
            raise ConfigError(
                'camera.backend = "picamera2": picamera2 is not installed (it installs on '
                "Raspberry Pi OS only: apt install python3-picamera2); a developer's machine "
                'needs camera.backend = "sim"') from None
        from device_agent.camera.picam import PicameraCamera

        return PicameraCamera(camera.width, camera.height, camera.fps)
    from sim.camera import SimCamera

    return SimCamera(
        camera.width, camera.height, camera.fps, seed=sim.seed, defect=sim.defect,
        severity=sim.severity, autofocus=sim.autofocus,
    )
