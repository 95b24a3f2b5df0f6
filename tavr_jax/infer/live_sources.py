"""Live I/O: frame sources in (grabbers, network streams, paced replays), recordings out.

Every source runs one thread that publishes frames into a `Mailbox` holding only the newest
one, stamped with its arrival time (`time.monotonic()`); the consumer takes the newest frame
when it is ready for one, so it never queues behind the source and the frames it skipped are
counted as dropped.

- `device:N`: `cv2.VideoCapture(N)`, a V4L2/UVC frame grabber or webcam;
- `rtsp://...`, `http(s)://...` (MJPEG, HLS...): `cv2.VideoCapture(url)` through FFmpeg;
- anything `streams.open_source` reads (a video, a DICOM cine, a folder of images): replayed at
  the source's own rate (the cine's FrameTime, the video's frame rate, 15 frames/s for a folder)
  or at `replay_fps`, each frame published at its scheduled time, whether or not the consumer
  kept up: a slow consumer sees drops, exactly as with a live source. A replay ends at the end of
  its file; a capture never ends by itself (a lost signal is re-opened until stopped).

Recordings (`RecordWriter`, `read_records`, `VideoRecorder`, `video_segments`): what survives a
kill is said in `tavr_jax.infer.live`'s docstring.
"""

from __future__ import annotations

import json
import os
import pathlib
import threading
import time
from typing import NamedTuple

import cv2
import numpy as np

from cardiac_core.images import to_gray_uint8
from tavr_jax.infer import streams

DEFAULT_REPLAY_FPS = 15.0  # a folder of images has no timing; the usual aortography cine rate
# A capture whose reads keep failing is re-opened after this many failures in a row, at most
# once per REOPEN_S: a grabber unplugged and plugged back, a camera or stream restarted.
FAILS_BEFORE_REOPEN = 5
REOPEN_S = 1.0
# How long FFmpeg may wait to open a network stream or for its next packet (the default is 30 s,
# which would freeze the stall report and `stop`).
NETWORK_TIMEOUT_MS = 3000
FSYNC_S = 1.0  # the most a power loss can cost of a JSONL record
VIDEO_SEGMENT_S = 10.0


class LiveSourceError(ValueError):
    """A live source that cannot be opened (one line, naming it)."""


class LiveFrame(NamedTuple):
    index: int  # frames of the source so far (a replay: the frame's index in its file)
    name: str | int  # what records call it: a folder's file name, else the index
    arrival_s: float  # time.monotonic() when it was published
    image: np.ndarray  # (H, W) uint8
    pixel_spacing_mm: float | None  # the DICOM's column spacing, when it has one


