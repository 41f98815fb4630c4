"""The picamera2 backend against a faithful fake of the Picamera2 calls it makes."""

import json
import sys
import time

import numpy as np
import pytest

from device_agent.camera.base import CameraError, FrameTimeout
from device_agent.camera.picam import ExposureLock, PicameraCamera
from tests.fake_picamera2 import AE_SETTLED, AWB_SETTLED, GAMMA_CURVE, FakePicamera2

STORED = ExposureLock((2.25, 1.45), 12345, 2.0)


def fake_class(**fake_kwargs):
    """A Picamera2 stand-in class (picamera2's static methods included) that records the
    cameras it opens."""
    opened: list[FakePicamera2] = []

    class Fake(FakePicamera2):
        def __init__(self, num: int = 0, tuning=None) -> None:
            super().__init__(num, tuning=tuning, **fake_kwargs)
            opened.append(self)

    return Fake, opened


def make(*, lock=STORED, lock_file=None, tuning_file="", **fake_kwargs):
    factory, opened = fake_class(**fake_kwargs)
    return PicameraCamera(640, 480, 10.0, factory=factory, lock=lock, lock_file=lock_file,
                          tuning_file=tuning_file), opened


def contrast(tuning: dict) -> dict:
    return FakePicamera2.find_tuning_algo(tuning, "rpi.contrast")


def test_streams_bgr_frames_with_metadata_and_releases_every_request():
    camera, opened = make()
    with camera:
        fake = opened[0]
        assert fake.config["main"] == {"format": "RGB888", "size": (640, 480)}
        assert fake.config["controls"]["FrameRate"] == 10.0
        frames = [camera.next_frame(timeout=1.0) for _ in range(3)]
        assert fake.outstanding == 0
    assert camera.model == "imx477"
    assert fake.closed
    assert not fake.started
    first = frames[0]
    assert first.image.shape == (480, 640, 3)
    assert first.image.dtype == np.uint8
    assert first.metadata["ExposureTime"] == STORED.exposure_time_us
    assert abs(first.timestamp - time.monotonic()) < 60  # the monotonic clock, in seconds
    assert [f.sequence for f in frames] == [1, 2, 3]
    assert frames[0].timestamp <= frames[1].timestamp <= frames[2].timestamp


def test_a_stalled_sensor_times_out_and_flushes_the_waiting_job():
    camera, opened = make(frames=1)
    with camera:
        camera.next_frame(timeout=1.0)
        with pytest.raises(FrameTimeout, match=r"within 0\.2 s"):
            camera.next_frame(timeout=0.2)
        assert opened[0].flushed == 1
        assert opened[0].outstanding == 0


def test_autofocus_runs_only_on_cameras_that_have_it():
    fixed, _ = make()
    with fixed:
        assert fixed.autofocus(timeout=1.0) is False
    af, _opened = make(model="imx708", autofocus=True)
    with af:
        assert af.autofocus(timeout=1.0) is True
        assert af.next_frame(timeout=1.0).metadata["LensPosition"] == 7.5


def test_missing_camera_is_a_clear_error():
    camera = PicameraCamera(640, 480, 10.0, camera_num=3, factory=FakePicamera2, lock=STORED)
    with pytest.raises(CameraError, match="cannot open camera 3"):
        camera.start()


def test_reading_before_start_is_an_error():
    camera, _ = make()
    with pytest.raises(CameraError, match="not started"):
        camera.next_frame(timeout=0.1)


def test_without_picamera2_installed_the_error_says_what_to_do():
    camera = PicameraCamera(640, 480, 10.0)  # the real import: picamera2 is not on this machine
    with pytest.raises(CameraError, match="Raspberry Pi OS"):
        camera.start()


def test_the_camera_opens_with_the_sensors_tuning_with_adaptive_contrast_off():
    """Adaptive contrast enhancement bends the tone curve per scene: off, so the one fixed
    gamma curve the calibration measured holds on every capture."""
    camera, opened = make()
    with camera:
        tuning = opened[0].tuning
    assert tuning is not None, "the camera was opened with libcamera's default tuning"
    assert contrast(tuning)["ce_enable"] == 0
    assert contrast(tuning)["gamma_curve"] == GAMMA_CURVE
    # the rest of the sensor's file is untouched
    loaded = FakePicamera2.load_tuning_file("imx477.json")
    assert [list(a) for a in tuning["algorithms"]] == [list(a) for a in loaded["algorithms"]]
    assert FakePicamera2.find_tuning_algo(tuning, "rpi.agc") == FakePicamera2.find_tuning_algo(
        loaded, "rpi.agc")


def test_the_tuning_file_follows_the_sensor_model_or_the_config(tmp_path, monkeypatch):
    monkeypatch.setattr(FakePicamera2, "attached_models", ("imx708",))
    camera, opened = make(model="imx708")
    with camera:
        ccm = FakePicamera2.find_tuning_algo(opened[0].tuning, "rpi.ccm")
        assert ccm == FakePicamera2.find_tuning_algo(
            FakePicamera2.load_tuning_file("imx708.json"), "rpi.ccm")
        assert ccm != FakePicamera2.find_tuning_algo(
            FakePicamera2.load_tuning_file("imx477.json"), "rpi.ccm")
    own = FakePicamera2.load_tuning_file("imx477.json")
    contrast(own)["gamma_curve"] = [0, 0, 65535, 65535]
    path = tmp_path / "derm-imx477.json"
    path.write_text(json.dumps(own))
    camera, opened = make(tuning_file=str(path))
    with camera:
        assert contrast(opened[0].tuning) == {"ce_enable": 0, "gamma_curve": [0, 0, 65535, 65535]}


