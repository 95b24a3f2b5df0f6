"""Frame sources (image, folder of images, video, DICOM cine) and device prefetching.

Every source iterates `Frame(index, time_s, image uint8 (H,W), pixel_spacing_mm, name)`; the
time is None when the source does not know it, the spacing is the column (x) spacing in mm
per pixel or None, the name says where the frame came from (a file of a folder, with `#k` for
frame k of a multi-frame DICOM). `source.pixel_spacing_rc` gives (row, column) spacing for
anisotropic pixels.

A batch never dies of one bad item: a folder's unreadable file, a frame of a cine that cannot
be decoded, a video that ends before its header's frame count, or a frame smaller than
`MIN_FRAME_SIDE` are skipped, and `source.skipped` lists `(name, reason)` for each, so the
caller can write what was good and report the rest.
"""

from __future__ import annotations

import pathlib
import queue
import re
import threading
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import cv2
import jax
import numpy as np

from cardiac_core import dicom, images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".webp")
DICOM_SUFFIXES = (".dcm", ".dicom")
# Below this many pixels a side a frame holds no anatomy to find: the network would still
# "report" points on a 1x1 image, so such frames are refused instead.
MIN_FRAME_SIDE = 16


class Frame(NamedTuple):
    index: int
    time_s: float | None
    image: np.ndarray  # (H, W) uint8
    pixel_spacing_mm: float | None
    name: str | None = None


def check_frame_size(image: np.ndarray | tuple[int, int], what) -> np.ndarray:
    """The frame (or its (height, width)), or a one-line ValueError when a side is too small."""
    h, w = image if isinstance(image, tuple) else image.shape[:2]
    if min(h, w) < MIN_FRAME_SIDE:
        raise ValueError(
            f"{what}: frame is {w}x{h}, smaller than the {MIN_FRAME_SIDE} px minimum side"
        )
    return image


def read_image(path) -> np.ndarray:
    """One image file (PNG/JPEG/TIFF..., or a single-frame DICOM) as (H,W) uint8."""
    path = pathlib.Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES or dicom.is_dicom(path):
        cine = dicom.DicomCine(path)
        return check_frame_size(cine.frame(0), path)
    return check_frame_size(images.read_gray(path), path)


def _natural_key(p: pathlib.Path):
    # frame2.png sorts before frame10.png
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]


class FrameSource:
    """Base class: a re-iterable sequence of frames with optional timing and spacing."""

    kind = "frames"
    fps: float | None = None
    pixel_spacing_rc: tuple[float, float] | None = None

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.skipped: list[tuple[str, str]] = []  # (name, reason), filled while iterating

    @property
    def pixel_spacing_mm(self) -> float | None:
        return None if self.pixel_spacing_rc is None else self.pixel_spacing_rc[1]

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError


class ImageSource(FrameSource):
    """One image file, or a folder of images and DICOM files (natural sort order); no timing.

    A multi-frame DICOM in a folder contributes all its frames, named `file#k`.
    """

    def __init__(self, path):
        super().__init__(path)
        if self.path.is_dir():
            self.kind = "folder"
            self.files = sorted(
                (
                    p
                    for p in self.path.iterdir()
                    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + DICOM_SUFFIXES
                ),
                key=_natural_key,
            )
            if not self.files:
                raise ValueError(
                    f"folder {self.path} holds no images ({', '.join(IMAGE_SUFFIXES)})"
                )
        else:
            self.kind = "image"
            self.files = [self.path]
            read_image(self.path)  # fail now, naming the file, rather than mid-stream

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[Frame]:
        self.skipped = []
        index = 0
        for f in self.files:
            try:
                if f.suffix.lower() in DICOM_SUFFIXES or dicom.is_dicom(f):
                    cine = dicom.DicomCine(f)
                    n = len(cine)
                    for k in range(n):
                        name = f.name if n == 1 else f"{f.name}#{k}"
                        try:
                            image = check_frame_size(cine.frame(k), name)
                        except ValueError as e:
                            self.skipped.append((name, str(e)))
                            continue
                        yield Frame(index, None, image, None, name)
                        index += 1
                    continue
                image = read_image(f)
            except (ValueError, FileNotFoundError) as e:
                if self.kind == "image":
                    raise
                self.skipped.append((f.name, str(e)))
                continue
            yield Frame(index, None, image, None, f.name)
            index += 1


