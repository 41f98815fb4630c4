"""The simulator's frames: deterministic, realistic enough, defects as documented."""

from __future__ import annotations

import numpy as np
import pytest

from sim.scene import DEFECTS, SceneSpec, expected_reasons, render


def test_render_shape_and_type() -> None:
    img = render(SceneSpec(seed=3, width=640, height=480))
    assert img.shape == (480, 640, 3)
    assert img.dtype == np.uint8


def test_render_is_deterministic() -> None:
    spec = SceneSpec(seed=11)
    assert np.array_equal(render(spec, 5), render(spec, 5))
    assert np.array_equal(render(spec, 2, shake=6.0), render(spec, 2, shake=6.0))


def test_frame_index_changes_only_the_noise() -> None:
    spec = SceneSpec(seed=11)
    a, b = render(spec, 0).astype(np.int16), render(spec, 1).astype(np.int16)
    assert not np.array_equal(a, b)
    # Same scene: the difference is small, zero-mean noise.
    diff = a - b
    assert abs(float(diff.mean())) < 0.5
    assert float(np.abs(diff).mean()) < 6


def test_seeds_give_different_scenes() -> None:
    a = render(SceneSpec(seed=1)).astype(np.int16)
    b = render(SceneSpec(seed=2)).astype(np.int16)
    assert float(np.abs(a - b).mean()) > 10


def test_black_outside_the_lens_field() -> None:
    img = render(SceneSpec(seed=5))
    corners = np.concatenate([img[:20, :20], img[:20, -20:], img[-20:, :20], img[-20:, -20:]])
    assert float(corners.mean()) < 12
    h, w = img.shape[:2]
    centre = img[h // 2 - 40 : h // 2 + 40, w // 2 - 40 : w // 2 + 40]
    assert float(centre.mean()) > 20


def test_unknown_defect_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown defect"):
        SceneSpec(defect="smudge")
    with pytest.raises(ValueError, match="unknown defect"):
        expected_reasons("smudge")


def test_expected_reasons() -> None:
    assert expected_reasons(None) == set()
    for defect in DEFECTS:
        assert expected_reasons(defect), defect
    assert expected_reasons("defocus") == {"focus"}
    assert expected_reasons("off_centre") == {"field"}
    assert expected_reasons("lifted") == {"field"}


def test_exposure_defects_scale_brightness() -> None:
    base = render(SceneSpec(seed=4)).astype(np.float64).mean()
    dark = render(SceneSpec(seed=4, defect="underexposed")).astype(np.float64).mean()
    bright = render(SceneSpec(seed=4, defect="overexposed")).astype(np.float64).mean()
    assert dark < 0.25 * base
    assert bright > 1.4 * base


def test_severity_zero_is_pristine_scene() -> None:
    pristine = render(SceneSpec(seed=8)).astype(np.int16)
    for defect in ("underexposed", "overexposed", "colour_cast", "glare", "off_centre"):
        zero = render(SceneSpec(seed=8, defect=defect, severity=0.0)).astype(np.int16)
        assert float(np.abs(zero - pristine).mean()) < 1.0, defect


def test_shake_blurs() -> None:
    spec = SceneSpec(seed=6)
    still = render(spec, 0).astype(np.float32)
    shaken = render(spec, 0, shake=20.0).astype(np.float32)

    # Blur lowers local contrast: the mean absolute horizontal+vertical difference drops.
    def detail(img: np.ndarray) -> float:
        return float(np.abs(np.diff(img, axis=0)).mean() + np.abs(np.diff(img, axis=1)).mean())

    assert detail(shaken) < detail(still)
    with pytest.raises(ValueError, match="shake"):
        render(spec, 0, shake=-1.0)
