"""Evaluation of a trained workdir on a Supervisely project: predictions, metrics, overlays.

The compiled inference engine predicts every frame of a split (the training run's own case
split, so validation and test cases were never trained on); `tavr_jax.metrics` scores them
with the paper's metrics; thresholds tuned on validation go to W/thresholds.json.
"""

from __future__ import annotations

import pathlib

import cv2
import numpy as np
from tqdm import tqdm

from cardiac_core.fileio import atomic_write_bytes
from tavr_jax.data.supervisely import read_project
from tavr_jax.infer.backends import open_engine
from tavr_jax.infer.engine import KeypointEngine
from tavr_jax.metrics import keypoint_metrics, tune_thresholds
from tavr_jax.reporting import reported_points
from tavr_jax.run.lock import writing
from tavr_jax.run.refiner import workdir_refiner
from tavr_jax.run.workdir import data_split, load_for_inference, load_thresholds, save_thresholds
from tavr_jax.visualize import draw_keypoints, draw_legend


def predict_project(engine, project, *, desc: str = "predict") -> dict[str, np.ndarray]:
    """Runs a `KeypointEngine` over every frame of `project`, in original-frame pixels.

    Frames are batched by size (each size compiles once). Returns numpy arrays in frame
    order: visibility (N, K) and group (N, G) probabilities, coords (N, K, 2) pixels.
    """
    n = len(project.frames)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, f in enumerate(project.frames):
        by_size.setdefault((f.height, f.width), []).append(i)
    out: dict[str, np.ndarray] = {}
    bs = engine.batch_size

    def batches():
        for idx in by_size.values():
            for s in range(0, len(idx), bs):
                chunk = idx[s : s + bs]
                yield chunk, np.stack([project.load_image(i) for i in chunk])

    with tqdm(total=n, desc=desc, unit="frame", leave=False) as bar:
        for chunk, res in engine.run_batches(batches()):
            for key, value in res.items():
                if key not in out:
                    out[key] = np.zeros((n, *value.shape[1:]), np.float32)
                out[key][chunk] = value
            bar.update(len(chunk))
    return out


def _frame_arrays(project) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    visible = np.stack([f.visible for f in project.frames]).astype(bool)
    xy = np.stack([f.coords for f in project.frames]).astype(np.float64)
    spacing = np.array([f.pixel_spacing_mm or 0.0 for f in project.frames], np.float64)
    return visible, xy, spacing


def _load(workdir, data_dir, split: str, batch_size: int, which: str, refine: bool = False,
          model_file=None, backend: str = "xla"):  # fmt: skip
    if backend != "xla" and model_file is None:
        raise ValueError(f"--backend={backend} runs an exported --model_file; export W first")
    model, variables, meta = load_for_inference(workdir, which=which)
    # The training run's own case split, so "val"/"test" are cases it never trained on.
    project = read_project(data_dir, meta["schema"], split=split, **data_split(meta["config"]))
    if not project.frames:
        raise ValueError(f"{data_dir}: split {split!r} has no frames (cases: {project.cases})")
    if model_file is not None:  # an exported file of this run, scored in its place
        engine = open_engine(workdir, model_file=model_file, batch_size=batch_size,
                             schema=meta["schema"], refine=refine, backend=backend)  # fmt: skip
        return engine, meta, project
    refiner = workdir_refiner(workdir, meta["schema"].point_names) if refine else None
    engine = KeypointEngine(model, variables, meta, batch_size=batch_size, dtype=meta["dtype"],
                            refiner=refiner)  # fmt: skip
    return engine, meta, project


def tune_project(workdir, data_dir, *, batch_size: int = 16, which: str = "best") -> dict:
    """Tunes visibility thresholds on the validation cases and writes W/thresholds.json."""
    engine, meta, project = _load(workdir, data_dir, "val", batch_size, which)
    pred = predict_project(engine, project, desc="tune on val")
    visible, _, _ = _frame_arrays(project)
    tuned = tune_thresholds(
        pred["visibility"],
        visible,
        meta["schema"],
        group=pred["group"] if meta["grouped"] else None,
    )
    tuned.update(split="val", n_images=len(project.frames), step=meta["step"])
    with writing(workdir, what="threshold tuning"):  # not while a training writes the workdir
        save_thresholds(workdir, tuned)
    return tuned


def reporting_thresholds(workdir, schema, threshold: float | None):
    """(point thresholds, group thresholds or None): W/thresholds.json's tuned ones (with
    group gating when tuning kept it) when `threshold` is None, else that one, no gating."""
    if threshold is None:
        return load_thresholds(workdir, schema)  # float64, as tuned
    return float(threshold), None


def shown_points(pred: dict, schema, point_thr, group_thr) -> np.ndarray:
    """(N, K) bool: the points reported for predictions `pred` under these thresholds."""
    return reported_points(
        pred["visibility"],
        None if group_thr is None else pred["group"],
        schema,
        point_thresholds=point_thr,
        group_thresholds=group_thr,
    )


