"""Inference outputs: predictions.jsonl, COCO keypoints, overlays; and the stream-to-files run.

All files are written atomically: to a temporary name in the output folder, renamed at the end.
"""

from __future__ import annotations

import json
import os
import pathlib

import cv2
import numpy as np

from tavr_jax.fileio import atomic_write_bytes, atomic_write_with, write_json_atomic
from tavr_jax.infer import streams
from tavr_jax.infer.postprocess import Gate
from tavr_jax.infer.tracking import PointTracker
from tavr_jax.schema import KeypointSchema

PREDICTIONS_FILE = "predictions.jsonl"
COCO_FILE = "coco_keypoints.json"


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


class OverlayWriter:
    """Annotated frames: a video (MJPG .avi) for video/DICOM input, PNGs otherwise."""

    def __init__(self, out_dir: pathlib.Path, schema: KeypointSchema, *, video: bool, fps=None):
        self.out_dir, self.schema, self.fps = out_dir, schema, fps or 15.0
        self.video = video
        self._writer = None
        self._tmp = None
        self._names: set[str] = set()  # overlay PNG names already written in this run
        if not video:
            (out_dir / "overlay").mkdir(parents=True, exist_ok=True)

    def write(self, frame: streams.Frame, coords, reported, visibility, name: str | None = None):
        from tavr_jax.visualize import draw_keypoints, draw_legend

        rgb = draw_keypoints(
            frame.image, coords, reported, self.schema, marker="cross", probabilities=visibility
        )
        draw_legend(rgb, self.schema)
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        if not self.video:
            path = self.out_dir / "overlay" / f"{self._overlay_name(name, frame.index)}.png"
            ok, buf = cv2.imencode(".png", bgr)
            if not ok:
                raise ValueError(f"cannot encode the overlay of {name or frame.index}")
            atomic_write_bytes(path, buf.tobytes())
            return
        if self._writer is None:
            self._tmp = self.out_dir / ".overlay.tmp.avi"
            h, w = bgr.shape[:2]
            fourcc = cv2.VideoWriter_fourcc(*"MJPG")
            self._writer = cv2.VideoWriter(str(self._tmp), fourcc, float(self.fps), (w, h))
        self._writer.write(bgr)

    def _overlay_name(self, name: str | None, index: int) -> str:
        """The input's stem, unless another input of this run had it (c.jpg and c.png)."""
        stem = pathlib.Path(name).stem if name else f"{index:06d}"
        if stem in self._names and name:
            stem = name.replace(".", "_")
        stem = stem.replace("#", "_frame")
        self._names.add(stem)
        return stem

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            os.replace(self._tmp, self.out_dir / "overlay.avi")
            self._writer = None


def run_inference(
    engine,
    input_path,
    out_dir,
    *,
    overlay: bool = False,
    track: str = "kalman",
    expect=None,
    progress: bool = True,
) -> dict:
    """Runs a `KeypointEngine` over an image, folder, video or DICOM and writes the outputs.

    Writes OUT/predictions.jsonl, OUT/coco_keypoints.json and, with `overlay`, OUT/overlay.avi
    (video/DICOM input) or OUT/overlay/*.png. Frames the source could not read are skipped,
    the others still written. Returns a small summary dict; `skipped` lists `(name, reason)`.
    """
    from tqdm import tqdm

    source = streams.open_source(input_path)
    schema = engine.schema
    gate = Gate.from_meta(engine.meta, schema, expect=expect)
    tracker = None
    if track != "none" and source.kind != "image":
        tracker = PointTracker(schema, gate, method=track, fps=source.fps)
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = getattr(source, "files", None)
    overlays = None
    if overlay:
        overlays = OverlayWriter(
            out_dir, schema, video=source.kind in ("video", "dicom"), fps=source.fps
        )
    jsonl = out_dir / PREDICTIONS_FILE
    records = []

    def write_records(tmp: str) -> None:
        batches = streams.prefetch_to_device(
            iter(source), batch_size=engine.batch_size, device=engine.device
        )
        bar = tqdm(total=len(source) or None, desc="infer", unit="frame", disable=not progress)
        with open(tmp, "w") as f:
            for frames, out in engine.run_batches(batches):
                for j, fr in enumerate(frames):
                    vis, grp, xy = out["visibility"][j], out["group"][j], out["coords"][j]
                    if tracker is not None:
                        xy, reported = tracker.update(vis, grp, xy, fr.time_s)
                    else:
                        reported = gate(vis, grp)
                    name = None if files is None else fr.name
                    rec = frame_record(
                        fr, vis, grp, xy, reported, schema, spacing_rc=source.pixel_spacing_rc,
                        file=name,
                    )  # fmt: skip
                    f.write(json.dumps(rec) + "\n")
                    records.append(rec)
                    if overlays is not None:
                        overlays.write(fr, xy, reported, vis, name)
                bar.update(len(frames))
        bar.close()

    try:
        atomic_write_with(jsonl, write_records)
    finally:
        if overlays is not None:
            overlays.close()
    write_json_atomic(out_dir / COCO_FILE, coco_keypoints(records, schema))
    return {
        "frames": len(records),
        "skipped": list(source.skipped),
        "source": source.kind,
        "predictions": str(jsonl),
        "pixel_spacing_mm": source.pixel_spacing_rc,
        "fps": source.fps,
    }
