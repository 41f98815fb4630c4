"""Camera backends chosen by name, as gpiozero chooses pin factories."""

from __future__ import annotations

from device_agent.camera.base import Camera
from device_agent.config import CameraConfig, SimConfig


def open_camera(camera: CameraConfig, sim: SimConfig) -> Camera:
    """The configured backend, not yet started."""
    if camera.backend == "picamera2":
        from device_agent.camera.picam import PicameraCamera

        return PicameraCamera(camera.width, camera.height, camera.fps)
    from sim.camera import SimCamera

    return SimCamera(
        camera.width, camera.height, camera.fps, seed=sim.seed, defect=sim.defect,
        severity=sim.severity, autofocus=sim.autofocus,
    )
