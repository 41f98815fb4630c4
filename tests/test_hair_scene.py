"""The simulator's scenes carry what issue 18 asks of them: hair (density, direction, two
renderers), immersion-fluid bubbles, Fitzpatrick I-VI tones and a brighter exposure."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from sim.scene import SceneSpec, render


def _dark_thin(img: np.ndarray) -> np.ndarray:
    """Mask of thin dark strands: a black-hat of the luma, well above the skin's texture."""
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    hat = cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT,
                           cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (11, 11)))
    return hat > 40


def _centre(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    return img[h // 2 - 150 : h // 2 + 150, w // 2 - 150 : w // 2 + 150]


@pytest.mark.parametrize("style", ["strands", "tapered"])
def test_hair_density_orders_the_dark_strands(style: str) -> None:
    cover = {
        hair: float(_dark_thin(render(SceneSpec(seed=9, tone=2, hair=hair, hair_style=style)))
                    .mean())
        for hair in ("none", "sparse", "dense")
    }
    assert cover["none"] < 0.002
    assert cover["none"] < cover["sparse"] < cover["dense"]
    assert cover["dense"] > 3 * cover["sparse"]


def test_dense_hair_lies_mostly_one_way() -> None:
    for angle in (0.0, 90.0):
        img = render(SceneSpec(seed=4, tone=1, hair="dense", hair_angle=angle))
        gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.float32)
        hat = cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT,
                               cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (11, 11)))
        # Strands along x change fast across y: the y-gradient energy of the strands dominates.
        gx = float(np.abs(cv2.Sobel(hat, cv2.CV_32F, 1, 0)).sum())
        gy = float(np.abs(cv2.Sobel(hat, cv2.CV_32F, 0, 1)).sum())
        along_x = gy > 2 * gx
        assert along_x == (angle == 0.0), (angle, gx, gy)


def test_tones_run_from_fair_to_dark() -> None:
    means = [float(_centre(render(SceneSpec(seed=3, tone=t, hair="none"))).mean())
             for t in range(1, 7)]
    assert all(a > b for a, b in itertools.pairwise(means)), means


def test_tone_and_hair_change_only_themselves() -> None:
    # The same seed keeps its field geometry and lesion whatever tone or hair is asked for.
    a = render(SceneSpec(seed=8, tone=2, hair="none"))
    b = render(SceneSpec(seed=8, tone=2, hair="dense"))
    differs = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2) > 40
    assert 0.005 < float(differs.mean()) < 0.2


def test_bubbles_add_rings_but_no_large_highlights() -> None:
    plain = render(SceneSpec(seed=6, tone=4, hair="none"))
    bubbly = render(SceneSpec(seed=6, tone=4, hair="none", bubbles=True))
    diff = np.abs(bubbly.astype(np.int16) - plain.astype(np.int16)).max(axis=2) > 15
    assert float(diff.mean()) > 0.0005
    white = (bubbly.min(axis=2) >= 250).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(white)
    assert all(stats[i, cv2.CC_STAT_AREA] < 200 for i in range(1, n))


def test_exposure_brightens_and_disc_defocus_blurs() -> None:
    base = render(SceneSpec(seed=2, tone=3, hair="none")).astype(np.float32)
    bright = render(SceneSpec(seed=2, tone=3, hair="none", exposure=1.1)).astype(np.float32)
    assert float(_centre(bright).mean()) == pytest.approx(1.1 * float(_centre(base).mean()),
                                                          rel=0.03)
    disc = render(SceneSpec(seed=2, defect="defocus", defocus_kind="disc"))
    sharp = render(SceneSpec(seed=2))
    lap = [float(cv2.Laplacian(cv2.cvtColor(i, cv2.COLOR_BGR2GRAY), cv2.CV_32F).var())
           for i in (sharp, disc)]
    assert lap[1] < 0.5 * lap[0]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("tone", 7, "tone"), ("hair", "thick", "hair"), ("hair_style", "x", "hair_style"),
     ("exposure", 0.0, "exposure"), ("defocus_kind", "box", "defocus_kind")],
)
def test_bad_scene_options_are_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SceneSpec(**{field: value})  # type: ignore[arg-type]
