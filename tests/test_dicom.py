"""cardiac_core.dicom: lazy frames, a decode checked against the header, colour, one-line errors.

Every bad file is built here with pydicom (no binary fixtures); pydicom's own decoder is the
independent reference for the offsets and bit handling of our lazy reader.
"""

import pathlib

import numpy as np
import pydicom
import pydicom.pixels
import pytest
from pydicom.uid import ImplicitVRLittleEndian

from cardiac_core import dicom, images


def _edit(path, out, fn):
    """Re-save a DICOM file after fn(ds) changed it (pydicom writes what it is given)."""
    ds = pydicom.dcmread(path)
    fn(ds)
    ds.save_as(out)
    return pathlib.Path(out)


def _frames(n=3, h=6, w=8, dtype=np.uint8, seed=0):
    top = 255 if dtype == np.uint8 else 4095
    return np.random.default_rng(seed).integers(0, top, (n, h, w)).astype(dtype)


@pytest.mark.parametrize(
    "kind", ["uint8", "uint16_12bit", "int16_12bit", "rgb", "rgb_planar", "rgb_multiframe"]
)
def test_lazy_reader_matches_pydicoms_decoder(tmp_path, kind):
    if kind.startswith("rgb"):
        n = 3 if kind == "rgb_multiframe" else 1
        raw = np.random.default_rng(1).integers(0, 255, (n, 5, 7, 3)).astype(np.uint8)
        path = dicom.write_test_cine(tmp_path / "a.dcm", raw)
        if kind == "rgb_planar":  # planes R..., G..., B... instead of RGB triplets

            def planar(ds):
                ds.PlanarConfiguration = 1
                ds.PixelData = raw[0].transpose(2, 0, 1).tobytes()

            path = _edit(path, tmp_path / "p.dcm", planar)
    elif kind == "uint8":
        path = dicom.write_test_cine(tmp_path / "a.dcm", _frames())
    else:
        raw = _frames(dtype=np.uint16)
        raw[0, 0, :3] |= 0xF000  # garbage above BitsStored must not reach the pixels
        path = dicom.write_test_cine(tmp_path / "a.dcm", raw, bits_stored=12)
        if kind == "int16_12bit":
            path = _edit(path, tmp_path / "s.dcm", lambda ds: setattr(ds, "PixelRepresentation", 1))
    cine = dicom.DicomCine(path)
    reference = pydicom.dcmread(path).pixel_array
    reference = reference if len(cine) > 1 else reference[None]
    for i in range(len(cine)):
        np.testing.assert_array_equal(cine.raw_frame(i), reference[i])
    if kind == "int16_12bit":
        assert cine.raw_frame(0).min() < 0  # sign-extended from bit 11
    if kind.startswith("rgb"):
        np.testing.assert_array_equal(cine.rgb_frame(0), reference[0])
        luma = reference[0].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        np.testing.assert_array_equal(cine.frame(0), np.clip(np.rint(luma), 0, 255))


