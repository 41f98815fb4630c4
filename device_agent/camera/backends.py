"""Camera backends chosen by name, as gpiozero chooses pin factories.

A backend is an entry point in the group ``device_agent.camera_backends``: its name is what
``camera.backend`` says, its object a callable ``(CameraConfig, SimConfig) -> Camera``, loaded
only when the camera is opened. device-agent registers ``picamera2`` (this module's
:func:`open_picamera2`, which imports picamera2 only when called); the simulator's
distribution registers ``sim``. gpiozero finds its pin factories the same way
(``gpiozero_pin_factories``), so a device carries only the backends installed on it.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

from device_agent.camera.base import Camera
from device_agent.config import CameraConfig, ConfigError, SimConfig

GROUP = "device_agent.camera_backends"


def registered() -> dict[str, EntryPoint]:
    """The camera backends installed here, by name."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def open_camera(camera: CameraConfig, sim: SimConfig) -> Camera:
    """The configured backend, not yet started; ConfigError when it cannot exist here."""
    backends = registered()
    if camera.backend not in backends:  # the config's validation names it first, normally
        raise ConfigError(f"camera.backend: {unknown_backend(camera.backend, backends)}")
    return backends[camera.backend].load()(camera, sim)


def unknown_backend(name: str, backends: dict[str, EntryPoint]) -> str:
    return (f"no camera backend named {name!r} is installed here (installed: "
            f"{', '.join(sorted(backends)) or 'none'}; entry points {GROUP})")


def open_picamera2(camera: CameraConfig, sim: SimConfig) -> Camera:
    """The ``picamera2`` backend: the Raspberry Pi cameras."""
    # Found out now, as a config error naming the field, rather than as a traceback when
    # the agent starts the camera.
    try:
        import picamera2  # noqa: F401
    except ImportError:
        raise ConfigError(
            'camera.backend = "picamera2": picamera2 is not installed (it installs on '
            "Raspberry Pi OS only: apt install python3-picamera2); a developer's machine "
            "runs the simulator's backend, sim, instead") from None
    from device_agent.camera.picam import PicameraCamera
    from device_agent.camera.ring import lores_size

    lores = (lores_size(camera.width, camera.height, camera.lores_width)
             if camera.lores_width else None)
    return PicameraCamera(camera.width, camera.height, camera.fps, lores=lores,
                          main_format=camera.main_format, tuning_file=camera.tuning_file,
                          lock_file=camera.lock_file, settle_s=camera.settle_s)
