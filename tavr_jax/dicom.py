"""DICOM X-ray angiography / fluoroscopy cines (pydicom): lazy frames, spacing, timing, windowing.

The only module of the project that imports pydicom. `DicomCine(path)` reads the header once
and decodes one frame at a time, so a 1,000-frame 1024x1024 cine never sits in memory whole.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

import numpy as np
import pydicom
import pydicom.pixels
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tavr_jax.images import window_to_uint8

XA_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.12.1"  # X-Ray Angiographic Image Storage


def _first(value):
    """DICOM multi-valued elements (e.g. two window centres): use the first value."""
    if value is None:
        return None
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return float(value[0]) if len(value) else None
    return float(value)


class DicomCine:
    """One single- or multi-frame DICOM image file, read lazily frame by frame."""

    def __init__(self, path):
        self._file = None
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such DICOM file: {self.path}")
        try:
            # Large elements (the pixel data) are read only when a frame is decoded.
            ds = pydicom.dcmread(self.path, defer_size="64 KB")
        except Exception as e:  # pydicom raises several types for a non-DICOM file
            raise ValueError(f"{self.path} is not a readable DICOM file ({e})") from None
        if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise ValueError(f"{self.path}: DICOM file has no pixel data")
        self.ds = ds
        self.bits_allocated = int(ds.get("BitsAllocated", 0))
        self.bits_stored = int(ds.get("BitsStored", self.bits_allocated))
        self.samples_per_pixel = int(ds.get("SamplesPerPixel", 1))
        if self.bits_allocated not in (8, 16) or not 1 <= self.bits_stored <= self.bits_allocated:
            raise ValueError(
                f"{self.path}: unexpected bit depth (BitsAllocated={self.bits_allocated}, "
                f"BitsStored={self.bits_stored}); expected 8- or 12/16-bit grayscale frames"
            )
        if self.samples_per_pixel not in (1, 3):
            raise ValueError(f"{self.path}: unexpected SamplesPerPixel={self.samples_per_pixel}")
        self.num_frames = int(ds.get("NumberOfFrames", 1) or 1)
        self.height, self.width = int(ds.Rows), int(ds.Columns)
        self.photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        self.window = (_first(ds.get("WindowCenter")), _first(ds.get("WindowWidth")))
        self.rescale = (
            float(ds.get("RescaleSlope", 1.0) or 1.0),
            float(ds.get("RescaleIntercept", 0.0) or 0.0),
        )
        self.pixel_spacing_rc = pixel_spacing_mm(ds)
        self.times_s = frame_times_s(ds, self.num_frames)

    def __len__(self) -> int:
        return self.num_frames

    @property
    def fps(self) -> float | None:
        t = self.times_s
        if t is None or len(t) < 2 or t[-1] <= t[0]:
            return None
        return float((len(t) - 1) / (t[-1] - t[0]))

    def raw_frame(self, i: int) -> np.ndarray:
        """Frame i as stored: (H,W) integer array (or (H,W,3) for colour)."""
        if not 0 <= i < self.num_frames:
            raise IndexError(f"{self.path}: frame {i} of {self.num_frames}")
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 - kept open for lazy reads
        try:
            return pydicom.pixels.pixel_array(self._file, index=i)
        except Exception as e:
            raise ValueError(f"{self.path}: cannot decode frame {i} ({e})") from None

    def frame(self, i: int) -> np.ndarray:
        """Frame i as (H,W) uint8, windowed to 8 bits and MONOCHROME2."""
        raw = self.raw_frame(i)
        if raw.ndim == 3:  # colour export of a grayscale image: take the luma
            raw = raw.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        mono1 = self.photometric == "MONOCHROME1"
        if self.bits_stored <= 8 and self.rescale == (1.0, 0.0):
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


def pixel_spacing_mm(ds) -> tuple[float, float] | None:
    """(row, column) mm per pixel at the patient, or None when the file does not say.

    Projection X-ray spacing is measured at the detector (ImagerPixelSpacing); dividing by the
    estimated radiographic magnification factor brings it to the isocentre (PS3.3 C.8.7.1.1).
    """
    imager = ds.get("ImagerPixelSpacing")
    if imager is not None and len(imager) == 2:
        mag = ds.get("EstimatedRadiographicMagnificationFactor")
        mag = float(mag) if mag not in (None, "") and float(mag) > 0 else 1.0
        return float(imager[0]) / mag, float(imager[1]) / mag
    spacing = ds.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2:
        return float(spacing[0]), float(spacing[1])
    return None


def frame_times_s(ds, num_frames: int) -> np.ndarray | None:
    """(num_frames,) acquisition times in seconds from the first frame, or None when unknown."""
    vector = ds.get("FrameTimeVector")
    if vector is not None and len(vector) == num_frames:
        # Each entry is the time since the previous frame (the first is 0).
        return np.cumsum(np.asarray(vector, np.float64)) / 1000.0
    frame_time = ds.get("FrameTime")
    if frame_time not in (None, "") and float(frame_time) > 0:
        return np.arange(num_frames) * float(frame_time) / 1000.0
    for rate_tag in ("CineRate", "RecommendedDisplayFrameRate"):
        rate = ds.get(rate_tag)
        if rate not in (None, "") and float(rate) > 0:
            return np.arange(num_frames) / float(rate)
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
    photometric: str = "MONOCHROME2",
    frame_time_ms: float | None = None,
    cine_rate: float | None = None,
    frame_time_vector_ms=None,
    imager_pixel_spacing: tuple[float, float] | None = None,
    magnification: float | None = None,
    pixel_spacing: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    with_pixel_data: bool = True,
) -> pathlib.Path:
    """Writes a small uncompressed XA DICOM (single- or multi-frame) for tests and demos.

    uint32 frames give a file of an unsupported bit depth (for error tests).

    Args:
      frames: (N,H,W) or (H,W) uint8 or uint16 (or uint32) pixel values.
    """
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.dtype not in (np.uint8, np.uint16, np.uint32):
        raise ValueError(f"write_test_cine takes uint8 or uint16 frames, got {frames.dtype}")
    n, h, w = frames.shape
    bits_allocated = frames.dtype.itemsize * 8
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = XA_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = XA_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "XA"
    ds.PatientName = "Test^Cine"
    ds.PatientID = "TEST"
    ds.Rows, ds.Columns = h, w
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
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
