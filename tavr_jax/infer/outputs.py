"""Inference outputs: predictions.jsonl, COCO keypoints, overlays, a Supervisely project for
pre-annotation; and the stream-to-files run.

All files are written atomically: to a temporary name in the output folder, renamed at the end.
Temporaries carry the writer's PID, and a run removes those of killed runs before writing. A
run that fails (a full disk, a read-only folder) leaves the previous outputs as they were and
no temporaries; its error names the output file.
"""

from __future__ import annotations

import errno
import json
import pathlib
import shutil

import cv2
import numpy as np
from tqdm import tqdm

from cardiac_core.fileio import AtomicFile
from cardiac_core.tempfiles import make_temp_dir, remove_stale
from tavr_jax.data import supervisely
from tavr_jax.infer import streams
from tavr_jax.infer.tracking import PointTracker
from tavr_jax.reporting import Gate
from tavr_jax.schema import KeypointSchema
from tavr_jax.visualize import draw_keypoints, draw_legend

PREDICTIONS_FILE = "predictions.jsonl"
COCO_FILE = "coco_keypoints.json"
OVERLAY_VIDEO = "overlay.avi"
OVERLAY_DIR = "overlay"
FORMATS = ("jsonl", "supervisely")
VISIBILITY_TAG = "visibility"  # on each predicted point: its probability
GROUP_TAG_PREFIX = "group_"  # on each frame: "group_<name>" = that group's probability


def output_stem(name: str | None, index: int, used: set[str]) -> str:
    """A file stem for a frame's outputs, unique within a run (`used` collects them).

    The input's stem (`img7` for img7.png), unless an earlier input of the run had it (c.jpg
    and c.png): then the whole name with its dots made underscores. Frame k of a multi-frame
    file (`cine.dcm#k`) becomes `cine.dcm_frame<k>`.
    """
    if not name:
        stem = f"{index:06d}"
    elif "#" in name:
        stem = name.replace("#", "_frame")
    else:
        stem = pathlib.Path(name).stem
        if stem in used:
            stem = name.replace(".", "_")
    used.add(stem)
    return stem


def frame_record(
    frame: streams.Frame,
    visibility: np.ndarray,
    group: np.ndarray,
    coords: np.ndarray,
    reported: np.ndarray,
    schema: KeypointSchema,
    *,
    spacing_rc: tuple[float, float] | None = None,
    file: str | None = None,
) -> dict:
    """One predictions.jsonl line: every point with its probability, pixels, mm and decision."""
    h, w = frame.image.shape
    points = []
    for k, name in enumerate(schema.point_names):
        x, y = float(coords[k, 0]), float(coords[k, 1])
        p = {
            "name": name,
            "group": schema.group_of(name),
            "visibility": round(float(visibility[k]), 5),
            "x": round(x, 2),
            "y": round(y, 2),
            "reported": bool(reported[k]),
        }
        if spacing_rc is not None:
            p["x_mm"] = round(x * spacing_rc[1], 3)
            p["y_mm"] = round(y * spacing_rc[0], 3)
        points.append(p)
    rec = {
        "frame": int(frame.index),
        "time_s": None if frame.time_s is None else round(float(frame.time_s), 5),
        "width": int(w),
        "height": int(h),
        "groups": {g: round(float(group[i]), 5) for i, g in enumerate(schema.group_names)},
        "points": points,
    }
    if file is not None:
        rec["file"] = file
    return rec


def coco_keypoints(records: list[dict], schema: KeypointSchema) -> dict:
    """COCO keypoints JSON (one category, visibility 2 = reported, 0 = not) from jsonl records."""
    images, annotations = [], []
    for rec in records:
        image_id = rec["frame"] + 1
        images.append(
            {
                "id": image_id,
                "file_name": rec.get("file", f"frame_{rec['frame']:06d}"),
                "width": rec["width"],
                "height": rec["height"],
            }
        )
        pts = rec["points"]
        on = np.array([p["reported"] for p in pts])
        if not on.any():
            continue
        xy = np.array([[p["x"], p["y"]] for p in pts])
        kp = np.concatenate([np.where(on[:, None], xy, 0.0), 2.0 * on[:, None]], 1)
        x0, y0 = xy[on].min(0)
        x1, y1 = xy[on].max(0)
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": 1,
                "keypoints": [round(float(v), 2) for v in kp.ravel()],
                "num_keypoints": int(on.sum()),
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "area": float((x1 - x0) * (y1 - y0)),
                "iscrowd": 0,
                "score": float(
                    np.mean([p["visibility"] for p, o in zip(pts, on, strict=True) if o])
                ),
            }
        )
    category = {
        "id": 1,
        "name": schema.name,
        "supercategory": "tavr",
        "keypoints": list(schema.point_names),
        "skeleton": [],
    }
    return {"images": images, "annotations": annotations, "categories": [category]}


