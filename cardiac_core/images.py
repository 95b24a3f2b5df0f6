"""Image files and bytes: the project's one image reader (OpenCV decodes, Pillow reads headers).

Every image that enters the project (Supervisely frames, inference inputs, polar-map studies,
web uploads) goes through `decode` or `read`. The size is read from the file's header before
anything is decoded, so a small file that would decode to a huge image (a 400 KB PNG of
20000 x 20000 pixels) is refused for the cost of reading its header, not of gigabytes of RAM.
The limit is `max_pixels` per image; launchers set the process default with
`set_max_pixels` (their `--max_pixels` flag), the web server passes its own, smaller one.
"""

from __future__ import annotations

import io
import os
import pathlib

import cv2
import numpy as np
from PIL import Image

# 64 Mpx (8192 x 8192) per image: far above any angiography frame or polar-map export, far
# below what makes a 24 GB machine swap (a decoded 64 Mpx 16-bit RGB image is 384 MB).
DEFAULT_MAX_PIXELS = 64 * 2**20
_max_pixels = DEFAULT_MAX_PIXELS

# Pillow is only asked for the header; its own bomb check would raise its own error type.
Image.MAX_IMAGE_PIXELS = None


class ImageTooLarge(ValueError):
    """An image whose header declares more pixels than the limit."""


def set_max_pixels(max_pixels: int) -> None:
    """Sets the process-wide default pixel limit of `decode` and `read` (a launcher flag)."""
    global _max_pixels
    if int(max_pixels) < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    _max_pixels = int(max_pixels)


def max_pixels() -> int:
    """The process-wide default pixel limit."""
    return _max_pixels


def check_pixels(height: int, width: int, what, limit: int | None = None) -> None:
    """Raises ImageTooLarge (one line naming `what`) when height x width exceeds the limit."""
    limit = _max_pixels if limit is None else int(limit)
    if int(height) * int(width) > limit:
        raise ImageTooLarge(
            f"{what}: image is {width}x{height} ({height * width / 1e6:.1f} Mpx), more than "
            f"the limit of {limit / 1e6:.1f} Mpx (--max_pixels)"
        )


def header_size(source: bytes | os.PathLike | str) -> tuple[int, int] | None:
    """(height, width) from an image's header without decoding it; None when not recognised."""
    try:
        f = io.BytesIO(source) if isinstance(source, bytes | bytearray | memoryview) else source
        with Image.open(f) as im:
            width, height = im.size
    except Exception:  # Pillow raises many types for unknown or broken files
        return None
    return int(height), int(width)


def decode(data: bytes, what, *, color: bool = False, max_pixels: int | None = None) -> np.ndarray:
    """Decodes image bytes after checking the header's size.

    Returns OpenCV's array: with `color`, (H, W, 3) BGR uint8; otherwise the file's own
    channels and depth (gray or BGR/BGRA, 8 or 16 bit). Raises a one-line ValueError
    naming `what` for empty, unrecognised, truncated or too large images.
    """
    if not data:
        raise ValueError(f"{what}: empty file")
    size = header_size(data)
    if size is not None:
        check_pixels(*size, what, max_pixels)
    flags = cv2.IMREAD_COLOR if color else cv2.IMREAD_UNCHANGED
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None:
        raise ValueError(f"{what}: not a readable image (unknown format, or truncated)")
    # A format Pillow cannot parse is still bounded, after the fact, by the same limit.
    check_pixels(image.shape[0], image.shape[1], what, max_pixels)
    return image


def read(path: os.PathLike | str, *, color: bool = False, max_pixels: int | None = None):
    """Reads an image file; see `decode`. One-line errors name the file."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not an image file")
    if not path.exists():
        raise FileNotFoundError(f"{path}: image file not found")
    size = header_size(path)  # before reading a possibly large file into memory
    if size is not None:
        check_pixels(*size, path, max_pixels)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    return decode(data, path, color=color, max_pixels=max_pixels)


def read_gray(path: os.PathLike | str, *, max_pixels: int | None = None) -> np.ndarray:
    """An image file as (H, W) uint8 grayscale: colour converted, 16-bit windowed."""
    return to_gray_uint8(read(path, max_pixels=max_pixels), path)


def to_gray_uint8(image: np.ndarray, what) -> np.ndarray:
    """Any OpenCV-decoded image (gray/BGR/BGRA, 8 or 16 bit) -> (H, W) uint8.

    The one conversion used for training data and for inference inputs alike, so a frame looks
    the same to the network in both. 12/16-bit frames are windowed (robust percentiles), not
    truncated to their high bits.
    """
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.ndim != 2:
        raise ValueError(f"{what}: unexpected image shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    if image.dtype in (np.uint16, np.int16, np.float32):
        return window_to_uint8(image)
    raise ValueError(f"{what}: unexpected pixel type {image.dtype} (expected 8 or 16 bit)")


def window_to_uint8(
    frame: np.ndarray,
    *,
    center: float | None = None,
    width: float | None = None,
    monochrome1: bool = False,
    slope: float = 1.0,
    intercept: float = 0.0,
) -> np.ndarray:
    """Windows a 12/16-bit (or any integer/float) frame to uint8 display values.

    With `center`/`width` it applies the DICOM linear VOI function (PS3.3 C.11.2.1.2);
    otherwise it stretches the frame's robust 1st-99th percentile range. MONOCHROME1
    (bright = low attenuation) is inverted so that the output is always MONOCHROME2.
    """
    v = np.asarray(frame, np.float32) * np.float32(slope) + np.float32(intercept)
    if center is not None and width is not None and width >= 1:
        c, w = float(center), float(width)
        if w > 1:
            out = ((v - (c - 0.5)) / (w - 1.0) + 0.5) * 255.0
        else:
            out = np.where(v >= c - 0.5, 255.0, 0.0)
    else:
        lo, hi = np.percentile(v, [1.0, 99.0])
        if hi <= lo:  # a flat frame: keep it flat rather than divide by zero
            hi = lo + 1.0
        out = (v - lo) * (255.0 / (hi - lo))
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return 255 - out if monochrome1 else out
