"""The picamera2 backend against a faithful fake of the Picamera2 calls it makes."""

import time

import numpy as np
import pytest

from device_agent.camera.base import CameraError, FrameTimeout
from device_agent.camera.picam import PicameraCamera
from tests.fake_picamera2 import FakePicamera2


def make(**fake_kwargs):
    opened: list[FakePicamera2] = []

    def factory(num: int) -> FakePicamera2:
        opened.append(FakePicamera2(num, **fake_kwargs))
        return opened[-1]

    return PicameraCamera(640, 480, 10.0, factory=factory), opened


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
    assert first.metadata["ExposureTime"] == 9000
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
    camera = PicameraCamera(640, 480, 10.0, camera_num=3, factory=FakePicamera2)
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
