"""Uploaded bytes -> frames, with every size read from a header before anything is decoded.

An upload is recognised by its content, never its name: DICOM by its magic, an image when
its header parses, anything else is tried as a video. Width x height must be within
`Limits.max_pixels` (images: the file header; videos: the container; DICOM: Rows/Columns),
and the frames decoded are at most `max_frames` and `max_total_pixels` together; the rest of
a longer sequence is left undecoded and the result says so. Every failure is a BadInput:
413 too large, 415 not a recognised medium, 422 recognised but unusable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import pathlib

import cv2
import numpy as np

from cardiac_core import images
from cardiac_web.guards import BadInput, Limits
from tavr_jax.infer import streams

log = logging.getLogger(__name__)
NOT_MEDIA = "media: not an image, a video or a DICOM file"


@dataclasses.dataclass
class Media:
    kind: str  # "image", "video" or "dicom"
    frames: list[np.ndarray]  # (H, W) uint8 each, all of one size
    times: list[float | None]  # seconds from the first frame, None when unknown
    fps: float | None
    pixel_spacing_mm: float | None
    total_frames: int  # frames the file announces (>= len(frames) unless it lies)
    warning: str | None = None  # why fewer frames than announced were decoded


def sniff(data: bytes) -> str:
    """'dicom', 'image' or 'video' from the bytes alone (decodes nothing)."""
    if len(data) > 132 and data[128:132] == b"DICM":
        return "dicom"
    if images.header_size(data) is not None:
        return "image"
    return "video"


@contextlib.contextmanager
def decoding(what: str, status: int, folder: pathlib.Path | str | None = None):
    """Turns any decoder failure into BadInput: 413 too large, else `status`.

    Decoders of untrusted files raise many exception types (pydicom raises AttributeError
    for a file without Rows); each becomes one line naming `what`, never a 500. The server's
    temporary `folder` is cut from messages, leaving the file's own name (the form field).
    """

    def clean(e) -> str:
        return str(e).replace(f"{folder}{os.sep}", "") if folder is not None else str(e)

    try:
        yield
    except BadInput:
        raise
    except images.ImageTooLarge as e:
        raise BadInput(clean(e), 413) from None
    except (ValueError, FileNotFoundError) as e:
        raise BadInput(clean(e), status) from None
    except Exception as e:
        log.warning("unusable upload %s: %r", what, e)
        raise BadInput(f"{what}: unusable file ({type(e).__name__}: {clean(e)})", status) from None


def frame_budget(height: int, width: int, announced: int, limits: Limits) -> int:
    """How many frames of height x width to decode; ImageTooLarge when one is over the limit."""
    images.check_pixels(height, width, "media", limits.max_pixels)
    by_pixels = limits.max_total_pixels // max(1, height * width)
    announced = announced if announced > 0 else limits.max_frames  # unknown: up to the bound
    return max(1, min(announced, limits.max_frames, by_pixels))


def decode_media(data: bytes, folder: pathlib.Path, limits: Limits) -> Media:
    """Decodes an uploaded frame, video or DICOM cine; video and DICOM go through `folder`."""
    kind = sniff(data)
    if kind == "image":
        with decoding("media", 415):
            image = images.decode(data, "media", max_pixels=limits.max_pixels)
            frame = images.to_gray_uint8(image, "media")
        with decoding("media", 422):  # the command line's minimum frame side, the same words
            streams.check_frame_size(frame, "media")
        return Media("image", [frame], [None], None, None, 1)
    # Named after the form field: decoders' messages then name it, not a server path.
    path = folder / "media"
    path.write_bytes(data)
    if kind == "dicom":
        with decoding("media", 422, folder):
            source = streams.DicomSource(path)  # reads the header only
            announced = len(source.cine)
            budget = frame_budget(source.cine.height, source.cine.width, announced, limits)
    else:
        with decoding("media", 415, folder):
            height, width, announced = _video_header(path)
        with decoding("media", 422, folder):  # a container OpenCV opens: a video, maybe broken
            budget = frame_budget(height, width, announced, limits)
            source = streams.VideoSource(path)  # decodes the first frame
    return _decode_frames(source, budget, announced, folder, limits)


def _video_header(path: pathlib.Path) -> tuple[int, int, int]:
    """(height, width, frame count or 0) from the container; opening decodes no frame."""
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise BadInput(NOT_MEDIA + " (OpenCV cannot open it as a video)", 415)
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        count = int(max(0, capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0))
    finally:
        capture.release()
    if width <= 0 or height <= 0:
        raise BadInput(NOT_MEDIA + " (a video without a frame size)", 415)
    return height, width, count


def _decode_frames(source, budget: int, announced: int, folder, limits: Limits) -> Media:
    """Up to `budget` frames; a failure after the first frame keeps what was decoded."""
    frames, times, warning = [], [], None
    iterator = itertools.islice(iter(source), budget)
    while True:
        try:
            with decoding("media", 422, folder):
                frame = next(iterator, None)
                if frame is not None:  # a header can lie: the decoded size is checked too
                    images.check_pixels(*frame.image.shape, "media", limits.max_pixels)
        except BadInput as e:
            if not frames or e.status == 413:
                raise
            warning = f"stopped at frame {len(frames)}: {e}"
            break
        if frame is None:
            break
        if frames and frame.image.shape != frames[0].shape:
            raise BadInput("media: frames of different sizes in one sequence", 422)
        frames.append(frame.image)
        times.append(frame.time_s)
    if not frames:
        raise BadInput("media: no frames could be decoded", 422)
    total = max(announced, len(frames))
    if warning is None and len(frames) < total:
        if len(frames) == budget:
            warning = (f"decoded the first {len(frames)} of {total} frames (server limits "
                       "--max_frames, --max_total_pixels)")  # fmt: skip
        else:
            warning = f"the file holds {len(frames)} decodable frames, its header says {total}"
            skipped = getattr(source, "skipped", [])  # what the source passed over, and why
            if skipped:
                warning += f" ({str(skipped[0][1]).replace(f'{folder}/', '')})"
    return Media(source.kind, frames, times, source.fps, source.pixel_spacing_mm, total, warning)
