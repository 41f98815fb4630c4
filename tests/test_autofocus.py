"""The agent drives the autofocus of cameras that have one (Camera Module 3): at start, on
waking, after a "focus" retake and when the last cycle is stale. Simulated camera whose lens
drifts out of focus until a cycle, through the whole agent on gpiozero's mock pins."""

from __future__ import annotations

from sim.broker import free_port
from sim.device import SimDevice, sim_config


def af_config(tmp_path, **camera: object):
    return sim_config(tmp_path / "device", free_port(), camera=dict(camera),
                      sim={"autofocus": True})


def test_a_focus_retake_makes_the_lens_focus_before_the_next_press(tmp_path, events):
    with SimDevice(af_config(tmp_path), with_uplink=False) as device:
        events.wait_for("camera.autofocus")  # the camera has just started
        device.camera.drift_lens(1.5)  # the lens position has gone stale
        device.show(None)
        retake = device.press()
        assert retake.verdict == "retake"
        assert retake.reasons == ("focus",)
        (_, again) = events.wait_for("camera.autofocus", count=2)
        assert again["converged"] is True
        device.show(None)
        assert device.press().verdict == "accept"
        assert device.camera.autofocus_cycles == 2


def test_a_stale_lens_position_is_refreshed_on_its_own(tmp_path, events):
    with SimDevice(af_config(tmp_path, autofocus_every_s=0.3), with_uplink=False) as device:
        device.camera.drift_lens(1.5)
        events.wait_for("camera.autofocus", count=3, timeout=10)
        device.show(None)
        assert device.press().verdict == "accept"


def test_the_camera_focuses_again_when_it_wakes(tmp_path, events):
    config = af_config(tmp_path, sleep_after_s=0.5)
    with SimDevice(config, with_uplink=False) as device:
        events.wait_for("camera.asleep", timeout=10)
        cycles, logged = device.camera.autofocus_cycles, len(events.named("camera.autofocus"))
        device.board.press()  # wakes the device
        events.wait_for("camera.awake")
        events.wait_for("camera.autofocus", count=logged + 1)
        assert device.camera.autofocus_cycles == cycles + 1


def test_a_fixed_focus_camera_is_never_asked_to_focus(tmp_path, events):
    config = sim_config(tmp_path / "device", free_port())
    with SimDevice(config, with_uplink=False) as device:
        device.show("defocus", severity=1.5)
        assert device.press().reasons == ("focus",)
        device.show(None)  # frames keep coming: the camera thread went round its loop
        assert device.camera.autofocus_cycles == 0
    assert not events.named("camera.autofocus")
