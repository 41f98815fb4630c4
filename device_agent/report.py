"""The self-test / calibration report picture: what a technician would rather look at.

One PNG: the frame with the detected lens circle, a focus map of the field, the histogram
per channel, and every check's score against its threshold. Drawn with OpenCV alone (no
plotting library on the device).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from device_agent.camera.quality import QualityReport, working_copy

WIDTH, HEIGHT = 1400, 860
_PANEL = (460, 330)
_GREEN, _RED, _WHITE, _GREY = (80, 200, 80), (60, 60, 230), (235, 235, 235), (120, 120, 120)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def focus_map(image: np.ndarray, tiles: tuple[int, int] = (16, 12)) -> np.ndarray:
    """Local sharpness per tile: Laplacian spread over local contrast, so that a flat but
    sharp patch of skin is not shown as blurred. Float32, (rows, cols)."""
    work, _ = working_copy(image, 640)
    gray = cv2.cvtColor(work, cv2.COLOR_BGR2GRAY).astype(np.float32)
    lap = np.abs(cv2.Laplacian(gray, cv2.CV_32F, ksize=3))
    cols, rows = tiles
    h, w = gray.shape
    out = np.zeros((rows, cols), np.float32)
    for r in range(rows):
        for c in range(cols):
            ys = slice(r * h // rows, (r + 1) * h // rows)
            xs = slice(c * w // cols, (c + 1) * w // cols)
            tile = gray[ys, xs]
            if tile.mean() < 20:  # outside the lens field
                continue
            out[r, c] = float(lap[ys, xs].mean()) / (float(tile.std()) + 2.0)
    return out


def _fit(image: np.ndarray, box: tuple[int, int]) -> tuple[np.ndarray, float]:
    scale = min(box[0] / image.shape[1], box[1] / image.shape[0])
    size = (max(1, int(image.shape[1] * scale)), max(1, int(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale


def _paste(canvas: np.ndarray, image: np.ndarray, x: int, y: int) -> None:
    canvas[y:y + image.shape[0], x:x + image.shape[1]] = image


def _histogram_panel(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    w, h = _PANEL
    panel = np.full((h, w, 3), 30, np.uint8)
    for channel, colour in zip(range(3), ((255, 120, 60), (80, 220, 80), (60, 60, 255)),
                               strict=True):
        hist = cv2.calcHist([image], [channel], mask, [256], [0, 256]).ravel()
        hist = hist / max(hist.max(), 1.0)
        points = np.array([(int(i * (w - 1) / 255), int(h - 1 - v * (h - 20)))
                           for i, v in enumerate(hist)], np.int32)
        cv2.polylines(panel, [points], False, colour, 1, cv2.LINE_AA)
    cv2.putText(panel, "histogram (B, G, R) inside the lens field", (8, 16), _FONT, 0.45,
                _WHITE, 1, cv2.LINE_AA)
    return panel


def render_report(image: np.ndarray, report: QualityReport, title: str,
                  notes: list[str] | None = None) -> np.ndarray:
    canvas = np.full((HEIGHT, WIDTH, 3), 18, np.uint8)
    cv2.putText(canvas, title, (20, 34), _FONT, 0.8, _WHITE, 2, cv2.LINE_AA)

    frame, scale = _fit(image, (900, 675))
    frame = frame.copy()
    mask = None
    if report.field is not None and report.field.found:
        f = report.field
        centre = (int(f.cx * scale), int(f.cy * scale))
        cv2.circle(frame, centre, int(f.radius * scale), _GREEN, 2, cv2.LINE_AA)
        cv2.drawMarker(frame, centre, _GREEN, cv2.MARKER_CROSS, 24, 2)
        mask = np.zeros(image.shape[:2], np.uint8)
        cv2.circle(mask, (int(f.cx), int(f.cy)), int(f.radius), 255, -1)
    _paste(canvas, frame, 20, 60)

    heat = focus_map(image)
    top = max(float(heat.max()), 1e-6)
    coloured = cv2.applyColorMap((np.clip(heat / top, 0, 1) * 255).astype(np.uint8),
                                 cv2.COLORMAP_TURBO)
    coloured[heat == 0] = 30
    coloured = cv2.resize(coloured, _PANEL, interpolation=cv2.INTER_NEAREST)
    cv2.putText(coloured, "focus map (red = sharp)", (8, 16), _FONT, 0.45, _WHITE, 1,
                cv2.LINE_AA)
    _paste(canvas, coloured, 930, 60)
    _paste(canvas, _histogram_panel(image, mask), 930, 60 + _PANEL[1] + 15)

    y = 60 + 675 + 30
    x = 20
    for check in report.checks:
        colour = _GREEN if check.passed else _RED
        # Plain decimals (a tiny clipped fraction in e-notation reads as noise), each label
        # placed after the last one's measured width so that none overlaps.
        score = f"{check.score:.3f}" if abs(check.score) < 10 else f"{check.score:.0f}"
        text = f"{check.name} {score} ({'ok' if check.passed else 'FAIL'})"
        cv2.putText(canvas, text, (x, y), _FONT, 0.55, colour, 1, cv2.LINE_AA)
        x += cv2.getTextSize(text, _FONT, 0.55, 1)[0][0] + 28
    verdict = report.verdict.upper()
    cv2.putText(canvas, f"verdict: {verdict}", (20, y + 32), _FONT, 0.65,
                _GREEN if verdict == "ACCEPT" else _RED, 2, cv2.LINE_AA)
    for i, note in enumerate(notes or []):
        cv2.putText(canvas, note, (300 + (i // 2) * 560, y + 32 + (i % 2) * 24), _FONT, 0.5,
                    _GREY, 1, cv2.LINE_AA)
    return canvas


def write_report(path: Path, image: np.ndarray, report: QualityReport, title: str,
                 notes: list[str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), render_report(image, report, title, notes)):
        raise OSError(f"cannot write the report picture {path}")
    return path
