"""Live guidance: the newest frame of a grabber, stream or paced replay through the engine, the
point tracker and the guidance readouts, recorded as it goes.

`LiveSession(engine, source, ...)` runs one loop thread that always takes the newest frame (the
source keeps only that one, `live_sources`), so the readout never lags behind the source;
frames that arrived while the engine was busy are counted as dropped. Per processed frame:
engine -> `PointTracker` (the run's thresholds through the offline path's `Gate`) ->
`GuidanceTracker` -> one record (see `LiveSession`), appended to a JSONL file and, on request,
drawn into an overlay video. `run_live` is the terminal front end of `experiments/tavr_live.py`.

Times: `arrival_s` and `ready_s` are seconds on `time.monotonic()` since the session started.
Millimetres: the frame's DICOM spacing, else the user's `mm_per_px`, else uncalibrated (px).

What survives a kill (SIGKILL, power loss):
- the JSONL record: each line is written and flushed whole, and fsynced at least every
  `FSYNC_S`; after a kill every line up to the last complete one parses, and `read_records`
  drops a torn last line;
- the overlay video: MP4 (and AVI) containers are only readable once closed (the MP4 index is
  written at the end), so the video is written in segments of `video_segment_s` seconds,
  `OUT-000.mp4`, `OUT-001.mp4`, ..., each complete when the next starts; the segment open at the
  kill is left as `OUT-NNN.part.mp4` and is not readable. `video_segment_s=None` writes the one
  file `OUT.mp4`, readable only after a clean stop.
"""

from __future__ import annotations

import collections
import math
import sys
import threading
import time

import cv2
import numpy as np

from tavr_jax.infer.guidance import GuidanceTracker
from tavr_jax.infer.live_sources import (
    VIDEO_SEGMENT_S,
    LiveSource,
    LiveSourceError,
    RecordWriter,
    VideoRecorder,
    open_live_source,
    read_records,
    video_segments,
)
from tavr_jax.infer.tracking import PointTracker
from tavr_jax.reporting import Gate
from tavr_jax.visualize import draw_keypoints, draw_legend

__all__ = ["LiveSession", "LiveSourceError", "read_records", "run_live", "video_segments"]

RATE_WINDOW_S = 5.0  # processed_fps and dropped_fps: over the last seconds
AGE_WINDOW = 2000  # age percentiles over the last processed frames
ANNULUS = ("AA1", "AA2")
INFLOW = ("FE1", "FE2")


# ----------------------------------------------------------------------------------------------
# Overlay


