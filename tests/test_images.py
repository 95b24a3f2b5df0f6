"""The one image reader: header sizes before decoding, pixel limits, one-line errors."""

import struct
import zlib

import cv2
import numpy as np
import pytest

from cardiac_core import images


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height 8-bit gray, with one tiny IDAT (a 'bomb')."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))  # fmt: skip


def test_header_size_matches_the_decoded_size():
    for shape in [(17, 31), (40, 8, 3)]:
        image = np.random.default_rng(0).integers(0, 256, shape, np.uint8)
        for ext in (".png", ".jpg", ".bmp", ".tiff"):
            data = cv2.imencode(ext, image)[1].tobytes()
            assert images.header_size(data) == shape[:2]
            assert images.decode(data, "x").shape[:2] == shape[:2]
    assert images.header_size(b"not an image") is None


def test_a_huge_declared_size_is_refused_before_decoding(tmp_path):
    bomb = _png_header_only(20000, 20000)
    assert len(bomb) < 200 and images.header_size(bomb) == (20000, 20000)
    with pytest.raises(
        images.ImageTooLarge, match=r"upload\.png: image is 20000x20000 \(400\.0 Mpx"
    ):
        images.decode(bomb, "upload.png")
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    with pytest.raises(images.ImageTooLarge, match="bomb.png.*limit of 67.1 Mpx"):
        images.read_gray(path)
    small = cv2.imencode(".png", np.zeros((100, 100), np.uint8))[1].tobytes()
    with pytest.raises(images.ImageTooLarge, match="limit of 0.0 Mpx"):
        images.decode(small, "x", max_pixels=9_999)
    assert images.decode(small, "x", max_pixels=10_000).shape == (100, 100)


def test_process_default_limit_is_settable(tmp_path):
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), np.zeros((64, 64), np.uint8))
    try:
        images.set_max_pixels(4095)
        with pytest.raises(images.ImageTooLarge):
            images.read_gray(path)
        images.set_max_pixels(4096)
        assert images.read_gray(path).shape == (64, 64)
    finally:
        images.set_max_pixels(images.DEFAULT_MAX_PIXELS)
    with pytest.raises(ValueError, match="max_pixels must be >= 1"):
        images.set_max_pixels(0)


def test_bad_files_get_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="is a folder, not an image"):
        images.read(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.png: image file not found"):
        images.read(tmp_path / "nope.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.png: empty file"):
        images.read(empty)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8\xff" + b"garbage" * 10)
    with pytest.raises(ValueError, match="junk.jpg: not a readable image"):
        images.read(junk)


def test_gray_conversion_of_colour_alpha_and_16_bit():
    bgr = np.random.default_rng(1).integers(0, 256, (9, 7, 3), np.uint8)
    np.testing.assert_array_equal(
        images.to_gray_uint8(bgr, "x"), cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    )
    bgra = np.concatenate([bgr, np.full((9, 7, 1), 255, np.uint8)], -1)
    np.testing.assert_array_equal(images.to_gray_uint8(bgra, "x"), images.to_gray_uint8(bgr, "x"))
    deep = np.arange(63, dtype=np.uint16).reshape(9, 7) * 60
    np.testing.assert_array_equal(images.to_gray_uint8(deep, "x"), images.window_to_uint8(deep))
    with pytest.raises(ValueError, match="x: unexpected pixel type float64"):
        images.to_gray_uint8(np.zeros((2, 2)), "x")