@pytest.mark.parametrize("name", ["imx999.json", "/nowhere/imx477.json"])
def test_a_tuning_file_that_cannot_be_loaded_names_the_field(name):
    camera, opened = make(tuning_file=name)
    with pytest.raises(CameraError, match=r"camera\.tuning_file.*" + name.replace(".", r"\.")):
        camera.start()
    assert opened == []  # refused before the camera was opened


def test_a_tuning_file_without_a_contrast_algorithm_is_refused(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"version": 2.0, "algorithms": [{"rpi.agc": {}}]}))
    camera, _ = make(tuning_file=str(path))
    with pytest.raises(CameraError, match=r"camera\.tuning_file.*rpi\.contrast"):
        camera.start()


def test_a_stored_lock_fixes_white_balance_and_exposure_from_the_first_frame(tmp_path):
    lock_file = tmp_path / "camera-lock.json"
    lock_file.write_text(json.dumps(STORED.to_dict()))
    camera, opened = make(lock=None, lock_file=lock_file)
    with camera:
        fake = opened[0]
        controls = fake.config["controls"]
        assert controls["AwbEnable"] is False
        assert controls["AeEnable"] is False
        frames = [camera.next_frame(timeout=1.0) for _ in range(3)]
    assert camera.locked == STORED
    for frame in frames:  # the fake's AE/AWB would still be converging: these are fixed
        assert tuple(frame.metadata["ColourGains"]) == STORED.colour_gains
        assert frame.metadata["ExposureTime"] == STORED.exposure_time_us
        assert frame.metadata["AnalogueGain"] == STORED.analogue_gain
    assert json.loads(lock_file.read_text()) == STORED.to_dict()  # kept as it was


def test_without_a_stored_lock_the_camera_settles_locks_and_stores_it(tmp_path):
    lock_file = tmp_path / "state" / "camera-lock.json"
    camera, opened = make(lock=None, lock_file=lock_file)
    with camera:
        fake = opened[0]
        assert fake.set_controls_calls, "AE/AWB were never locked"
        assert fake.set_controls_calls[-1] == {
            "AwbEnable": False, "AeEnable": False, "ColourGains": AWB_SETTLED,
            "ExposureTime": AE_SETTLED[0], "AnalogueGain": AE_SETTLED[1]}
        frame = camera.next_frame(timeout=1.0)
    assert camera.locked == ExposureLock(AWB_SETTLED, *AE_SETTLED)
    assert frame.metadata["ExposureTime"] == AE_SETTLED[0]
    assert ExposureLock.from_dict(json.loads(lock_file.read_text())) == camera.locked
    # The next start (capture, or the other mode's calibration) runs under the same lock.
    again, opened = make(lock=None, lock_file=lock_file)
    with again:
        assert opened[0].set_controls_calls == []
        assert opened[0].config["controls"]["ExposureTime"] == AE_SETTLED[0]
    assert again.locked == camera.locked


def test_a_scene_that_never_settles_is_locked_after_a_bounded_wait():
    factory, opened = fake_class(settle_frames=None)
    camera = PicameraCamera(640, 480, 30.0, factory=factory, settle_s=0.3)
    with camera:
        assert camera.locked is not None
        assert opened[0].set_controls_calls[-1]["AeEnable"] is False
        # bounded in frames too: 0.3 s at 30 fps
        assert opened[0]._sequence <= 11


def test_a_malformed_lock_file_names_the_field(tmp_path):
    lock_file = tmp_path / "camera-lock.json"
    lock_file.write_text('{"colour_gains": [1.0]}')
    camera, _ = make(lock=None, lock_file=lock_file)
    with pytest.raises(CameraError, match=r"camera\.lock_file .*malformed"):
        camera.start()


def test_the_configured_backend_uses_the_configs_tuning_file_and_lock_file(tmp_path,
                                                                           monkeypatch):
    """From the config through the backend's entry point to the camera: the tuning file and
    the lock file the config names are the ones used."""
    import types

    from device_agent.camera.backends import open_camera
    from device_agent.config import CameraConfig, SimConfig

    factory, opened = fake_class()
    monkeypatch.setitem(sys.modules, "picamera2", types.SimpleNamespace(Picamera2=factory))
    lock_file = tmp_path / "state" / "camera-lock.json"
    camera = open_camera(CameraConfig(backend="picamera2", width=640, height=480,
                                      tuning_file="imx708.json", lock_file=lock_file,
                                      settle_s=2.0), SimConfig())
    with camera:
        assert FakePicamera2.find_tuning_algo(opened[0].tuning, "rpi.ccm") == (
            FakePicamera2.find_tuning_algo(FakePicamera2.load_tuning_file("imx708.json"),
                                           "rpi.ccm"))
    assert ExposureLock.from_dict(json.loads(lock_file.read_text())) == ExposureLock(
        AWB_SETTLED, *AE_SETTLED)
    with pytest.raises(CameraError, match=r"camera\.tuning_file.*'imx000\.json'"):
        open_camera(CameraConfig(backend="picamera2", tuning_file="imx000.json",
                                 lock_file=lock_file), SimConfig()).start()
