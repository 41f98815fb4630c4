"""A faithful fake of exactly the Picamera2 calls device_agent.camera.picam makes.

It keeps picamera2's rules that the backend must respect, so breaking one fails a test:
configure before start, capture only while started, every request released exactly once
and not read after release, ``wait`` as a timeout in seconds that raises TimeoutError (what
``concurrent.futures.Future.result`` raises inside picamera2), RGB888 delivered as an
HxWx3 uint8 array in BGR order with (width, height) sizes, SensorTimestamp in ns on
CLOCK_MONOTONIC, and autofocus controls only on cameras that have them.

Tuning and exposure as picamera2 and libcamera do them: ``load_tuning_file`` (a static
method: a fresh dict per call, RuntimeError "Tuning file not found" for an unknown name),
``find_tuning_algo`` (version 2 files: the algorithm's dict inside ``"algorithms"``),
``global_camera_info`` (one dict per camera, with its "Model"), the ``tuning`` the camera was
opened with (recorded), and auto exposure / auto white balance that converge over the first
frames, report ColourGains, ExposureTime and AnalogueGain in every frame's metadata, and hold
whatever ``set_controls`` (or the configuration's controls) fixed once AeEnable / AwbEnable
are off.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any

import cv2
import numpy as np


class FakeRequest:
    def __init__(self, camera: FakePicamera2, image: np.ndarray, metadata: dict[str, Any]):
        self._camera = camera
        self._image = image
        self._metadata = metadata
        self.released = False

    def make_array(self, name: str) -> np.ndarray:
        if self.released:
            raise RuntimeError("request used after release")
        if self._camera.config.get(name) is None:
            raise RuntimeError(f"Stream {name!r} is not defined")
        if name == "lores":
            return self._camera.lores_array(self._image)
        if self._camera.config["main"]["format"] == "YUV420":
            return self._camera.yuv420_array(self._image)
        return self._image.copy()  # picamera2 copies out of the camera buffer

    def get_metadata(self) -> dict[str, Any]:
        if self.released:
            raise RuntimeError("request used after release")
        return dict(self._metadata)

    def release(self) -> None:
        if self.released:
            raise RuntimeError("request released twice")
        self.released = True
        self._camera.outstanding -= 1


# The shape of a Raspberry Pi tuning file (version 2.0): a list of algorithms, each a
# one-key dict. The gamma curve is imx477.json's (input, output pairs on 16 bits).
GAMMA_CURVE = [0, 0, 1024, 5040, 2048, 9338, 3072, 12356, 4096, 15312, 5120, 18051,
               6144, 20790, 7168, 23193, 8192, 25744, 9216, 27942, 10240, 30035, 11264, 32005,
               12288, 33975, 13312, 35815, 14336, 37600, 15360, 39168, 16384, 40642,
               18432, 43379, 20480, 45749, 22528, 47753, 24576, 49621, 26624, 51253,
               28672, 52698, 30720, 53796, 32768, 54876, 36864, 57012, 40960, 58656,
               45056, 59954, 49152, 61183, 53248, 62355, 57344, 63419, 61440, 64476,
               65535, 65535]
TUNING_FILES = {
    name: {"version": 2.0, "target": "bcm2835", "algorithms": [
        {"rpi.black_level": {"black_level": 4096}},
        {"rpi.agc": {"exposure_modes": {"normal": {"shutter": [100, 66666],
                                                   "gain": [1.0, 8.0]}}}},
        {"rpi.awb": {"bayes": 1}},
        {"rpi.contrast": {"ce_enable": 1, "gamma_curve": GAMMA_CURVE}},
        {"rpi.ccm": {"ccms": [{"ct": ct, "ccm": [1.6, -0.4, -0.2, -0.3, 1.6, -0.3,
                                                 -0.1, -0.6, 1.7]}]}},
    ]} for name, ct in (("imx477.json", 2850), ("imx708.json", 2498))}
# Where the auto algorithms settle on the fake's scene, and where they start from.
AE_SETTLED = (9000, 1.5)  # ExposureTime (us), AnalogueGain
AWB_SETTLED = (1.9, 1.6)  # ColourGains (red, blue)
_AUTO_START = (30000, 4.0, 1.2, 2.4)


class FakePicamera2:
    """Stands in for ``picamera2.Picamera2``; one instance per opened camera."""

    # What global_camera_info reports: the cameras attached, by camera number.
    attached_models: tuple[str, ...] = ("imx477",)

    @staticmethod
    def load_tuning_file(tuning_file: str, dir: str | None = None) -> dict[str, Any]:
        if dir is not None:
            path = os.path.join(dir, tuning_file)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as fp:
                    return json.load(fp)
        elif tuning_file in TUNING_FILES:
            return copy.deepcopy(TUNING_FILES[tuning_file])  # read from disk each time
        raise RuntimeError("Tuning file not found")

    @staticmethod
    def find_tuning_algo(tuning: dict, name: str) -> dict:
        version = tuning.get("version", 1)
        if version == 1:
            return tuning[name]
        return next(algo for algo in tuning["algorithms"] if name in algo)[name]

    @classmethod
    def global_camera_info(cls) -> list[dict[str, Any]]:
        return [{"Model": model, "Location": 2, "Rotation": 180, "Num": num,
                 "Id": f"/base/soc/i2c0mux/i2c@1/{model}@1a"}
                for num, model in enumerate(cls.attached_models)]

    def __init__(self, camera_num: int = 0, *, tuning: dict | str | None = None,
                 model: str = "imx477", autofocus: bool = False, frames: int | None = None,
                 af_result: bool = True, settle_frames: int | None = 3) -> None:
        if camera_num != 0:
            raise IndexError("list index out of range")  # what picamera2 raises: no such camera
        # picamera2 writes a dict to a temporary file for libcamera, which reads it then.
        self.tuning = copy.deepcopy(tuning)
        self.camera_properties = {"Model": model, "PixelArraySize": (4056, 3040)}
        self.camera_controls: dict[str, tuple[Any, Any, Any]] = {
            "ExposureTime": (1, 66666, None), "FrameRate": (1.0, 60.0, None)}
        if autofocus:
            self.camera_controls["AfMode"] = (0, 2, 0)
        self.config: dict[str, Any] = {}
        self.configured = False
        self.started = False
        self.closed = False
        self.outstanding = 0
        self.flushed = 0
        self.frames_left = frames  # None = endless; 0 = the sensor stopped delivering
        self.af_result = af_result
        self._sequence = 0
        self._next_due = 0.0
        # Frames the auto algorithms take to settle; None: they never do (a flickering scene).
        self.settle_frames = settle_frames
        self.controls: dict[str, Any] = {}  # the controls in force
        self.set_controls_calls: list[dict[str, Any]] = []

    def create_video_configuration(self, main: dict | None = None, lores: dict | None = None,
                                   buffer_count: int = 6, controls: dict | None = None,
                                   **_: Any) -> dict[str, Any]:
        main = {"format": "XBGR8888", "size": (1280, 720), **(main or {})}
        return {"use_case": "video", "main": main, "lores": lores,
                "buffer_count": buffer_count, "controls": dict(controls or {})}

    def configure(self, config: dict[str, Any]) -> None:
        if self.started:
            raise RuntimeError("Camera must be stopped before configuring")
        lores = config.get("lores")
        if lores is not None:
            # picamera2's rules for lores: YUV420 on the Pi 4 and earlier ISPs, no larger
            # than main, even sides.
            (lw, lh), (mw, mh) = lores["size"], config["main"]["size"]
            if lores.get("format") != "YUV420":
                raise RuntimeError("lores stream must be YUV420 on this Pi")
            if lw > mw or lh > mh:
                raise RuntimeError("lores stream dimensions may not exceed main stream")
            if lw % 2 or lh % 2:
                raise RuntimeError("lores stream dimensions must be even")
        self.config = config
        self.configured = True

    def start(self) -> None:
        if not self.configured:
            raise RuntimeError("Camera has not been configured")
        self.started = True
        self._next_due = time.monotonic()
        self.controls.update(self.config.get("controls", {}))

    def _image(self) -> np.ndarray:
        width, height = self.config["main"]["size"]
        if self.config["main"]["format"] not in ("RGB888", "YUV420"):
            raise AssertionError("the fake serves the formats the backend asks for: RGB888, "
                                 "YUV420")
        x = np.linspace(0, 255, width, dtype=np.uint8)
        image = np.empty((height, width, 3), np.uint8)
        image[:] = x[None, :, None]
        image[..., 0] //= 2  # blue channel first in memory, as picamera2's RGB888
        return image

    @staticmethod
    def _to_yuv420(gray: np.ndarray) -> np.ndarray:
        """picamera2's YUV420 array: (h * 3/2, stride), rows padded to a multiple of 64
        bytes (the padding is garbage: 255 here, so reading it shows)."""
        h, w = gray.shape
        stride = -(-w // 64) * 64
        out = np.full((h * 3 // 2, stride), 128, np.uint8)  # neutral chroma
        out[:h, w:] = 255
        out[:h, :w] = gray
        return out

    @staticmethod
    def yuv420_array(image: np.ndarray) -> np.ndarray:
        """The main stream in YUV420 as picamera2's make_array gives it: (h * 3/2, stride),
        the three planes one after the other, each row padded (Y to a multiple of 64 bytes,
        U and V to half of that); padding bytes are garbage (255)."""
        h, w = image.shape[:2]
        stride = -(-w // 64) * 64
        i420 = cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420)  # packed: (h * 3/2, w)
        flat = np.full(stride * h * 3 // 2, 255, np.uint8)
        flat[: stride * h].reshape(h, stride)[:, :w] = i420[:h]
        chroma = i420[h:].reshape(-1)
        quarter = (h // 2) * (w // 2)
        for plane in range(2):
            start = stride * h + plane * (h // 2) * (stride // 2)
            rows = flat[start: start + (h // 2) * (stride // 2)].reshape(h // 2, stride // 2)
            rows[:, : w // 2] = chroma[plane * quarter: (plane + 1) * quarter].reshape(
                h // 2, w // 2)
        return flat.reshape(h * 3 // 2, stride)

    def lores_array(self, image: np.ndarray) -> np.ndarray:
        """The lores stream's YUV420 buffer: the ISP's downscale of the main image."""
        width, height = self.config["lores"]["size"]
        small = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        return self._to_yuv420(cv2.cvtColor(small, cv2.COLOR_BGR2GRAY))

    def capture_request(self, wait: float | bool | None = None, **_: Any) -> FakeRequest:
        if not self.started:
            raise RuntimeError("Camera is not running")
        if self.frames_left == 0:
            if wait is None or wait is True:
                raise AssertionError("the backend waited forever on a camera that stopped")
            raise TimeoutError()
        if self.frames_left is not None:
            self.frames_left -= 1
        # A sensor delivers at its frame rate: capture_request blocks until the next frame.
        period = 1.0 / float(self.config["controls"].get("FrameRate", 30.0))
        wait = self._next_due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._next_due = max(self._next_due + period, time.monotonic())
        self._sequence += 1
        metadata = {"SensorTimestamp": time.monotonic_ns(), "FrameDuration": 100000,
                    **self._auto_results()}
        if "AfMode" in self.camera_controls:
            metadata["LensPosition"] = 7.5
        self.outstanding += 1
        return FakeRequest(self, self._image(), metadata)

    def _auto_results(self) -> dict[str, Any]:
        """What AE and AWB report for this frame: converging (or, with settle_frames None,
        wandering) while enabled, the fixed controls once disabled."""
        if self.settle_frames is None:
            progress = 0.5 + 0.4 * (-1) ** self._sequence  # never stable
        else:
            progress = min(1.0, self._sequence / self.settle_frames)
        exposure0, gain0, red0, blue0 = _AUTO_START

        def toward(start: float, end: float) -> float:
            return start + (end - start) * progress

        out: dict[str, Any] = {
            "ExposureTime": round(toward(exposure0, AE_SETTLED[0])),
            "AnalogueGain": toward(gain0, AE_SETTLED[1]),
            "ColourGains": (toward(red0, AWB_SETTLED[0]), toward(blue0, AWB_SETTLED[1]))}
        if self.controls.get("AeEnable") is False:
            for key in ("ExposureTime", "AnalogueGain"):
                if key in self.controls:
                    out[key] = self.controls[key]
        if self.controls.get("AwbEnable") is False and "ColourGains" in self.controls:
            out["ColourGains"] = tuple(self.controls["ColourGains"])
        return out

    def set_controls(self, controls: dict[str, Any]) -> None:
        unknown = set(controls) - {"AeEnable", "AwbEnable", "ColourGains", "ExposureTime",
                                   "AnalogueGain", "FrameRate", "AfMode", "LensPosition"}
        if unknown:
            raise RuntimeError(f"Control {sorted(unknown)[0]} is not advertised by libcamera")
        self.set_controls_calls.append(dict(controls))
        self.controls.update(controls)

    def capture_metadata(self, wait: float | bool | None = None) -> dict[str, Any]:
        """picamera2's: the next frame's metadata (the request is released inside)."""
        request = self.capture_request(wait=wait)
        try:
            return request.get_metadata()
        finally:
            request.release()

    def cancel_all_and_flush(self) -> None:
        self.flushed += 1

    def autofocus_cycle(self, wait: float | bool | None = None) -> bool:
        if "AfMode" not in self.camera_controls:
            raise RuntimeError("AfMode not supported by this camera")
        if not self.started:
            raise RuntimeError("Camera is not running")
        return self.af_result

    def stop(self) -> None:
        self.started = False

    def close(self) -> None:
        self.stop()
        self.closed = True