def _dashed(img, p0, p1, color, thick, dash=8.0) -> None:
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    n = max(1, int(np.linalg.norm(p1 - p0) // dash))
    for i in range(0, n, 2):
        a = p0 + (p1 - p0) * i / n
        b = p0 + (p1 - p0) * min(i + 1, n) / n
        cv2.line(img, tuple(map(round, a)), tuple(map(round, b)), color, thick, cv2.LINE_AA)


def _text(img, text, org, scale, color) -> None:
    # On a dark box: an outline drawn thicker drifts along a long line (Hershey advances grow
    # with thickness), and the readout must stay legible on bright lung fields.
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    x, y = org
    cv2.rectangle(img, (x - 2, y - h - 2), (x + w + 2, y + base), (0, 0, 0), -1)
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, color, 1, cv2.LINE_AA)


def readout_text(record: dict) -> str:
    """The depth and angle readout of a record, with its units ("FE1 4.2 / FE2 3.9 mm ...")."""
    depth = record.get("depth_mm") or record.get("depth_px")
    unit = "mm" if record.get("depth_mm") else "px"
    parts = []
    if depth and any(depth.get(k) is not None for k in INFLOW):
        parts.append("depth " + " / ".join(
            f"{k} {depth[k]:.1f}" if depth.get(k) is not None else f"{k} -" for k in INFLOW
        ) + f" {unit}")  # fmt: skip
    else:
        parts.append("depth -")
    if record.get("angle_deg") is not None:
        parts.append(f"angle {record['angle_deg']:.1f} deg")
    return "  ".join(parts)


def draw_overlay(schema, image, coords, reported, probability, record, annulus_xy=None):
    """The frame with its points, the annular line (dashed and labelled when carried), the valve
    inflow edge FE1-FE2, the depth readout and the alerts; (H, W, 3) uint8 RGB."""
    rgb = draw_keypoints(image, coords, reported, schema, marker="cross", probabilities=probability)
    draw_legend(rgb, schema)
    h, w = rgb.shape[:2]
    thick = max(1, round(max(h, w) / 400))
    scale = max(0.4, max(h, w) / 1100)
    index = {n: i for i, n in enumerate(schema.point_names)}
    if all(n in index for n in INFLOW) and all(reported[index[n]] for n in INFLOW):
        a, b = (tuple(map(round, coords[index[n]])) for n in INFLOW)
        cv2.line(rgb, a, b, (80, 220, 255), thick, cv2.LINE_AA)
    if annulus_xy is not None and record.get("annulus"):
        a, b = annulus_xy
        if record["annulus"] == "carried":
            _dashed(rgb, a, b, (255, 170, 60), thick)
            _text(rgb, "carried", (round(b[0]) + 4, round(b[1])), scale, (255, 170, 60))
        else:
            cv2.line(rgb, tuple(map(round, a)), tuple(map(round, b)), (255, 170, 60), thick,
                     cv2.LINE_AA)  # fmt: skip
    (_, text_h), base = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    step = text_h + base + 5  # one line of text on its box
    _text(rgb, readout_text(record), (6, h - 8 - step * len(record.get("alerts") or [])), scale,
          (255, 255, 255))  # fmt: skip
    for i, alert in enumerate(reversed(record.get("alerts") or [])):  # listed top to bottom
        _text(rgb, str(alert), (6, h - 8 - step * i), scale, (255, 80, 80))
    return rgb


# ----------------------------------------------------------------------------------------------
# The session


def _jsonable(x):
    """Guidance outputs as plain JSON: numpy scalars and arrays unwrapped, NaN -> null."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple | np.ndarray):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.bool_ | bool):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        return None if not math.isfinite(x) else round(float(x), 4)
    return x


class LiveSession:
    """The newest-frame loop over one live source; see the module docstring.

    source: `device:N`, an rtsp/http(s) URL, a file or folder to replay, or a `LiveSource`.
    Each processed frame's record: `frame` (a folder's file name, else the index), `arrival_s`,
    `ready_s`, `width`, `height`, `points` {name: [x, y, p] in frame pixels, or null when not
    reported}, the guidance readouts (`depth_mm` {"FE1","FE2"} or `depth_px` when uncalibrated,
    `depth_sd`, `angle_deg`, `annulus`, `annulus_age_s`, `stage`, `stage_source`, `alerts`,
    `units`, `calibrated`), `mm_per_px`, `processed` and `dropped_total`.
    """

    def __init__(self, engine, source, *, replay_fps=None, mm_per_px=None, target_depth_mm=None,
                 stage_prior=None, record=None, record_video=None, max_seconds=None,
                 stall_s: float = 2.0, track: str = "kalman", expect=None,
                 video_segment_s: float | None = VIDEO_SEGMENT_S):  # fmt: skip
        if getattr(engine, "batch_size", 1) > 1 and hasattr(engine, "with_batch_size"):
            engine = engine.with_batch_size(1)  # one frame at a time: no padding to a batch
        self.engine, self.schema = engine, engine.schema
        self.source_spec, self.replay_fps = source, replay_fps
        self.mm_per_px, self.target_depth_mm = mm_per_px, target_depth_mm
        self.stage_prior, self.track, self.expect = stage_prior, track, expect
        self.record_path, self.video_path = record, record_video
        self.max_seconds, self.stall_s, self.video_segment_s = max_seconds, stall_s, video_segment_s
        self.source: LiveSource | None = None
        # Bad thresholds, stage prior, target or spacing fail here, before anything starts.
        self.gate = Gate.from_meta(engine.meta, self.schema, expect=expect)
        self._trackers()
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._latest = None  # (seq, record, draw args)
        self._jpeg: tuple[int, bytes] | None = None
        self._writers: list = []
        self.processed = self.dropped = 0
        self.status, self.end_reason = "starting", None
        self._rates: collections.deque = collections.deque()  # (ready monotonic, dropped_total)
        self._ages: collections.deque = collections.deque(maxlen=AGE_WINDOW)
        self._t0 = time.monotonic()
        self._started = self._ended = None  # the source's start, the loop's end (monotonic)
        self._taken = 0  # the source's seq of the last frame the loop took

    # -- control ------------------------------------------------------------------------------

    def start(self) -> None:
        """Opens the source (LiveSourceError when it cannot) and the record; starts the loop."""
        if self._thread is not None:
            raise RuntimeError("a LiveSession starts once")
        spec = self.source_spec
        self.source = spec if isinstance(spec, LiveSource) else open_live_source(
            spec, replay_fps=self.replay_fps)  # fmt: skip
        self.description = self.source.description
        self._t0 = time.monotonic()
        self._record = RecordWriter(self.record_path) if self.record_path else None
        self._video = None
        if self.video_path:
            self._video = VideoRecorder(self.video_path, self.source.fps or 15.0,
                                        self.video_segment_s)  # fmt: skip
        self._writers = [w for w in (self._record, self._video) if w is not None]
        self._thread = threading.Thread(target=self._main, name="live-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends the session (idempotent): joins the threads, closes the files."""
        self._stop.set()
        if self.source is not None:
            self.source.stop()
        if self._thread is not None:
            self._thread.join()
        self._close_writers()
        if self.status not in ("ended",) and not self.status.startswith("error"):
            self.status, self.end_reason = "ended", self.end_reason or "stopped"

    def wait(self, timeout: float | None = None) -> bool:
        """Waits for the loop to end by itself (end of a replay, max_seconds, an error)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- what the web page and the terminal read ---------------------------------------------

    def latest(self):
        """(seq, record, overlay JPEG bytes) of the newest processed frame, or None yet."""
        with self._cond:
            latest = self._latest
        if latest is None:
            return None
        seq, record, draw = latest
        cached = self._jpeg
        if cached is None or cached[0] != seq:  # drawn on demand, off the loop thread
            rgb = draw if isinstance(draw, np.ndarray) else draw_overlay(self.schema, *draw)
            ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                                   [cv2.IMWRITE_JPEG_QUALITY, 85])  # fmt: skip
            cached = self._jpeg = (seq, buf.tobytes() if ok else b"")
        return seq, record, cached[1]

    def wait_newer(self, seq: int, timeout: float):
        """`latest()` once a frame newer than `seq` is processed; None on timeout or at the end."""
        with self._cond:
            self._cond.wait_for(
                lambda: (self._latest is not None and self._latest[0] > seq) or not self.running,
                timeout,
            )
            newer = self._latest is not None and self._latest[0] > seq
        return self.latest() if newer else None

    def stats(self) -> dict:
        now = self._ended or time.monotonic()  # an ended session's rates stay as they were
        with self._cond:
            rates = list(self._rates)
            ages = np.array(self._ages, np.float64)
        window = min(RATE_WINDOW_S, max(now - (self._started or now), 1e-6))
        recent = [(t, d) for t, d in rates if t >= now - window]
        dropped_recent = (recent[-1][1] - recent[0][1]) if len(recent) > 1 else 0
        return {
            "status": self.status,
            "source": getattr(self, "description", str(self.source_spec)),
            "processed": self.processed,
            "dropped": self.dropped,
            "processed_fps": round(len(recent) / window, 2),
            "dropped_fps": round(dropped_recent / window, 2),
            "age_ready_p50_ms": _percentile(ages, 50),
            "age_ready_p99_ms": _percentile(ages, 99),
            "elapsed_s": round(now - self._t0, 3),
            # seconds the source ran (warm-up excluded): totals / run_s are whole-session rates
            "run_s": None
            if self._started is None
            else round((self._ended or now) - self._started, 3),
            "end_reason": self.end_reason,
        }

    # -- the loop -----------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._loop()
        except Exception as e:  # one line for the page and the terminal; the loop is over
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            self.status, self.end_reason = f"error: {message}", "error"
        finally:
            self._ended = time.monotonic()
            self.source.stop()  # then what it published and the loop never took was dropped
            self.dropped += self.source.mailbox.seq - self._taken
            self._close_writers()
            with self._cond:
                self._cond.notify_all()

    def _loop(self) -> None:
        source = self.source
        if source.first_shape is not None:  # compile before the replay's clock starts
            self.engine(np.zeros((1, *source.first_shape), np.uint8))
        shapes = {source.first_shape}
        self._trackers()
        source.start()
        started = last_frame = self._started = time.monotonic()
        self.status = "running"
        while not self._stop.is_set():
            now = time.monotonic()
            if self.max_seconds is not None and now - started >= self.max_seconds:
                self.end_reason = "max_seconds"
                break
            got = source.mailbox.take(self._taken, timeout=0.05)
            if got is None:
                if source.mailbox.ended:
                    if source.mailbox.error:
                        raise RuntimeError(source.mailbox.error)
                    self.end_reason = "end of replay"
                    break
                if now - last_frame > self.stall_s:
                    self.status = "no signal"
                continue
            seq, frame = got
            self.dropped += seq - self._taken - 1
            self._taken, last_frame = seq, time.monotonic()
            self.status = "running"
            new_size = frame.image.shape not in shapes
            if new_size:  # another zoom or binning: the tracks of the old size mean nothing here
                shapes.add(frame.image.shape)
                self._trackers()
            self._process(frame, new_size)
        self.status, self.end_reason = "ended", self.end_reason or "stopped"

    def _trackers(self) -> None:
        """Fresh point and guidance trackers (at the start and for each new frame size)."""
        fps = None if self.source is None else self.source.fps
        self._tracker = PointTracker(self.schema, self.gate, method=self.track, fps=fps)
        self._guidance = GuidanceTracker(self.schema, mm_per_px=self.mm_per_px,
                                         target_depth_mm=self.target_depth_mm,
                                         stage_prior=self.stage_prior)  # fmt: skip
        self._annulus_xy = self._annulus_pt = None  # the annulus last seen, and PT then

    def _process(self, frame, new_size: bool) -> None:
        out = self.engine(frame.image[None])
        probability, group, xy = out["visibility"][0], out["group"][0], out["coords"][0]
        arrival = frame.arrival_s - self._t0
        coords, reported = self._tracker.update(probability, group, xy, arrival)
        spacing = frame.pixel_spacing_mm or self.mm_per_px
        readout = self._guidance.update(arrival, coords, probability, reported, mm_per_px=spacing)
        ready = time.monotonic() - self._t0
        names = self.schema.point_names
        index = {n: i for i, n in enumerate(names)}
        pt = coords[index["PT"]].copy() if "PT" in index and reported[index["PT"]] else None
        if all(n in index for n in ANNULUS) and all(reported[index[n]] for n in ANNULUS):
            self._annulus_xy = tuple(coords[index[n]].copy() for n in ANNULUS)
            self._annulus_pt = pt
        annulus_xy = self._annulus_xy
        if readout.get("annulus") == "carried" and pt is not None and self._annulus_pt is not None:
            # drawn where the guidance carries it: moved with the pigtail tip since last seen
            annulus_xy = tuple(a + (pt - self._annulus_pt) for a in self._annulus_xy)
        self.processed += 1
        record = {
            "frame": frame.name,
            "arrival_s": round(arrival, 4),
            "ready_s": round(ready, 4),
            "width": int(frame.image.shape[1]),
            "height": int(frame.image.shape[0]),
            "points": {
                n: [
                    round(float(coords[k, 0]), 2),
                    round(float(coords[k, 1]), 2),
                    round(float(probability[k]), 4),
                ]
                if reported[k]
                else None  # fmt: skip
                for k, n in enumerate(names)
            },
            **_jsonable(dict(readout)),
            "mm_per_px": None if spacing is None else float(spacing),
            "processed": self.processed,
            "dropped_total": self.dropped,
        }
        if new_size:
            record["new_size"] = True
        draw = (frame.image, coords, reported, probability, record, annulus_xy)
        if self._video is not None:
            draw = draw_overlay(self.schema, *draw)
            self._video.write(draw, frame.arrival_s)
        if self._record is not None:
            self._record.write(record)
        with self._cond:
            self._latest = (self.processed, record, draw)
            self._rates.append((time.monotonic(), self.dropped))
            while self._rates and self._rates[0][0] < time.monotonic() - RATE_WINDOW_S:
                self._rates.popleft()
            if not new_size:  # the first frame of a new size waited for its compilation
                self._ages.append(1000.0 * (ready - arrival))
            self._cond.notify_all()

    def _close_writers(self) -> None:
        writers, self._writers = self._writers, []
        for w in writers:
            w.close()


def _percentile(values: np.ndarray, q: float):
    return None if values.size == 0 else round(float(np.percentile(values, q)), 2)


# ----------------------------------------------------------------------------------------------
# The terminal front end


def summary_line(stats: dict) -> str:
    elapsed = max(stats["run_s"] or stats["elapsed_s"], 1e-6)
    return (
        f"{stats['processed']} frames processed ({stats['processed'] / elapsed:.1f} fps), "
        f"{stats['dropped']} dropped, ready age p50 {stats['age_ready_p50_ms']} ms / "
        f"p99 {stats['age_ready_p99_ms']} ms; {stats['end_reason'] or stats['status']}"
    )


def run_live(engine, source, *, out=sys.stdout, refresh_s: float = 0.2, **session_kwargs) -> dict:
    """Runs a session in the terminal: one refreshing readout line, a summary at the end.

    Ends at the end of a replay, at `max_seconds` or on Ctrl-C; returns the final stats
    (`run_s`: seconds from the source's start to the end). LiveSourceError when the source
    cannot be opened; RuntimeError naming it when the session ended in an error.
    """
    session = LiveSession(engine, source, **session_kwargs)
    session.start()
    seq, width = 0, 0
    try:
        while session.running:
            got = session.wait_newer(seq, refresh_s)
            stats = session.stats()
            if got is not None:
                seq, record, _ = got
                line = (f"frame {record['frame']}  {readout_text(record)}  annulus "
                        f"{record.get('annulus') or '-'}  stage {record.get('stage') or '-'}  "
                        f"{stats['processed_fps']:.1f} fps  dropped {stats['dropped']}  "
                        f"age {stats['age_ready_p50_ms']} ms  {stats['status']}")  # fmt: skip
            else:
                line = f"{stats['status']}  processed {stats['processed']}"
            width = max(width, len(line))
            out.write("\r" + line.ljust(width))
            out.flush()
    except KeyboardInterrupt:
        session.end_reason = "interrupted"
    finally:
        session.stop()
    stats = session.stats()
    out.write("\n" + summary_line(stats) + "\n")
    out.flush()
    if stats["status"].startswith("error"):
        raise RuntimeError(f"{session.description}: {stats['status']}")
    return stats