class VideoSource(FrameSource):
    """Any video OpenCV reads; times from its frame rate."""

    kind = "video"

    def __init__(self, path):
        super().__init__(path)
        cap = self._open()
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and np.isfinite(fps) and fps > 0 else None
        self._count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        ok, first = cap.read()
        cap.release()
        if not ok:
            raise ValueError(f"cannot read video {self.path}: no decodable frame")
        check_frame_size(first, self.path)

    def _open(self):
        if not self.path.is_file():
            raise FileNotFoundError(f"no such video file: {self.path}")
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            raise ValueError(f"cannot read video {self.path}: OpenCV cannot open it")
        return cap

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Frame]:
        self.skipped = []
        cap = self._open()
        try:
            i = 0
            while True:
                ok, image = cap.read()
                if not ok:
                    break
                t = i / self.fps if self.fps else None
                name = f"{self.path.name}#{i}"
                image = check_frame_size(images.to_gray_uint8(image, self.path), self.path)
                yield Frame(i, t, image, None, name)
                i += 1
        finally:
            cap.release()
        if self._count and i < self._count:  # a truncated file: keep what decoded, say so
            self.skipped.append(
                (
                    f"{self.path.name}#{i}-{self._count - 1}",
                    f"{self.path}: video ended after {i} of the {self._count} frames its "
                    "header announces (truncated file?)",
                )
            )


class DicomSource(FrameSource):
    """A single- or multi-frame DICOM cine, decoded one frame at a time."""

    kind = "dicom"

    def __init__(self, path):
        super().__init__(path)
        self.cine = dicom.DicomCine(self.path)
        check_frame_size((self.cine.height, self.cine.width), self.path)
        self.pixel_spacing_rc = self.cine.pixel_spacing_rc
        self.fps = self.cine.fps

    def __len__(self) -> int:
        return len(self.cine)

    def __iter__(self) -> Iterator[Frame]:
        self.skipped = []
        times = self.cine.times_s
        for i in range(len(self.cine)):
            t = None if times is None else float(times[i])
            name = f"{self.path.name}#{i}"
            try:
                image = self.cine.frame(i)
            except ValueError as e:  # a truncated cine: its decodable frames still count
                self.skipped.append((name, str(e)))
                continue
            yield Frame(i, t, image, self.pixel_spacing_mm, name)


def open_source(path) -> FrameSource:
    """The frame source for a path: image, folder, DICOM (by magic or suffix) or video."""
    path = pathlib.Path(path)
    if path.is_dir():
        return ImageSource(path)
    if not path.exists():
        raise FileNotFoundError(f"no such input: {path}")
    if path.suffix.lower() in DICOM_SUFFIXES or dicom.is_dicom(path):
        return DicomSource(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return ImageSource(path)
    return VideoSource(path)


def batch_frames(frames: Iterable[Frame], batch_size: int) -> Iterator[list[Frame]]:
    """Groups frames into lists of at most batch_size, cutting where the frame size changes."""
    batch: list[Frame] = []
    for f in frames:
        if batch and f.image.shape != batch[0].image.shape:
            yield batch
            batch = []
        batch.append(f)
        if len(batch) == batch_size:  # hand a full batch on at once, before decoding more
            yield batch
            batch = []
    if batch:
        yield batch


_END = object()


def prefetch_to_device(
    frames: Iterable[Frame],
    *,
    batch_size: int,
    device: jax.Device | None = None,
    depth: int = 2,
) -> Iterator[tuple[list[Frame], jax.Array]]:
    """Decodes, batches and copies frames to the device in a background thread.

    Yields `(frames, device_batch)` with the batch zero-padded to batch_size. With depth=2 the
    thread decodes and transfers batch t+1 while the caller runs batch t (double buffering).
    Exceptions of the decoder are re-raised in the caller.
    """
    device = device or jax.devices()[0]
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for batch in batch_frames(frames, batch_size):
                stack = np.stack([f.image for f in batch])
                if len(batch) < batch_size:
                    pad = np.zeros((batch_size - len(batch), *stack.shape[1:]), np.uint8)
                    stack = np.concatenate([stack, pad])
                # device_put returns at once; the copy proceeds while the caller computes.
                if not put((batch, jax.device_put(stack, device))):
                    return
            put(_END)
        except BaseException as e:  # hand the error to the consumer
            put(e)

    thread = threading.Thread(target=work, name="frame-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