class SuperviselyPredictions:
    """Predictions as a Supervisely project to correct and retrain on (pre-annotation).

    One case folder per input (the video/DICOM/image file's stem, or the folder's name), the
    original frames as PNG, the reported points as point objects, each tagged with its
    probability (`visibility`), and the group probabilities as frame tags (`group_<name>`).
    `supervisely.read_project` reads the points back exactly: coordinates are clipped into the
    frame, where the reader keeps them.

    The case is written into a hidden PID-named folder and renamed into place by `close`,
    replacing the case of an earlier run: a failed or killed run leaves the project as it was
    (its temporary goes now, or at the next run when the process was killed).
    """

    def __init__(self, root, schema: KeypointSchema, case_id: str, pixel_spacing_mm=None):
        self.root, self.schema, self.case_id = pathlib.Path(root), schema, case_id
        self.pixel_spacing_mm = pixel_spacing_mm
        group_tags = [GROUP_TAG_PREFIX + g for g in schema.group_names]
        try:
            self.writer = supervisely.ProjectWriter(
                self.root, schema, [VISIBILITY_TAG, *group_tags]
            )
            remove_stale(self.root, (case_id,), what="unfinished cases")
            self.staging = make_temp_dir(self.root, case_id)
        except OSError as e:
            raise _naming(e, self.root) from None
        self._stems: set[str] = set()

    def add(self, frame: streams.Frame, name, visibility, group, coords, reported) -> None:
        """One frame; `name` is its name in a folder input (None: the frame index)."""
        h, w = frame.image.shape
        # Continuous pixel coordinates of the frame lie in [0, w) x [0, h).
        upper = np.nextafter(np.array([w, h], np.float32), np.float32(0))
        coords = np.clip(np.asarray(coords, np.float32), np.float32(0), upper)
        probability = np.asarray(visibility, np.float64)
        try:
            self._add(frame, name, group, coords, reported, probability)
        except OSError as e:
            raise _naming(e, self.root / self.case_id) from None

    def _add(self, frame, name, group, coords, reported, probability) -> None:
        self.writer.add(
            supervisely.AnnotatedFrame(
                case_id=self.staging.name,
                frame_name=f"{output_stem(name, frame.index, self._stems)}.png",
                image=frame.image,
                visible=np.asarray(reported, bool),
                coords=coords,
                pixel_spacing_mm=self.pixel_spacing_mm,
                point_tags={
                    p: [{"name": VISIBILITY_TAG, "value": round(float(v), 5)}]
                    for p, v in zip(self.schema.point_names, probability, strict=True)
                },
                frame_tags=[
                    {"name": GROUP_TAG_PREFIX + g, "value": round(float(v), 5)}
                    for g, v in zip(self.schema.group_names, np.asarray(group), strict=True)
                ],
            )
        )

    def close(self) -> None:
        case = self.root / self.case_id
        try:
            if case.exists():  # an earlier run's case: moved aside, then removed
                old = make_temp_dir(self.root, self.case_id)
                case.rename(old / self.case_id)
                self.staging.rename(case)
                shutil.rmtree(old, ignore_errors=True)
            else:
                self.staging.rename(case)
        except OSError as e:
            raise _naming(e, case) from None

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def _write_file(path: pathlib.Path, data: bytes) -> None:
    """`data` into `path` atomically; an OSError names `path`."""
    f = None
    try:
        f = AtomicFile(path)
        with open(f.tmp, "wb") as fh:
            fh.write(data)
        f.commit()
    except BaseException as e:
        if f is not None:
            f.abort()
        raise _naming(e, path) from None


def _naming(e: BaseException, path) -> BaseException:
    """The same OSError naming the output `path`, where it named none (a failed write or
    flush) or a hidden temporary (a failed mkstemp), which means nothing to the user."""
    if not isinstance(e, OSError) or e.errno is None:
        return e
    if e.filename is None or pathlib.Path(str(e.filename)).name.startswith("."):
        return type(e)(e.errno, e.strerror or str(e), str(path))
    return e