def evaluate_project(
    workdir,
    data_dir,
    *,
    split: str = "val",
    threshold: float | None = None,
    batch_size: int = 16,
    overlays_dir=None,
    which: str = "best",
    refine: bool = False,
    model_file=None,
    backend: str = "xla",
) -> dict:
    """The paper's metrics of a trained workdir on one split of a Supervisely project.

    Args:
      workdir: training workdir (W/config.json, W/checkpoints/, optional W/thresholds.json).
      data_dir: Supervisely project; the split uses the training config's case split.
      split: all | train | val | test.
      threshold: one visibility threshold for every point, no group gating; None uses the
        tuned W/thresholds.json (0.5 everywhere when absent).
      batch_size: frames per compiled batch.
      overlays_dir: when given, one PNG per frame: truth as circles, prediction as crosses.
      which: "best" or "latest" checkpoint.
      refine: add the second stage trained into W/refiner.
      model_file: an ONNX or jax.export file exported from this workdir, run in place of the
        checkpoint (an int8 file is scored on the same frames as its float network).
      backend: the runtime of an .onnx `model_file`: "onnxruntime" (also for "xla") or
        "openvino".

    Returns:
      `keypoint_metrics` of the split, plus `split`, `n_cases`, `step`, `backbone`, `head`,
      `grouped`, `image_size`, `frame_width_px`, `refined`. Errors are in pixels of the
      original frames.
    """
    engine, meta, project = _load(workdir, data_dir, split, batch_size, which, refine,
                                  model_file, backend)  # fmt: skip
    schema = meta["schema"]
    pred = predict_project(engine, project, desc=f"evaluate {split}")
    visible, xy, spacing = _frame_arrays(project)
    point_thr, group_thr = reporting_thresholds(workdir, schema, threshold)
    metrics = keypoint_metrics(
        pred["visibility"],
        pred["coords"],
        visible,
        xy,
        schema,
        threshold=point_thr,
        group=None if group_thr is None else pred["group"],
        group_threshold=0.5 if group_thr is None else group_thr,
        pixel_spacing_mm=spacing,
    )
    metrics.update(
        split=project.split,
        n_cases=len(project.cases),
        step=int(meta["step"]),
        backbone=meta["backbone"],
        head=meta["head"],
        grouped=bool(meta["grouped"]),
        image_size=int(meta["image_size"]),
        frame_width_px=float(np.mean([f.width for f in project.frames])),
        refined=bool(refine),
        model_file=None if model_file is None else str(model_file),
        backend=getattr(engine, "backend", "xla"),
    )
    if overlays_dir is not None:
        shown = shown_points(pred, schema, point_thr, group_thr)
        write_overlays(overlays_dir, project, pred["coords"], shown, pred["visibility"])
    return metrics


def write_overlays(
    out_dir, project, coords: np.ndarray, shown: np.ndarray, probability=None
) -> int:
    """One PNG per frame: truth as circles, predictions as crosses, coloured by group."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    schema = project.schema
    for i, f in enumerate(project.frames):
        image = project.load_image(i)
        rgb = draw_keypoints(image, f.coords, f.visible, schema, marker="circle", labels=False)
        rgb = draw_keypoints(
            rgb,
            coords[i],
            shown[i],
            schema,
            marker="cross",
            probabilities=None if probability is None else probability[i],
        )
        draw_legend(rgb, schema)
        ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if not ok:
            raise ValueError(f"cannot encode the overlay of {f.image_path}")
        name = f"{f.case_id}__{pathlib.Path(f.frame_name).stem}.png"
        atomic_write_bytes(out_dir / name, png.tobytes())
    return len(project.frames)


def fmt_metric(x, digits: int = 4) -> str:
    """A metric for a markdown table: 4 digits (2 for pixels), "-" when undefined."""
    return "-" if x is None else f"{x:.{digits}f}"


def summary_table(metrics: dict) -> str:
    """A short markdown table of one evaluation: pooled, per-image mean, per group."""
    head = "| | precision | recall | F1 | mean error px | loc. acc. 20 px |"
    lines = [head, "|---|---|---|---|---|---|"]

    def row(label, m):
        vals = [fmt_metric(m[k]) for k in ("precision", "recall", "f1")]
        vals += [fmt_metric(m["mean_error_px"], 2), fmt_metric(m["loc_accuracy_20px"])]
        lines.append(f"| {label} | " + " | ".join(vals) + " |")

    row("pooled", metrics)
    row("per-image mean", metrics["per_image_mean"])
    for name, m in metrics["per_group"].items():
        row(f"group {name}", m)
    extra = f"{metrics['n_images']} images"
    if metrics.get("mean_error_mm") is not None:
        extra += f", mean error {metrics['mean_error_mm']:.2f} mm"
    return "\n".join(lines) + f"\n\n{extra}\n"
