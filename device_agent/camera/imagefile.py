"""Image files from outside the device, read with a bound on memory.

A compressed file can claim any size: a 1 MB PNG can decode to 1.2 GB of pixels, and a
forged header to far more. Every image file a person hands to the device (``assess``,
``calibrate``, the evaluation photographs) therefore goes through :func:`load_image` here,
which reads the dimensions from the file header with Pillow (``Image.open`` is lazy: it
parses the header and decodes nothing) and refuses an image over the pixel limit before
any decoding starts.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import numpy as np

# Well above the 12.3 MP of the HQ camera's full sensor, well below what exhausts a Pi's RAM
# once decoded and assessed.
DEFAULT_MAX_PIXELS = 64_000_000


def image_size(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS
               ) -> tuple[int, int]:
    """(width, height) from the file header; ImageError if unreadable or over ``max_pixels``.

    Pillow's own decompression-bomb guard applies too: what it flags is refused as well.
    """
    # Imported here: the command line imports this module for its default, and OpenCV (which
    # quality needs) takes a noticeable part of a second to import.
    from device_agent.camera.quality import ImageError, regular_file

    p = regular_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as image:
                width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{p}: refused, not decoded: {err}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{p}: not a readable image (unknown or corrupt format)") from None
    except OSError as err:
        raise ImageError(f"{p}: cannot read: {err.strerror or err}") from None
    if width * height > max_pixels:
        raise ImageError(f"{p}: refused, not decoded: {width}x{height} is "
                         f"{width * height / 1e6:.1f} megapixels, over the limit of "
                         f"{max_pixels / 1e6:g} megapixels")
    return width, height


def load_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS
               ) -> np.ndarray:
    """The image as HxWx3 uint8 BGR, decoded only once its header passed the pixel limit."""
    from device_agent.camera.quality import load_image as decode

    image_size(path, max_pixels)
    return decode(path)