def test_cine_frames_are_read_lazily(tmp_path):
    raw = _frames(n=3, h=128, w=128, dtype=np.uint16)
    path = dicom.write_test_cine(tmp_path / "big.dcm", raw)
    cine = dicom.DicomCine(path)
    # Rewrite frame 2's bytes on disk after opening: a lazy reader returns the new pixels,
    # proving frames come from the file when asked for, not from a copy made at open time.
    new = raw[2][::-1].copy()
    with open(path, "r+b") as f:
        f.seek(-new.nbytes, 2)  # uncompressed pixel data ends the file; frame 2 is last
        f.write(new.astype("<u2").tobytes())
    np.testing.assert_array_equal(cine.raw_frame(2), new)
    np.testing.assert_array_equal(cine.raw_frame(0), raw[0])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_meta_saying_implicit_vr_over_an_explicit_data_set_is_read_right(tmp_path, caplog, dtype):
    # The file meta claims Implicit VR Little Endian, but the data set was written explicit:
    # re-parsing the file by the meta's word shifts the pixels by the 4 bytes of VR and padding.
    raw = _frames(n=2, dtype=dtype)
    path = dicom.write_test_cine(tmp_path / "good.dcm", raw)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    bad = tmp_path / "liar.dcm"
    with open(bad, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        fp = pydicom.filebase.DicomFileLike(f)
        pydicom.filewriter.write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
        fp.is_little_endian, fp.is_implicit_VR = True, False
        pydicom.filewriter.write_dataset(fp, pydicom.Dataset(ds))
    with pytest.warns(UserWarning):  # pydicom's own note that it switched to explicit VR
        cine = dicom.DicomCine(bad)
    for i in range(2):
        np.testing.assert_array_equal(cine.raw_frame(i), raw[i])
    assert any("says implicit VR" in r.getMessage() for r in caplog.records)


def test_palette_color_is_applied(tmp_path):
    idx = np.random.default_rng(2).integers(0, 256, (2, 6, 9)).astype(np.uint8)
    table = np.random.default_rng(3).integers(0, 65536, (256, 3)).astype(np.uint16)
    cine = dicom.DicomCine(dicom.write_test_cine(tmp_path / "pal.dcm", idx, palette=table))
    assert cine.photometric == "PALETTE COLOR"
    np.testing.assert_array_equal(cine.raw_frame(1), idx[1])  # the stored indices
    want = np.rint(table[idx[1]].astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(cine.rgb_frame(1), want)
    luma = want.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_array_equal(cine.frame(1), np.clip(np.rint(luma), 0, 255))


def test_ybr_full_is_converted_to_rgb(tmp_path):
    rgb = np.random.default_rng(4).integers(30, 225, (6, 8, 3)).astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # PS3.3 C.7.6.3.1.2: YBR_FULL from RGB (8 bit)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    ybr = np.clip(np.rint(np.stack([y, cb, cr], -1)), 0, 255).astype(np.uint8)
    path = dicom.write_test_cine(tmp_path / "ybr.dcm", ybr, photometric="YBR_FULL")
    got = dicom.DicomCine(path).rgb_frame(0).astype(int)
    assert np.abs(got - rgb).max() <= 2


def test_unusable_optional_tags_cost_a_warning_not_the_file(tmp_path, caplog):
    raw = _frames(n=2)
    path = dicom.write_test_cine(
        tmp_path / "t.dcm", raw, pixel_spacing=(0.3, 0.3), frame_time_ms=66.7, window=(100, 50)
    )
    data = path.read_bytes()
    for good, bad in ((b"0.3\\0.3 ", b"0.3 mm  "), (b"66.7", b"abc "), (b"100 ", b"x1  ")):
        assert data.count(good) == 1
        data = data.replace(good, bad)
    path.write_bytes(data)
    cine = dicom.DicomCine(path)
    assert cine.pixel_spacing_rc is None and cine.times_s is None and cine.window[0] is None
    np.testing.assert_array_equal(cine.frame(1), raw[1])
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "PixelSpacing" in warned and "FrameTime" in warned and "WindowCenter" in warned
    assert "t.dcm" in warned
    # Three numbers where two are expected: also a warning only.
    three = _edit(path, tmp_path / "three.dcm", lambda ds: setattr(ds, "PixelSpacing", [1, 2, 3]))
    assert dicom.DicomCine(three).pixel_spacing_rc is None


def test_bad_headers_give_one_line_errors_naming_the_file(tmp_path):
    good = dicom.write_test_cine(tmp_path / "good.dcm", _frames(n=4))
    cases = {
        "norows.dcm": (lambda ds: delattr(ds, "Rows"), "no Rows"),
        "zerocols.dcm": (lambda ds: setattr(ds, "Columns", 0), "Columns=0"),
        "frames.dcm": (lambda ds: setattr(ds, "NumberOfFrames", 5), "pixel data holds 192 bytes"),
        "spp.dcm": (lambda ds: setattr(ds, "SamplesPerPixel", 3), "SamplesPerPixel=3"),
        "photo.dcm": (lambda ds: setattr(ds, "PhotometricInterpretation", "HSV"), "HSV"),
    }
    for name, (change, message) in cases.items():
        bad = _edit(good, tmp_path / name, change)
        with pytest.raises(ValueError, match=message) as info:
            dicom.DicomCine(bad)
        assert name in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="is a folder"):
        dicom.DicomCine(tmp_path)


def test_truncated_file_and_pixel_limit(tmp_path):
    path = dicom.write_test_cine(tmp_path / "c.dcm", _frames(n=3, h=64, w=64))
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="cut.dcm"):
        cine = dicom.DicomCine(cut)
        cine.raw_frame(2)
    with pytest.raises(images.ImageTooLarge, match=r"c\.dcm.*64x64"):
        dicom.DicomCine(path, max_pixels=64 * 63)


@pytest.mark.parametrize(
    "kwargs,spacing,times",
    [
        ({}, None, None),
        ({"pixel_spacing": (0.25, 0.3)}, (0.25, 0.3), None),
        ({"imager_pixel_spacing": (0.4, 0.4)}, (0.4, 0.4), None),
        ({"cine_rate": 30}, None, np.arange(3) / 30),
        ({"frame_time_vector_ms": [0, 40, 50]}, None, np.array([0, 0.04, 0.09])),
    ],
)
def test_spacing_and_timing_tags(tmp_path, kwargs, spacing, times):
    raw = np.random.default_rng(0).integers(0, 255, (3, 8, 8)).astype(np.uint8)
    cine = dicom.DicomCine(dicom.write_test_cine(tmp_path / "c.dcm", raw, **kwargs))
    assert cine.pixel_spacing_rc == (None if spacing is None else pytest.approx(spacing))
    if times is None:
        assert cine.times_s is None
    else:
        np.testing.assert_allclose(cine.times_s, times)
    np.testing.assert_array_equal(cine.frame(1), raw[1])  # 8-bit frames pass unchanged
