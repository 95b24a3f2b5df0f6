"""DICOM images and cines (pydicom): lazy frames, spacing, timing, windowing, colour.

The only module of the project that imports pydicom. `DicomCine(path)` reads the header once
and decodes one frame at a time, so a 1,000-frame 1024x1024 cine never sits in memory whole.
It serves grayscale X-ray angiography cines (`frame`) and colour secondary captures such as
exported polar maps (`rgb_frame`: RGB, YBR or PALETTE COLOR, single- or multi-frame).

The decode is checked against the header: the pixel data must hold Rows x Columns x samples x
frames values, and uncompressed frames are read at the pixel data's own offset in the file,
as the data set was actually parsed (a file whose meta header claims implicit VR while the data
set is explicit VR is read correctly, with a warning, rather than shifted by a few pixels).
Every unusable header gives a one-line ValueError naming the file; an unusable optional tag
(pixel spacing, timing, window, rescale) costs a warning and is ignored.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
import tempfile

import numpy as np
import pydicom
import pydicom.pixels
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cardiac_core import images, logs
from cardiac_core.images import window_to_uint8

XA_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.12.1"  # X-Ray Angiographic Image Storage
SECONDARY_CAPTURE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
MULTIFRAME_TRUE_COLOR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7.4"
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420")
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# Each decoding plugin that fails logs its traceback before pydicom raises one error naming
# them all, which `raw_frame` turns into its one line: the logged copies are noise.
for _name in ("pydicom", "pydicom.pixels.decoders.base"):
    logs.drop_tracebacks(_name)
del _name


def _first(value):
    """DICOM multi-valued elements (e.g. two window centres): use the first value."""
    if value is None:
        return None
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return float(value[0]) if len(value) else None
    return float(value)


def _optional_number(ds, tag: str, where, default=None):
    """An optional numeric tag; an unusable value costs a warning and gives `default`."""
    value = ds.get(tag)
    if value in (None, ""):
        return default
    try:
        number = _first(value)
    except (TypeError, ValueError):
        number = float("nan")
    if number is None or not math.isfinite(number):
        logging.warning("%s: ignoring %s=%r (not a number)", where, tag, value)
        return default
    return number


def _required_int(ds, tag: str, where, *, minimum: int = 1) -> int:
    value = ds.get(tag)
    if value in (None, ""):
        raise ValueError(f"{where}: DICOM header has no {tag}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: DICOM {tag}={value!r} is not a whole number") from None
    if number < minimum:
        raise ValueError(f"{where}: DICOM {tag}={number}, expected at least {minimum}")
    return number


class DicomCine:
    """One single- or multi-frame DICOM image file, read lazily frame by frame.

    max_pixels: the per-frame pixel limit (default: cardiac_core.images' process-wide one).
    """

    def __init__(self, path, *, max_pixels: int | None = None):
        self._file = None
        self.path = pathlib.Path(path)
        if self.path.is_dir():
            raise ValueError(f"{self.path}: is a folder, not a DICOM file")
        if not self.path.is_file():
            raise FileNotFoundError(f"no such DICOM file: {self.path}")
        try:
            # Large elements (the pixel data) are read only when a frame is decoded.
            ds = pydicom.dcmread(self.path, defer_size="64 KB")
        except Exception as e:  # pydicom raises several types for a non-DICOM file
            raise ValueError(f"{self.path} is not a readable DICOM file ({e})") from None
        if "PixelData" not in ds:
            kind = "float pixel data" if "FloatPixelData" in ds else "no pixel data"
            raise ValueError(f"{self.path}: DICOM file has {kind} (8- or 16-bit PixelData needed)")
        self.ds = ds
        self.height = _required_int(ds, "Rows", self.path)
        self.width = _required_int(ds, "Columns", self.path)
        images.check_pixels(self.height, self.width, self.path, max_pixels)
        self.bits_allocated = _required_int(ds, "BitsAllocated", self.path)
        self.bits_stored = int(ds.get("BitsStored", self.bits_allocated) or self.bits_allocated)
        self.samples_per_pixel = int(ds.get("SamplesPerPixel", 1) or 1)
        self.signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        if self.bits_allocated not in (8, 16) or not 1 <= self.bits_stored <= self.bits_allocated:
            raise ValueError(
                f"{self.path}: unexpected bit depth (BitsAllocated={self.bits_allocated}, "
                f"BitsStored={self.bits_stored}); expected 8- or 12/16-bit frames"
            )
        self.photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
        expected = 3 if self.photometric in COLOUR else 1
        if self.photometric not in MONOCHROME + COLOUR + ("PALETTE COLOR",):
            raise ValueError(
                f"{self.path}: unsupported PhotometricInterpretation {self.photometric!r}"
            )
        if self.samples_per_pixel != expected:
            raise ValueError(
                f"{self.path}: SamplesPerPixel={self.samples_per_pixel} does not fit "
                f"PhotometricInterpretation {self.photometric} (expected {expected})"
            )
        self.num_frames = 1
        if ds.get("NumberOfFrames") not in (None, ""):
            self.num_frames = _required_int(ds, "NumberOfFrames", self.path)
        self.window = (
            _optional_number(ds, "WindowCenter", self.path),
            _optional_number(ds, "WindowWidth", self.path),
        )
        self.rescale = (
            _optional_number(ds, "RescaleSlope", self.path, 1.0) or 1.0,
            _optional_number(ds, "RescaleIntercept", self.path, 0.0),
        )
        self.pixel_spacing_rc = pixel_spacing_mm(ds, where=self.path)
        self.times_s = frame_times_s(ds, self.num_frames, where=self.path)
        self._native = self._native_layout()

    # ------------------------------------------------------------------------------ decoding

    def _native_layout(self):
        """(offset, dtype, frame_bytes) of uncompressed pixel data, checked; None when encoded."""
        syntax = self.ds.file_meta.get("TransferSyntaxUID")
        if syntax is not None and (syntax.is_compressed or syntax.is_deflated):
            return None
        if self.photometric in ("YBR_FULL_422", "YBR_PARTIAL_420"):
            return None  # subsampled chroma: pydicom's decoder expands it
        # Where the value starts in the file, as parsed; reading it later stays lazy.
        element = self.ds.get_item("PixelData", keep_deferred=True)
        implicit, little = self.ds.original_encoding
        if isinstance(element, pydicom.dataelem.RawDataElement):
            offset, length = element.value_tell, element.length
            # pydicom parses by the encoding it finds, which the element records
            implicit, little = element.is_implicit_VR, element.is_little_endian
        else:  # already converted by a caller: its value is in memory
            offset, length = element.file_tell, len(element.value or b"")
        if syntax is not None and syntax.is_implicit_VR != implicit:
            said, found = ("implicit", "explicit")[:: 1 if implicit is False else -1]
            logging.warning(
                "%s: the file meta says %s VR but the data set is encoded with %s VR; read as "
                "found", self.path, said, found,
            )  # fmt: skip
        itemsize = self.bits_allocated // 8
        frame_bytes = self.height * self.width * self.samples_per_pixel * itemsize
        need = frame_bytes * self.num_frames
        if length == 0xFFFFFFFF or offset is None:
            length = None
        if length is None or length < need:
            raise ValueError(
                f"{self.path}: pixel data holds {length} bytes, but {self.num_frames} frame(s) of "
                f"{self.height}x{self.width}x{self.samples_per_pixel} at {self.bits_allocated} "
                f"bits need {need}"
            )
        if length > need + 1:  # one byte of padding to an even length is allowed
            logging.warning(
                "%s: pixel data holds %d bytes, %d more than the header's frames need",
                self.path, length, length - need,
            )  # fmt: skip
        dtype = np.dtype(f"{'<' if little else '>'}{'i' if self.signed else 'u'}{itemsize}")
        return offset, dtype, frame_bytes

    def __len__(self) -> int:
        return self.num_frames

    @property
    def fps(self) -> float | None:
        t = self.times_s
        if t is None or len(t) < 2 or t[-1] <= t[0]:
            return None
        return float((len(t) - 1) / (t[-1] - t[0]))

    def raw_frame(self, i: int) -> np.ndarray:
        """Frame i as stored: (H,W) integer array, or (H,W,3) RGB for colour photometrics.

        PALETTE COLOR frames are the palette indices here; `rgb_frame` applies the palette.
        """
        if not 0 <= i < self.num_frames:
            raise IndexError(f"{self.path}: frame {i} of {self.num_frames}")
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 - kept open for lazy reads
        if self._native is not None:
            offset, dtype, frame_bytes = self._native
            self._file.seek(offset + i * frame_bytes)
            data = self._file.read(frame_bytes)
            if len(data) < frame_bytes:
                raise ValueError(f"{self.path}: frame {i} is truncated")
            raw = self._shape_native(np.frombuffer(data, dtype).astype(dtype.newbyteorder("=")))
        else:
            try:
                raw = pydicom.pixels.pixel_array(self._file, index=i)
            except Exception as e:  # pydicom's message lists each plugin on a line of its own
                reason = " ".join(str(e).split())
                raise ValueError(f"{self.path}: cannot decode frame {i} ({reason})") from None
        want = (self.height, self.width) + ((3,) if self.samples_per_pixel == 3 else ())
        if raw.shape != want:
            raise ValueError(
                f"{self.path}: frame {i} decoded to shape {raw.shape}, the header says {want}"
            )
        return raw

    def _shape_native(self, flat: np.ndarray) -> np.ndarray:
        h, w = self.height, self.width
        if self.samples_per_pixel == 3:
            planar = int(self.ds.get("PlanarConfiguration", 0) or 0)
            raw = flat.reshape(3, h, w).transpose(1, 2, 0) if planar else flat.reshape(h, w, 3)
            if self.photometric == "YBR_FULL":
                raw = pydicom.pixels.convert_color_space(raw, "YBR_FULL", "RGB")
        else:
            raw = flat.reshape(h, w)
        if self.bits_stored < self.bits_allocated:  # bits above BitsStored are not pixel data
            shift = self.bits_allocated - self.bits_stored
            raw = (raw << shift) >> shift if self.signed else raw & ((1 << self.bits_stored) - 1)
        return np.ascontiguousarray(raw)

    def rgb_frame(self, i: int) -> np.ndarray:
        """Frame i as (H,W,3) uint8 RGB: colour as stored, the palette applied, or grey x 3."""
        raw = self.raw_frame(i)
        if self.photometric == "PALETTE COLOR":
            try:
                rgb = pydicom.pixels.apply_color_lut(raw, self.ds)
            except Exception as e:
                raise ValueError(
                    f"{self.path}: unusable palette colour lookup table ({e})"
                ) from None
            bits = int(self.ds.RedPaletteColorLookupTableDescriptor[2])
            return _to_uint8(rgb, bits)
        if raw.ndim == 3:
            return _to_uint8(raw, self.bits_stored)
        return np.repeat(self.frame(i)[..., None], 3, axis=-1)

    def frame(self, i: int) -> np.ndarray:
        """Frame i as (H,W) uint8, windowed to 8 bits and MONOCHROME2 (colour: its luma)."""
        if self.photometric not in MONOCHROME:
            rgb = self.rgb_frame(i).astype(np.float32)
            return np.clip(np.rint(rgb @ _LUMA), 0, 255).astype(np.uint8)
        raw = self.raw_frame(i)
        mono1 = self.photometric == "MONOCHROME1"
        if self.bits_stored <= 8 and not self.signed and self.rescale == (1.0, 0.0):
            out = np.clip(raw, 0, 255).astype(np.uint8)
            return 255 - out if mono1 else out
        center, width = self.window
        slope, intercept = self.rescale
        return window_to_uint8(
            raw,
            center=center,
            width=width,
            monochrome1=mono1,
            slope=slope,
            intercept=intercept,
        )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self):
        self.close()


def _to_uint8(values: np.ndarray, bits: int) -> np.ndarray:
    """Colour samples of `bits` bits to 8 bits (scaled, not truncated)."""
    if bits <= 8:
        return np.clip(values, 0, 255).astype(np.uint8)
    top = float(2**bits - 1)
    return np.clip(np.rint(values.astype(np.float32) * (255.0 / top)), 0, 255).astype(np.uint8)


def _spacing_pair(ds, tag: str, where) -> tuple[float, float] | None:
    """A (row, column) spacing tag as two positive numbers; unusable values cost a warning."""
    value = ds.get(tag)
    if value in (None, ""):
        return None
    try:
        pair = tuple(float(v) for v in value)
        ok = len(pair) == 2 and all(math.isfinite(v) and v > 0 for v in pair)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        logging.warning("%s: ignoring %s=%r (not two positive numbers of mm)", where, tag, value)
        return None
    return pair


def pixel_spacing_mm(ds, *, where="DICOM") -> tuple[float, float] | None:
    """(row, column) mm per pixel at the patient, or None when the file does not say.

    Projection X-ray spacing is measured at the detector (ImagerPixelSpacing); dividing by the
    estimated radiographic magnification factor brings it to the isocentre (PS3.3 C.8.7.1.1).
    """
    imager = _spacing_pair(ds, "ImagerPixelSpacing", where)
    if imager is not None:
        mag = _optional_number(ds, "EstimatedRadiographicMagnificationFactor", where, 1.0)
        mag = mag if mag > 0 else 1.0
        return imager[0] / mag, imager[1] / mag
    return _spacing_pair(ds, "PixelSpacing", where)


def frame_times_s(ds, num_frames: int, *, where="DICOM") -> np.ndarray | None:
    """(num_frames,) acquisition times in seconds from the first frame, or None when unknown."""
    vector = ds.get("FrameTimeVector")
    if vector not in (None, ""):
        try:
            steps = np.asarray([float(v) for v in vector], np.float64)
        except (TypeError, ValueError):
            steps = np.array([np.nan])
        if len(steps) == num_frames and np.isfinite(steps).all() and (steps >= 0).all():
            # Each entry is the time since the previous frame (the first is 0).
            return np.cumsum(steps) / 1000.0
        logging.warning("%s: ignoring FrameTimeVector (not %d times in ms)", where, num_frames)
    frame_time = _optional_number(ds, "FrameTime", where)
    if frame_time is not None and frame_time > 0:
        return np.arange(num_frames) * frame_time / 1000.0
    for rate_tag in ("CineRate", "RecommendedDisplayFrameRate"):
        rate = _optional_number(ds, rate_tag, where)
        if rate is not None and rate > 0:
            return np.arange(num_frames) / rate
    return None


def is_dicom(path) -> bool:
    """True when the file carries the DICOM preamble magic."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def write_test_cine(
    path,
    frames: np.ndarray,
    *,
    bits_stored: int | None = None,
    photometric: str | None = None,
    frame_time_ms: float | None = None,
    cine_rate: float | None = None,
    frame_time_vector_ms=None,
    imager_pixel_spacing: tuple[float, float] | None = None,
    magnification: float | None = None,
    pixel_spacing: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    palette: np.ndarray | None = None,
    with_pixel_data: bool = True,
) -> pathlib.Path:
    """Writes a small uncompressed DICOM (single- or multi-frame) for tests and demos.

    Grayscale frames make an XA cine; RGB frames ((N,H,W,3) or (H,W,3) uint8) a secondary
    capture; `palette` ((E,3) uint8 or uint16 table) a PALETTE COLOR file of index frames.
    uint32 frames give a file of an unsupported bit depth (for error tests).

    Args:
      frames: (N,H,W) or (H,W) uint8 or uint16 (or uint32) pixel values, or RGB as above.
    """
    frames = np.asarray(frames)
    rgb = frames.ndim in (3, 4) and frames.shape[-1] == 3 and frames.dtype == np.uint8
    if frames.ndim == (3 if rgb else 2):
        frames = frames[None]
    if frames.dtype not in (np.uint8, np.uint16, np.uint32):
        raise ValueError(f"write_test_cine takes uint8 or uint16 frames, got {frames.dtype}")
    n, h, w = frames.shape[:3]
    bits_allocated = frames.dtype.itemsize * 8
    sop_class = XA_SOP_CLASS
    if rgb:
        sop_class = MULTIFRAME_TRUE_COLOR_SOP_CLASS if n > 1 else SECONDARY_CAPTURE_SOP_CLASS
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT" if rgb else "XA"
    ds.PatientName = "Test^Cine"
    ds.PatientID = "TEST"
    ds.Rows, ds.Columns = h, w
    ds.SamplesPerPixel = 3 if rgb else 1
    if rgb:
        ds.PlanarConfiguration = 0
    default = "RGB" if rgb else ("PALETTE COLOR" if palette is not None else "MONOCHROME2")
    ds.PhotometricInterpretation = photometric or default
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if palette is not None:
        table = np.asarray(palette)
        bits = 16 if table.dtype == np.uint16 else 8
        first = 0
        for c, colour in enumerate(("Red", "Green", "Blue")):
            setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [len(table), first, bits])
            data = table[:, c].astype("<u2")  # 8-bit entries are still stored in 16-bit words
            setattr(ds, f"{colour}PaletteColorLookupTableData", data.tobytes())
    if n > 1:
        ds.NumberOfFrames = n
    if frame_time_ms is not None:
        ds.FrameTime = f"{frame_time_ms:g}"
        ds.FrameIncrementPointer = 0x00181063
    if frame_time_vector_ms is not None:
        ds.FrameTimeVector = [f"{t:g}" for t in frame_time_vector_ms]
        ds.FrameIncrementPointer = 0x00181065
    if cine_rate is not None:
        ds.CineRate = int(cine_rate)
    if imager_pixel_spacing is not None:
        ds.ImagerPixelSpacing = [f"{s:g}" for s in imager_pixel_spacing]
    if magnification is not None:
        ds.EstimatedRadiographicMagnificationFactor = f"{magnification:g}"
    if pixel_spacing is not None:
        ds.PixelSpacing = [f"{s:g}" for s in pixel_spacing]
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
    if with_pixel_data:
        ds.PixelData = frames.astype(frames.dtype.newbyteorder("<")).tobytes()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path