class Mailbox:
    """The newest frame only: the publisher overwrites it, the consumer takes the newest.

    `seq` counts every frame published, so a consumer that took frame `a` and then `b` knows it
    never saw `b - a - 1` frames.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._frame: LiveFrame | None = None
        self.seq = 0
        self.ended = False
        self.error: str | None = None

    def publish(self, frame: LiveFrame) -> None:
        with self._cond:
            self._frame = frame
            self.seq += 1
            self._cond.notify_all()

    def end(self, error: str | None = None) -> None:
        with self._cond:
            self.ended, self.error = True, error
            self._cond.notify_all()

    def take(self, after: int, timeout: float) -> tuple[int, LiveFrame] | None:
        """The newest frame when it is newer than seq `after`, waiting up to `timeout` s."""
        with self._cond:
            self._cond.wait_for(lambda: self.seq > after or self.ended, timeout)
            if self.seq > after:
                return self.seq, self._frame
            return None


class LiveSource:
    """One publishing thread; subclasses implement `_run` (publish until stopped or ended)."""

    kind = "live"
    fps: float | None = None  # the nominal rate, when known (video writers use it)
    first_shape: tuple[int, int] | None = None  # known before start: the engine warms up on it

    def __init__(self, description: str):
        self.description = description
        self.mailbox = Mailbox()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.count = 0  # frames published

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=f"live-{self.kind}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def publish(self, index: int, name, image: np.ndarray, spacing: float | None = None) -> None:
        self.count += 1
        self.mailbox.publish(LiveFrame(index, name, time.monotonic(), image, spacing))

    def _main(self) -> None:
        try:
            self._run()
            self.mailbox.end()
        except Exception as e:  # the consumer reports it; a source thread has nobody to raise to
            self.mailbox.end(f"{self.description}: {e}")

    def _run(self) -> None:
        raise NotImplementedError


class CaptureSource(LiveSource):
    """A frame grabber (`device:N`) or a network stream (an rtsp:// or http:// URL)."""

    def __init__(self, spec: str):
        super().__init__(spec)
        self.kind = "device" if spec.startswith("device:") else "url"
        self._cap = self._open()
        if self._cap is None:
            what = "no such V4L2/UVC device, or busy" if self.kind == "device" else "no stream"
            raise LiveSourceError(f"cannot open live source {spec}: {what}")
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and np.isfinite(fps) and 0 < fps <= 240 else None

    def _open(self):
        if self.kind == "device":
            try:
                index = int(self.description.removeprefix("device:"))
            except ValueError:
                raise LiveSourceError(
                    f"bad live source {self.description}: expected device:N with N an integer"
                ) from None
            cap = cv2.VideoCapture(index)
        else:
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, NETWORK_TIMEOUT_MS,
                      cv2.CAP_PROP_READ_TIMEOUT_MSEC, NETWORK_TIMEOUT_MS]  # fmt: skip
            cap = cv2.VideoCapture(self.description, cv2.CAP_FFMPEG, params)
        if not cap.isOpened():
            cap.release()
            return None
        return cap

    def _run(self) -> None:
        fails, index = 0, 0
        try:
            while not self._stop.is_set():
                ok, image = (False, None) if self._cap is None else self._cap.read()
                if ok and image is not None and min(image.shape[:2]) >= streams.MIN_FRAME_SIDE:
                    fails = 0
                    self.publish(index, index, to_gray_uint8(image, self.description))
                    index += 1
                    continue
                fails += 1
                if fails >= FAILS_BEFORE_REOPEN:  # the consumer reports "no signal" meanwhile
                    if self._cap is not None:
                        self._cap.release()
                    self._stop.wait(REOPEN_S)
                    self._cap = self._open()
                    fails = 0
                else:
                    self._stop.wait(0.02)
        finally:
            if self._cap is not None:
                self._cap.release()


class ReplaySource(LiveSource):
    """A video, DICOM cine or image folder published at its own rate (or `replay_fps`)."""

    kind = "replay"

    def __init__(self, path, *, replay_fps: float | None = None):
        super().__init__(str(path))
        if replay_fps is not None and not replay_fps > 0:
            raise LiveSourceError(f"--replay_fps must be positive, got {replay_fps}")
        try:
            self.source = streams.open_source(path)
            self._frames = iter(self.source)
            self._first = next(self._frames, None)  # fail now, naming the file, not mid-stream
        except (ValueError, FileNotFoundError, OSError) as e:
            raise LiveSourceError(f"cannot open live source {path}: {e}") from None
        if self._first is None:
            raise LiveSourceError(f"cannot open live source {path}: no readable frame")
        self.first_shape = self._first.image.shape
        self.replay_fps = replay_fps
        self.fps = replay_fps or self.source.fps or DEFAULT_REPLAY_FPS
        self.by_name = self.source.kind == "folder"  # records name a folder's frames by file

    def schedule_s(self, position: int, frame: streams.Frame) -> float:
        """Seconds after the replay's start at which the frame is due."""
        if self.replay_fps is None and frame.time_s is not None and self._first.time_s is not None:
            return frame.time_s - self._first.time_s  # the cine's own (possibly uneven) timing
        return position / self.fps

    def _run(self) -> None:
        start = time.monotonic()
        frame, position = self._first, 0
        while frame is not None and not self._stop.is_set():
            delay = start + self.schedule_s(position, frame) - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return
            name = frame.name if self.by_name else frame.index
            self.publish(frame.index, name, frame.image, frame.pixel_spacing_mm)
            frame, position = next(self._frames, None), position + 1

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return list(self.source.skipped)


