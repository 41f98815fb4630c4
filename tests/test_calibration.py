"""Calibration on the simulator's targets, whose colour cast, vignetting and noise are known."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from device_agent.calibrate import average_frames, from_camera, run_calibration
from device_agent.camera.calibration import (
    CalibrationError,
    calibrate_mode,
    calibration_path,
    falloff,
    load_calibration,
)
from device_agent.camera.colour import chart_reference_linear, srgb_to_linear
from device_agent.config import parse_config
from sim.camera import SimCamera
from sim.device import SimDevice, sim_config
from sim.targets import CASTS, Response, render_chart, render_grey, render_white

DELTA_E_MEAN_GOAL, DELTA_E_MAX_GOAL, FALLOFF_GOAL = 3.0, 6.0, 0.02


def bench_config(state_dir):
    return parse_config({"device": {"id": "d1", "state_dir": str(state_dir)},
                         "uplink": {"insecure_dev_mode": True},
                         "security": {"insecure_dev_mode": True}})


@pytest.mark.parametrize("cast", sorted(CASTS))
def test_every_cast_is_corrected_to_the_goals(cast):
    response = Response(cast=cast, seed=5)
    result = calibrate_mode(render_white(response), render_chart(response))
    assert result.delta_e_before_mean > 5  # the cast really was there
    assert result.delta_e_mean <= DELTA_E_MEAN_GOAL
    assert result.delta_e_max <= DELTA_E_MAX_GOAL
    assert result.falloff_before > 0.2
    assert result.falloff_after <= FALLOFF_GOAL


def test_the_applied_calibration_makes_the_white_target_flat_and_neutral(tmp_path):
    config = bench_config(tmp_path)
    response = Response(cast="cool", seed=2)
    white = render_white(response)
    outcome = run_calibration(config, "polarised", white, render_chart(response))
    corrected = outcome.calibration.apply(white, "polarised")
    linear = srgb_to_linear(corrected[..., ::-1] / 255.0)
    h, w = white.shape[:2]
    centre = linear[h // 2 - 40:h // 2 + 40, w // 2 - 40:w // 2 + 40].reshape(-1, 3).mean(0)
    assert np.ptp(centre) / centre.mean() < 0.03  # neutral: R, G and B within 3 %
    radius = 0.46 * min(h, w)
    assert falloff(linear.astype(np.float32), w / 2, h / 2, radius) <= FALLOFF_GOAL


def test_a_chart_patch_comes_out_as_its_published_colour(tmp_path):
    config = bench_config(tmp_path)
    response = Response(cast="magenta", seed=4)
    chart = render_chart(response)
    cal = run_calibration(config, "polarised", render_white(response), chart).calibration
    out = cal.apply(chart, "polarised")
    from device_agent.camera.colour import chart_patch_centres

    h, w = chart.shape[:2]
    x, y = chart_patch_centres(w / 2, h / 2, 0.46 * min(h, w))[14]  # patch 15: red
    got = srgb_to_linear(out[int(y) - 5:int(y) + 5, int(x) - 5:int(x) + 5, ::-1] / 255.0)
    np.testing.assert_allclose(got.reshape(-1, 3).mean(0), chart_reference_linear()[14],
                               atol=0.03)


def test_stored_durably_with_an_id_and_the_other_mode_kept(tmp_path):
    config = bench_config(tmp_path)
    r = Response(seed=1)
    first = run_calibration(config, "polarised", render_white(r), render_chart(r))
    second = run_calibration(config, "non_polarised", render_white(r), render_chart(r))
    loaded = load_calibration(calibration_path(tmp_path))
    assert loaded.calibration_id == second.calibration.calibration_id
    assert loaded.calibration_id != first.calibration.calibration_id
    assert set(loaded.modes) == {"polarised", "non_polarised"}
    np.testing.assert_allclose(loaded.modes["polarised"].ccm,
                               first.calibration.modes["polarised"].ccm, atol=1e-5)


def test_a_frame_without_the_cap_seated_is_refused_clearly():
    dark = np.zeros((760, 1014, 3), np.uint8)
    with pytest.raises(CalibrationError, match="lens field is not fully seen"):
        calibrate_mode(dark, dark)


def test_a_corrupt_calibration_file_is_an_error_naming_it(tmp_path):
    calibration_path(tmp_path).write_text('{"calibration_id": "x", "modes": {"p": {}}}')
    with pytest.raises(CalibrationError, match=r"calibration\.json"):
        load_calibration(calibration_path(tmp_path))


def test_capture_from_the_camera_averages_frames():
    camera = SimCamera(320, 240, fps=60.0)
    white = render_white(Response(noise=6.0), 320, 240)
    camera.show_image(white)
    prompts: list[str] = []
    got = from_camera(camera, prompts.append)
    assert len(prompts) == 4
    assert "WHITE" in prompts[0]
    assert "GREY" in prompts[1]
    assert "TURNED" in prompts[3]
    np.testing.assert_array_equal(got.white, white)  # a still image averages to itself
    assert got.grey is not None
    assert got.check_chart is not None
    camera.start()
    try:
        assert average_frames(camera, 4).shape == white.shape
    finally:
        camera.close()


def test_the_command_line_reports_delta_e_and_writes_the_picture(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'[device]\nid = "d1"\nstate_dir = "{tmp_path / "state"}"\n'
                      '[uplink]\ninsecure_dev_mode = true\n'
                      '[security]\ninsecure_dev_mode = true\n')
    r = Response(cast="green", seed=9)
    cv2.imwrite(str(tmp_path / "white.png"), render_white(r))
    cv2.imwrite(str(tmp_path / "chart.png"), render_chart(r))
    report = tmp_path / "calibration.png"
    result = subprocess.run(
        [sys.executable, "-m", "device_agent", "calibrate", "--config", str(config),
         "--white", str(tmp_path / "white.png"), "--chart", str(tmp_path / "chart.png"),
         "--report", str(report), "--json"], capture_output=True, text=True, timeout=120,
        check=False)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["delta_e_mean"] <= DELTA_E_MEAN_GOAL
    assert record["calibration_id"].startswith("cal-")
    picture = cv2.imread(str(report))
    assert picture is not None
    assert picture.shape[1] >= 1000

    bad = subprocess.run(
        [sys.executable, "-m", "device_agent", "calibrate", "--config", str(config),
         "--white", str(tmp_path / "missing.png"), "--chart", str(tmp_path / "chart.png")],
        capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2
    assert "missing.png" in bad.stderr


def test_captures_carry_the_calibration_id_and_are_corrected(tmp_path):
    state = tmp_path / "state"
    config = sim_config(state, 1)  # no broker needed: the capture stays in the outbox
    r = Response(cast="warm", seed=3)
    cal = run_calibration(config, "polarised", render_white(r), render_chart(r)).calibration
    with SimDevice(config, with_uplink=False) as device:
        assert device.agent.calibration.calibration_id == cal.calibration_id
        device.show(None)
        outcome = device.press()
        assert outcome.verdict == "accept"
        (entry,) = device.outbox.pending()
        from dermascope_wire.bundle import unpack

        metadata, _ = unpack(device.outbox.read(entry))
    assert metadata["calibration_id"] == cal.calibration_id


def test_the_fast_srgb_tables_agree_with_colour_science():
    from device_agent.camera.colour import (
        linear_to_srgb,
        srgb_lut_from_linear,
        srgb_lut_to_linear,
    )

    np.testing.assert_allclose(srgb_lut_to_linear(), srgb_to_linear(np.arange(256) / 255),
                               atol=1e-6)
    steps = np.linspace(0, 1, 4096)
    expected = np.rint(linear_to_srgb(steps) * 255)
    np.testing.assert_array_equal(srgb_lut_from_linear(4096), expected)


def test_applying_a_calibration_does_not_load_colour_science(tmp_path):
    script = (
        "import sys, numpy as np\n"
        "from device_agent.camera.calibration import load_calibration\n"
        f"cal = load_calibration(__import__('pathlib').Path({str(tmp_path / 'c.json')!r}))\n"
        "cal.apply(np.full((64, 64, 3), 128, np.uint8), 'polarised')\n"
        "print('colour' in sys.modules)\n")
    config = bench_config(tmp_path)
    r = Response()
    run_calibration(config, "polarised", render_white(r), render_chart(r))
    (tmp_path / "calibration.json").rename(tmp_path / "c.json")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_the_check_chart_must_be_turned(tmp_path):
    r = Response(cast="warm", seed=6)
    with pytest.raises(CalibrationError, match="turn the chart half a turn"):
        calibrate_mode(render_white(r), render_chart(r), render_grey(r),
                       render_chart(Response(cast="warm", seed=7)))


def test_full_procedure_stores_held_out_figures_and_doctor_shows_them(tmp_path):
    from device_agent.doctor import check_calibration

    config = bench_config(tmp_path)
    r = Response(cast="green", seed=8)
    for mode in ("polarised", "non_polarised"):
        outcome = run_calibration(config, mode, render_white(r), render_chart(r),
                                  grey=render_grey(r),
                                  check_chart=render_chart(Response(cast="green", seed=11),
                                                           turned=True))
    f = outcome.figures
    assert f["heldout_method"] == "second chart, turned"
    assert f["heldout_delta_e_mean"] <= 2.0
    assert f["flat_grey_worst_sector"] <= FALLOFF_GOAL
    loaded = load_calibration(calibration_path(tmp_path)).modes["non_polarised"]
    assert loaded.heldout_delta_e_mean == pytest.approx(f["heldout_delta_e_mean"], abs=1e-3)
    check = check_calibration(config)
    assert check.level == "ok", check
    assert f"held-out mean Delta E {f['heldout_delta_e_mean']:.2f}" in check.detail


def test_a_calibration_from_before_the_tone_fit_still_applies_and_doctor_asks_again(tmp_path):
    """Files written before the tone response was measured: sRGB is assumed, and doctor
    says there is no held-out figure."""
    from device_agent.doctor import check_calibration

    config = bench_config(tmp_path)
    r = Response(seed=3)
    outcome = run_calibration(config, "polarised", render_white(r), render_chart(r))
    data = outcome.calibration.to_dict()
    for m in data["modes"].values():
        for key in ("tone", "heldout_delta_e_mean", "heldout_delta_e_max", "heldout_method",
                    "flat_white_worst_sector", "flat_grey_worst_sector"):
            del m[key]
    calibration_path(tmp_path).write_text(json.dumps(data))
    old = load_calibration(calibration_path(tmp_path))
    assert old.modes["polarised"].tone is None
    out = old.apply(np.full((32, 32, 3), 128, np.uint8), "polarised")
    assert out.shape == (32, 32, 3)
    check = check_calibration(config)
    assert check.level == "warn"
    assert "no held-out Delta E" in check.detail


def test_clipped_targets_are_refused_clearly():
    """A clipped white or black carries no level: the tone response cannot be measured."""
    bright = Response(exposure=1.4, seed=2)
    with pytest.raises(CalibrationError, match="white target: clipped"):
        calibrate_mode(render_white(bright), render_chart(bright))
    dark_chart = np.clip(render_chart(Response(seed=2)).astype(int) - 60, 0, 255).astype(np.uint8)
    with pytest.raises(CalibrationError, match="black patch is clipped"):
        calibrate_mode(render_white(Response(seed=2)), dark_chart)


def test_a_chart_seated_upside_down_is_refused_clearly():
    r = Response(cast="magenta", seed=12)
    with pytest.raises(CalibrationError, match="upside down"):
        calibrate_mode(render_white(r), render_chart(r, turned=True))


@pytest.mark.parametrize(("mode", "lit", "dark"), [("polarised", 12, 13),
                                                    ("non_polarised", 13, 12)])
def test_calibrating_from_the_camera_lights_the_ring_in_that_mode(
        tmp_path, monkeypatch, mode, lit, dark):
    """The targets are taken under the ring's own light (what the calibration corrects for,
    and what the camera's exposure and white balance settle under), then the ring goes dark.
    Whatever the simulated camera shows, the pins say what the ring did."""
    from gpiozero.pins.mock import MockFactory, MockPWMPin

    from device_agent import cli

    factory = MockFactory(pin_class=MockPWMPin)
    monkeypatch.setattr(cli, "pin_factory", lambda name: factory)
    lit_during_capture: list[float] = []

    def capture(camera, prompt):
        lit_during_capture.append(factory.pin(lit).state)
        raise EOFError  # the technician walked away: the ring must still go dark

    monkeypatch.setattr("device_agent.calibrate.from_camera", capture)
    config = tmp_path / "config.toml"
    config.write_text(f'[device]\nid = "d1"\nstate_dir = "{tmp_path / "state"}"\n'
                      '[camera]\nbackend = "sim"\n[pins]\npin_factory = "mock"\n'
                      '[illumination]\nbrightness = 0.6\n'
                      '[uplink]\ninsecure_dev_mode = true\n[security]\ninsecure_dev_mode = true\n')
    assert cli.main(["calibrate", "--config", str(config), "--mode", mode]) == 2
    assert lit_during_capture == [pytest.approx(0.6)]
    assert factory.pin(lit).state == 0
    assert all(s.state == 0 for s in factory.pin(dark).states)