class OverlayWriter:
    """Annotated frames: a video (MJPG .avi) for video/DICOM input, PNGs otherwise."""

    def __init__(self, out_dir: pathlib.Path, schema: KeypointSchema, *, video: bool, fps=None):
        self.out_dir, self.schema, self.fps = out_dir, schema, fps or 15.0
        self.video = video
        self._writer = None
        self._file: AtomicFile | None = None
        self._stems: set[str] = set()
        self._written = 0
        if not video:
            (out_dir / OVERLAY_DIR).mkdir(parents=True, exist_ok=True)

    def write(self, frame: streams.Frame, coords, reported, visibility, name: str | None = None):
        rgb = draw_keypoints(
            frame.image, coords, reported, self.schema, marker="cross", probabilities=visibility
        )
        draw_legend(rgb, self.schema)
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        if not self.video:
            stem = output_stem(name, frame.index, self._stems)
            ok, buf = cv2.imencode(".png", bgr)
            if not ok:
                raise ValueError(f"cannot encode the overlay of {name or frame.index}")
            _write_file(self.out_dir / OVERLAY_DIR / f"{stem}.png", buf.tobytes())
            return
        if self._writer is None:
            try:
                self._file = AtomicFile(self.out_dir / OVERLAY_VIDEO)
            except OSError as e:
                raise _naming(e, self.out_dir / OVERLAY_VIDEO) from None
            h, w = bgr.shape[:2]
            fourcc = cv2.VideoWriter_fourcc(*"MJPG")
            self._writer = cv2.VideoWriter(str(self._file.tmp), fourcc, float(self.fps), (w, h))
        self._writer.write(bgr)
        self._written += 1

    def finish(self) -> None:
        """Completes the video's temporary and checks it; `commit` puts it in place."""
        if self._writer is None:
            return
        self._writer.release()
        self._writer = None
        # OpenCV's writer reports no write errors: a full disk shows as a video that does not
        # reopen with all its frames.
        cap = cv2.VideoCapture(str(self._file.tmp))
        frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
        cap.release()
        if frames != self._written:
            raise OSError(
                errno.EIO,
                f"the overlay video holds {frames} of its {self._written} frames (disk full?)",
                str(self._file.path),
            )

    def commit(self) -> None:
        self.finish()
        if self._file is not None:
            self._file.commit()
            self._file = None

    def abort(self) -> None:
        """A failed run: the video's temporary goes (the PNGs written so far stay, each whole)."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        if self._file is not None:
            self._file.abort()
            self._file = None


class JsonlPredictions:
    """OUT/predictions.jsonl (one line per frame) and, on `close`, OUT/coco_keypoints.json.

    Both are written to temporaries and renamed only once both are complete, so a failed run
    never leaves a new predictions.jsonl beside an old COCO file (or a short one).
    """

    def __init__(self, out_dir: pathlib.Path, schema: KeypointSchema, source):
        self.path, self.schema, self.source = out_dir / PREDICTIONS_FILE, schema, source
        self.coco_path = out_dir / COCO_FILE
        self.coco: AtomicFile | None = None
        try:
            self.atomic = AtomicFile(self.path)
        except OSError as e:
            raise _naming(e, self.path) from None
        try:
            self.file = open(self.atomic.tmp, "w")  # noqa: SIM115 - closed in close() / abort()
        except BaseException as e:
            self.atomic.abort()
            raise _naming(e, self.path) from None
        self.records: list[dict] = []

    def add(self, frame, name, visibility, group, coords, reported) -> None:
        rec = frame_record(frame, visibility, group, coords, reported, self.schema,
                           spacing_rc=self.source.pixel_spacing_rc, file=name)  # fmt: skip
        try:
            self.file.write(json.dumps(rec) + "\n")
        except OSError as e:
            raise _naming(e, self.path) from None
        self.records.append(rec)

    def close(self) -> None:
        try:
            self.file.close()  # flushes: a full disk shows here at the latest
        except OSError as e:
            raise _naming(e, self.path) from None
        coco = json.dumps(coco_keypoints(self.records, self.schema), indent=1) + "\n"
        try:
            self.coco = AtomicFile(self.coco_path)
            with open(self.coco.tmp, "w") as fh:
                fh.write(coco)
        except OSError as e:
            raise _naming(e, self.coco_path) from None
        # Renames within one folder: they do not run out of space.
        self.atomic.commit()
        self.coco.commit()

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass  # the disk is full: the temporary goes anyway
        self.atomic.abort()
        if self.coco is not None:
            self.coco.abort()


def check_out_dir(out_dir) -> pathlib.Path:
    """Refuses, in one line, an output folder that is a file or lies under one."""
    out_dir = pathlib.Path(out_dir)
    for path in (out_dir, *out_dir.parents):
        if path.exists():
            if not path.is_dir():
                where = "exists" if path == out_dir else f"lies under {path}, which exists"
                raise ValueError(f"--out {out_dir} {where} and is not a folder")
            break
    return out_dir


def run_inference(
    engine,
    input_path,
    out_dir,
    *,
    overlay: bool = False,
    track: str = "kalman",
    expect=None,
    progress: bool = True,
    format: str = "jsonl",
) -> dict:
    """Runs an engine over an image, folder, video or DICOM and writes the outputs.

    format "jsonl": OUT/predictions.jsonl and OUT/coco_keypoints.json; "supervisely": OUT is
    a Supervisely project of the reported points (see `SuperviselyPredictions`). With
    `overlay`, also OUT/overlay.avi (video/DICOM input) or OUT/overlay/*.png. The engine is a
    `KeypointEngine` or anything with its call API (`schema`, `meta`, `batch_size`, `device`,
    `run_batches`). Frames the source cannot read are skipped and the others still written.
    Returns a small summary dict; its `skipped` lists `(name, reason)`.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown output format {format!r}; expected one of {', '.join(FORMATS)}")
    source = streams.open_source(input_path)
    schema = engine.schema
    gate = Gate.from_meta(engine.meta, schema, expect=expect)
    tracker = None
    if track != "none" and source.kind != "image":
        tracker = PointTracker(schema, gate, method=track, fps=source.fps)
    out_dir = check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Temporaries of killed runs (their PID is dead); a live run's are left alone.
    remove_stale(out_dir, (PREDICTIONS_FILE.split(".")[0], COCO_FILE.split(".")[0],
                           OVERLAY_VIDEO.split(".")[0]))  # fmt: skip
    remove_stale(out_dir / OVERLAY_DIR, suffix=".png")
    files = getattr(source, "files", None)
    overlays = None
    if overlay:
        overlays = OverlayWriter(
            out_dir, schema, video=source.kind in ("video", "dicom"), fps=source.fps
        )
    if format == "supervisely":
        case_id = source.path.name if source.path.is_dir() else source.path.stem
        sink = SuperviselyPredictions(out_dir, schema, case_id, source.pixel_spacing_mm)
        written = out_dir
    else:
        sink = JsonlPredictions(out_dir, schema, source)
        written = sink.path
    n_frames = 0
    bar = tqdm(total=len(source) or None, desc="infer", unit="frame", disable=not progress)
    try:
        batches = streams.prefetch_to_device(
            iter(source), batch_size=engine.batch_size, device=engine.device
        )
        for frames, out in engine.run_batches(batches):
            for j, fr in enumerate(frames):
                probability, presence = out["visibility"][j], out["group"][j]
                xy = out["coords"][j]
                if tracker is not None:
                    xy, reported = tracker.update(probability, presence, xy, fr.time_s)
                else:
                    reported = gate(probability, presence)
                name = None if files is None else fr.name
                sink.add(fr, name, probability, presence, xy, reported)
                if overlays is not None:
                    overlays.write(fr, xy, reported, probability, name)
            n_frames += len(frames)
            bar.update(len(frames))
        bar.close()
        if overlays is not None:
            overlays.finish()
        sink.close()
        if overlays is not None:
            overlays.commit()  # a rename: the predictions and their video appear together
    except BaseException:
        bar.close()  # the error goes on a line of its own
        sink.abort()
        if overlays is not None:
            overlays.abort()  # a video of part of the run must not look like the whole run
        raise
    return {
        "frames": n_frames,
        "skipped": list(source.skipped),
        "source": source.kind,
        "predictions": str(written),
        "pixel_spacing_mm": source.pixel_spacing_rc,
        "fps": source.fps,
    }