def open_live_source(spec, *, replay_fps: float | None = None) -> LiveSource:
    """`device:N`, an rtsp/http(s) URL, or a file/folder to replay; LiveSourceError otherwise."""
    text = str(spec)
    if text.startswith("device:") or text.split("://", 1)[0] in ("rtsp", "rtsps", "http", "https"):
        if replay_fps is not None:
            raise LiveSourceError(f"--replay_fps applies to a replayed file, not to {text}")
        return CaptureSource(text)
    if "://" in text:
        raise LiveSourceError(
            f"unknown live source {text}: expected device:N, rtsp://, http(s):// or a file"
        )
    return ReplaySource(pathlib.Path(text), replay_fps=replay_fps)


# ----------------------------------------------------------------------------------------------
# Recording


class RecordWriter:
    """JSONL, one object per line, flushed per line and fsynced at least every FSYNC_S."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w")  # noqa: SIM115 - closed in close()
        self._synced = time.monotonic()

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()  # in the kernel: a killed process loses nothing written so far
        if time.monotonic() - self._synced >= FSYNC_S:
            os.fsync(self._file.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


def read_records(path) -> list[dict]:
    """The records of a live JSONL file; a torn last line (the writer was killed) is dropped.

    A line that does not parse anywhere else is a damaged file: one-line ValueError naming it.
    """
    path = pathlib.Path(path)
    try:
        lines = path.read_text(errors="replace").split("\n")
    except OSError as e:
        raise FileNotFoundError(f"cannot read live record {path}: {e.strerror}") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):  # no newline after it: the write was cut short
                break
            raise ValueError(f"{path}:{n}: not a JSON record") from None
    return records


def video_segments(path) -> list[pathlib.Path]:
    """The complete segments of a segmented overlay video, in order (the open `.part` left out)."""
    path = pathlib.Path(path)
    found = sorted(path.parent.glob(f"{path.stem}-[0-9][0-9][0-9]{path.suffix}"))
    return found or ([path] if path.is_file() else [])


class VideoRecorder:
    """The overlay video at the source's nominal rate (mp4v; MJPG for .avi), in segments.

    A processed frame is written as many times as source frames elapsed since the previous one,
    so the video plays in real time although the engine skipped frames. Frames of another size
    than the first are scaled to it (a writer has one size).
    """

    def __init__(self, path, fps: float, segment_s: float | None = VIDEO_SEGMENT_S):
        self.path, self.fps, self.segment_s = pathlib.Path(path), float(fps), segment_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = None
        self._part: pathlib.Path | None = None
        self._segment = 0
        self._started = self._last = None
        self.size: tuple[int, int] | None = None

    def _open(self, now: float) -> None:
        fourcc = cv2.VideoWriter_fourcc(*("MJPG" if self.path.suffix.lower() == ".avi" else "mp4v"))
        if self.segment_s:
            self._part = self.path.with_name(
                f"{self.path.stem}-{self._segment:03d}.part{self.path.suffix}"
            )
        else:
            self._part = self.path
        self._writer = cv2.VideoWriter(str(self._part), fourcc, self.fps, self.size)
        if not self._writer.isOpened():
            raise ValueError(f"cannot write video {self.path} (OpenCV has no {self.path.suffix})")
        self._started = now

    def _close_segment(self) -> None:
        self._writer.release()
        self._writer = None
        if self.segment_s:  # complete now: give it its final name
            done = self.path.with_name(f"{self.path.stem}-{self._segment:03d}{self.path.suffix}")
            self._part.replace(done)
            self._segment += 1

    def write(self, rgb: np.ndarray, arrival_s: float) -> None:
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        if self.size is None:
            self.size = (bgr.shape[1], bgr.shape[0])
        elif (bgr.shape[1], bgr.shape[0]) != self.size:
            bgr = cv2.resize(bgr, self.size, interpolation=cv2.INTER_AREA)
        if (
            self._writer is not None
            and self.segment_s
            and arrival_s - self._started >= self.segment_s
        ):
            self._close_segment()
        if self._writer is None:
            self._open(arrival_s)
        repeats = 1
        if self._last is not None:  # at most 2 s of repeats: a stall is not filled in
            repeats = int(min(max(round((arrival_s - self._last) * self.fps), 1), 2 * self.fps))
        self._last = arrival_s
        for _ in range(repeats):
            self._writer.write(bgr)

    def close(self) -> None:
        if self._writer is not None:
            self._close_segment()
