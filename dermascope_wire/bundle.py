"""One capture on the wire: its metadata and its image in a single self-delimiting blob.

Sealing (a later issue) encrypts these bytes whole, so the format only has to be simple,
unambiguous and strict. Layout (integers big-endian)::

    magic       4  b"DRMB"
    version     1  1
    meta_len    4  u32, length of the metadata
    metadata    meta_len  UTF-8 JSON object (keys sorted, no NaN)
    image_len   8  u64, length of the image
    image       image_len  the encoded image (JPEG)

Nothing may follow the image: trailing bytes mean a framing bug and are rejected.
"""

from __future__ import annotations

import json
import struct

MAGIC = b"DRMB"
VERSION = 1
CONTENT_TYPE = "application/vnd.dermascope.bundle.v1"
_HEAD = struct.Struct(">4sBI")
_IMAGE_LEN = struct.Struct(">Q")
MAX_METADATA = 1 << 20


class BundleError(ValueError):
    """The bytes are not a valid bundle."""


def pack(metadata: dict, image: bytes) -> bytes:
    if not isinstance(metadata, dict):
        raise BundleError("metadata must be a JSON object (dict)")
    try:
        meta = json.dumps(metadata, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as err:
        raise BundleError(f"metadata is not JSON-serialisable: {err}") from None
    if len(meta) > MAX_METADATA:
        raise BundleError(f"metadata too large ({len(meta)} bytes > {MAX_METADATA})")
    image = bytes(image)
    return b"".join((_HEAD.pack(MAGIC, VERSION, len(meta)), meta,
                     _IMAGE_LEN.pack(len(image)), image))


def unpack(data: bytes) -> tuple[dict, bytes]:
    metadata, image = unpack_view(data)
    return metadata, bytes(image)


def unpack_view(data: bytes | bytearray | memoryview) -> tuple[dict, memoryview]:
    """``unpack`` without copying the image: it comes back as a view into ``data`` (the
    gateway's 5 MB captures are hashed and written from it; no second copy to fault in)."""
    view = memoryview(data).cast("B")
    if len(view) < _HEAD.size:
        raise BundleError("too short for a bundle header")
    magic, version, meta_len = _HEAD.unpack_from(view)
    if magic != MAGIC:
        raise BundleError("not a bundle (bad magic)")
    if version != VERSION:
        raise BundleError(f"unsupported bundle version {version} (expected {VERSION})")
    if meta_len > MAX_METADATA:
        raise BundleError(f"metadata length {meta_len} exceeds {MAX_METADATA}")
    pos = _HEAD.size
    end_meta = pos + meta_len
    if end_meta + _IMAGE_LEN.size > len(view):
        raise BundleError("truncated metadata")
    try:
        metadata = json.loads(bytes(view[pos:end_meta]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise BundleError(f"metadata is not UTF-8 JSON: {err}") from None
    if not isinstance(metadata, dict):
        raise BundleError("metadata is not a JSON object")
    (image_len,) = _IMAGE_LEN.unpack_from(view, end_meta)
    start = end_meta + _IMAGE_LEN.size
    if start + image_len != len(view):
        raise BundleError(
            f"image length {image_len} does not match the {len(view) - start} bytes present")
    return metadata, view[start:]
