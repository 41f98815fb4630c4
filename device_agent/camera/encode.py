"""Encoding a chosen frame for the clinic."""

from __future__ import annotations

import cv2
import numpy as np

MEDIA_TYPE = "image/jpeg"


class EncodeError(RuntimeError):
    """OpenCV could not encode the frame."""


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG at ``quality`` (teledermatology systems accept JPEG; 95 keeps network
    detail a dermatologist needs at a quarter of PNG's size)."""
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise EncodeError(f"cannot encode a {image.shape} {image.dtype} frame as JPEG")
    return buffer.tobytes()
