"""The paper's keypoint metrics, threshold tuning on validation, and project evaluation.

Definitions (SPEC.md section A, "Metrics"). A point k of image n is predicted visible when
its probability exceeds its threshold (strictly, as in the paper's `p_k > 0.5`) and, when group
probabilities are given, its group's probability exceeds the group threshold too (gating).
Against the annotated visibility this gives TP / FP / FN per (image, point); then

- precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2 TP / (2 TP + FP + FN);
- mean_error_px: mean Euclidean distance over the TP pairs (visible in truth and prediction),
  in pixels of the ORIGINAL frames; loc_accuracy_20px: share of those with distance <= dist_px;
- mean_error_mm: the same distances times each frame's pixel spacing, over frames whose
  spacing is known (> 0); None when no frame has one.

"Pooled" values sum the counts over all (image, point) pairs. `per_image_mean` is the
reference's protocol: each image gets its own five values, then they are averaged over images.
A value whose denominator is zero is undefined (None when pooled) and such images are left out
of the per-image mean (nan-mean): an image with no predicted point has no precision, one with
no annotated point has no recall, one with neither has no F1, one with no TP pair has no error
or localisation accuracy. `per_image_defined` says how many images each mean is over.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from tavr_jax.fileio import atomic_write_bytes, write_json_atomic
from tavr_jax.schema import KeypointSchema

METRIC_KEYS = ("precision", "recall", "f1", "mean_error_px", "loc_accuracy_20px")
THRESHOLDS_FILE = "thresholds.json"


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den == 0."""
    num = np.asarray(num, np.float64)
    den = np.asarray(den, np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _summaries(counts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Counts (any common shape) -> the metrics of each cell, NaN where undefined."""
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    return {
        "precision": _div(tp, tp + fp),
        "recall": _div(tp, tp + fn),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "mean_error_px": _div(counts["dist_sum"], tp),
        "loc_accuracy_20px": _div(counts["n_within"], tp),
        "mean_error_mm": _div(counts["mm_sum"], counts["n_mm"]),
    }


def _to_json_value(x) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


def _as_thresholds(threshold, n: int, what: str) -> np.ndarray:
    t = np.asarray(threshold, np.float64)
    if t.ndim == 0:
        t = np.full((n,), float(t))
    if t.shape != (n,):
        raise ValueError(f"{what} threshold must be a scalar or have shape ({n},), got {t.shape}")
    return t


def predicted_visibility(
    pred_prob: np.ndarray,
    schema: KeypointSchema,
    *,
    threshold=0.5,
    group_prob: np.ndarray | None = None,
    group_threshold=0.5,
) -> np.ndarray:
    """(N, K) bool: probability above its point threshold and, if given, its group's too."""
    k = schema.num_points
    pred = np.asarray(pred_prob, np.float64) > _as_thresholds(threshold, k, "point")
    if group_prob is not None:
        g = schema.num_groups
        gp = np.asarray(group_prob, np.float64)
        if gp.shape != (pred.shape[0], g):
            raise ValueError(f"group_prob must have shape ({pred.shape[0]}, {g}), got {gp.shape}")
        group_on = gp > _as_thresholds(group_threshold, g, "group")  # (N, G)
        pred &= group_on[:, schema.point_group]
    return pred


def keypoint_metrics(
    pred_prob: np.ndarray,
    pred_xy: np.ndarray,
    true_vis: np.ndarray,
    true_xy: np.ndarray,
    schema: KeypointSchema,
    *,
    threshold=0.5,
    group_prob: np.ndarray | None = None,
    group_threshold=0.5,
    dist_px: float = 20.0,
    pixel_spacing_mm: np.ndarray | None = None,
) -> dict:
    """The paper's metrics, pooled, per image (averaged), per group and per point.

    Args:
      pred_prob: (N, K) visibility probabilities.
      pred_xy: (N, K, 2) predicted (x, y) in pixels of the original frames.
      true_vis: (N, K) bool annotated visibility.
      true_xy: (N, K, 2) annotated (x, y) in pixels of the original frames.
      schema: the keypoint schema (K points in G groups).
      threshold: scalar or (K,) per-point visibility thresholds.
      group_prob: optional (N, G) group presence probabilities; gates the points of each group.
      group_threshold: scalar or (G,) thresholds for `group_prob`.
      dist_px: localisation radius in original pixels (a distance equal to it counts).
      pixel_spacing_mm: optional (N,) mm per original pixel, <= 0 or NaN when unknown.

    Returns:
      A JSON-serialisable dict (floats, ints, None): the five metrics pooled, `mean_error_mm`,
      `per_image_mean`, `per_image_defined`, `per_group`, `per_point`, `counts`, `threshold`,
      `group_threshold`, `dist_px`, `n_images`. See the module docstring for the definitions.
    """
    k = schema.num_points
    prob = np.asarray(pred_prob, np.float64)
    if prob.ndim != 2 or prob.shape[1] != k:
        raise ValueError(
            f"pred_prob must have shape (N, {k}) for schema {schema.name!r}, got {prob.shape}"
        )
    n = prob.shape[0]
    vis = np.asarray(true_vis).astype(bool)
    pxy = np.asarray(pred_xy, np.float64)
    txy = np.asarray(true_xy, np.float64)
    for name, arr, shape in (
        ("true_vis", vis, (n, k)),
        ("pred_xy", pxy, (n, k, 2)),
        ("true_xy", txy, (n, k, 2)),
    ):
        if arr.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    pred = predicted_visibility(
        prob, schema, threshold=threshold, group_prob=group_prob, group_threshold=group_threshold
    )

    tp = pred & vis
    dist = np.where(tp, np.linalg.norm(np.where(tp[..., None], pxy - txy, 0.0), axis=-1), 0.0)
    if np.isnan(dist).any():
        raise ValueError("non-finite coordinates for a point visible in truth and prediction")
    if pixel_spacing_mm is None:
        spacing = np.zeros((n,))
    else:
        spacing = np.nan_to_num(np.asarray(pixel_spacing_mm, np.float64), nan=0.0)
        if spacing.shape != (n,):
            raise ValueError(f"pixel_spacing_mm must have shape ({n},), got {spacing.shape}")
    has_mm = (spacing > 0)[:, None] & tp
    cells = {  # (N, K) per (image, point) counts; every breakdown sums these
        "tp": tp.astype(np.float64),
        "fp": (pred & ~vis).astype(np.float64),
        "fn": (~pred & vis).astype(np.float64),
        "dist_sum": dist,
        "n_within": (tp & (dist <= dist_px)).astype(np.float64),
        "mm_sum": np.where(has_mm, dist * spacing[:, None], 0.0),
        "n_mm": has_mm.astype(np.float64),
    }

    pooled = _summaries({c: v.sum() for c, v in cells.items()})
    per_image = _summaries({c: v.sum(axis=1) for c, v in cells.items()})  # each (N,)
    per_point = _summaries({c: v.sum(axis=0) for c, v in cells.items()})  # each (K,)
    gm = schema.group_matrix.astype(np.float64)  # (G, K)
    per_group = _summaries({c: gm @ v.sum(axis=0) for c, v in cells.items()})  # each (G,)

    keys = (*METRIC_KEYS, "mean_error_mm")

    def row(summary, i):
        return {m: _to_json_value(summary[m][i]) for m in keys}

    per_image_mean, per_image_defined = {}, {}
    for m in keys:
        defined = ~np.isnan(per_image[m])
        per_image_defined[m] = int(defined.sum())
        per_image_mean[m] = float(per_image[m][defined].mean()) if defined.any() else None

    t = _as_thresholds(threshold, k, "point")
    out = {m: _to_json_value(pooled[m]) for m in keys}
    out.update(
        per_image_mean=per_image_mean,
        per_image_defined=per_image_defined,
        per_group={g: row(per_group, i) for i, g in enumerate(schema.group_names)},
        per_point={p: row(per_point, i) for i, p in enumerate(schema.point_names)},
        counts={c: int(cells[c].sum()) for c in ("tp", "fp", "fn", "n_within")},
        threshold=float(t[0])
        if np.all(t == t[0])
        else dict(zip(schema.point_names, t.tolist(), strict=True)),
        group_threshold=None
        if group_prob is None
        else _as_json_thresholds(group_threshold, schema.group_names),
        dist_px=float(dist_px),
        n_images=int(n),
    )
    return out


def _as_json_thresholds(threshold, names: Sequence[str]):
    t = _as_thresholds(threshold, len(names), "group")
    return float(t[0]) if np.all(t == t[0]) else dict(zip(names, t.tolist(), strict=True))


# ----------------------------------------------------------------------------------------------
# Threshold tuning


def _best_threshold(pred: np.ndarray, truth: np.ndarray, candidates: np.ndarray):
    """pred (C, N, J) bool per candidate, truth (N, J) -> (best threshold (J,), best F1 (J,)).

    F1 is taken as 1 where neither truth nor prediction has a positive (nothing to find,
    nothing claimed), so a point never seen in validation gets a threshold that predicts
    nothing. Ties go to the candidate closest to 0.5, the paper's default.
    """
    tp = (pred & truth).sum(axis=1)  # (C, J)
    fp = (pred & ~truth).sum(axis=1)
    fn = (~pred & truth).sum(axis=1)
    f1 = np.nan_to_num(_div(2 * tp, 2 * tp + fp + fn), nan=1.0)
    best = f1.max(axis=0)
    tie = np.isclose(f1, best)  # (C, J)
    closeness = np.where(tie, -np.abs(candidates - 0.5)[:, None], -np.inf)
    idx = closeness.argmax(axis=0)
    return candidates[idx], best


def tune_thresholds(
    pred_prob: np.ndarray,
    true_vis: np.ndarray,
    schema: KeypointSchema,
    candidates: Sequence[float] | np.ndarray | None = None,
    *,
    group_prob: np.ndarray | None = None,
) -> dict:
    """Per-point (and per-group) visibility thresholds maximising F1 on validation.

    Each point's threshold maximises that point's pooled F1 over `candidates` (default
    0.05, 0.10, ..., 0.95). With `group_prob`, group thresholds are tuned on group presence
    (a group is present when any of its points is annotated), then the point thresholds under
    that gating; the gated set is kept only if its pooled F1 beats the ungated one, else
    "groups" is None (no gating).

    Returns:
      {"points": {name: t}, "groups": {name: t} or None, "val_f1": {"points": ..., "groups": ...},
       "schema": name}, the content of W/thresholds.json.
    """
    if candidates is None:
        candidates = np.round(np.arange(0.05, 0.951, 0.05), 4)
    cand = np.asarray(candidates, np.float64).reshape(-1)
    if cand.size == 0:
        raise ValueError("tune_thresholds needs at least one candidate threshold")
    prob = np.asarray(pred_prob, np.float64)
    vis = np.asarray(true_vis).astype(bool)
    if prob.ndim != 2 or prob.shape[1] != schema.num_points or vis.shape != prob.shape:
        raise ValueError(
            f"pred_prob and true_vis must both have shape (N, {schema.num_points}), "
            f"got {prob.shape} and {vis.shape}"
        )
    p_thr, p_f1 = _best_threshold(prob[None] > cand[:, None, None], vis, cand)
    groups, group_f1 = None, None
    if group_prob is not None:
        gp = np.asarray(group_prob, np.float64)
        if gp.shape != (prob.shape[0], schema.num_groups):
            raise ValueError(
                f"group_prob must have shape ({prob.shape[0]}, {schema.num_groups}), got {gp.shape}"
            )
        g_thr, g_f1 = _best_threshold(
            gp[None] > cand[:, None, None], schema.group_presence(vis), cand
        )
        gate = (gp > g_thr)[:, schema.point_group]
        gated_thr, gated_f1 = _best_threshold(
            (prob[None] > cand[:, None, None]) & gate[None], vis, cand
        )
        # Gating is kept only when it raises the pooled validation F1 over ungated points.
        if _pooled_f1(prob > gated_thr, gate, vis) > _pooled_f1(prob > p_thr, True, vis):
            p_thr, p_f1 = gated_thr, gated_f1
            groups = dict(zip(schema.group_names, g_thr.tolist(), strict=True))
            group_f1 = dict(zip(schema.group_names, g_f1.tolist(), strict=True))
    return {
        "schema": schema.name,
        "points": dict(zip(schema.point_names, p_thr.tolist(), strict=True)),
        "groups": groups,
        "val_f1": {
            "points": dict(zip(schema.point_names, p_f1.tolist(), strict=True)),
            "groups": group_f1,
        },
    }


def _pooled_f1(pred: np.ndarray, gate, truth: np.ndarray) -> float:
    pred = pred & gate
    tp, fp, fn = (pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()
    return float(np.nan_to_num(_div(2 * tp, 2 * tp + fp + fn), nan=1.0))


def save_thresholds(workdir, thresholds: dict) -> pathlib.Path:
    """Writes the output of `tune_thresholds` to W/thresholds.json (atomic)."""
    path = pathlib.Path(workdir) / THRESHOLDS_FILE
    write_json_atomic(path, thresholds)
    return path


def load_thresholds(workdir, schema: KeypointSchema) -> tuple[np.ndarray, np.ndarray | None]:
    """W/thresholds.json -> (point thresholds (K,), group thresholds (G,) or None).

    Missing file: 0.5 for every point and no group gating.
    """
    path = pathlib.Path(workdir) / THRESHOLDS_FILE
    if not path.exists():
        return np.full((schema.num_points,), 0.5), None
    try:
        d = json.loads(path.read_text())
        points = np.array([float(d["points"][p]) for p in schema.point_names])
        groups = d.get("groups")
        if groups is not None:
            groups = np.array([float(groups[g]) for g in schema.group_names])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"cannot read thresholds from {path}: {e!r}") from None
    return points, groups


# ----------------------------------------------------------------------------------------------
# Evaluating a trained workdir on a Supervisely project


def predict_project(engine, project, *, desc: str = "predict") -> dict[str, np.ndarray]:
    """Runs a `KeypointEngine` over every frame of `project`, in original-frame pixels.

    Frames are batched by size (each size compiles once). Returns numpy arrays in frame
    order: visibility (N, K) and group (N, G) probabilities, coords (N, K, 2) pixels.
    """
    from tqdm import tqdm  # noqa: PLC0415

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
    vis = np.stack([f.visibility for f in project.frames]).astype(bool)
    xy = np.stack([f.coords for f in project.frames]).astype(np.float64)
    spacing = np.array([f.pixel_spacing_mm or 0.0 for f in project.frames], np.float64)
    return vis, xy, spacing


def _load(workdir, data_dir, split: str, batch_size: int, which: str):
    from tavr_jax.checkpoint import load_for_inference  # noqa: PLC0415
    from tavr_jax.data.supervisely import read_project  # noqa: PLC0415
    from tavr_jax.infer.engine import KeypointEngine  # noqa: PLC0415

    model, variables, meta = load_for_inference(workdir, which=which)
    config = meta["config"]
    # The training run's own case split, so "val"/"test" are cases it never trained on.
    project = read_project(
        data_dir,
        meta["schema"],
        split=split,
        seed=int(config.get("data_seed", 0)),
        val_fraction=float(config.get("val_fraction", 0.2)),
        test_fraction=float(config.get("test_fraction", 0.0)),
    )
    if not project.frames:
        raise ValueError(f"{data_dir}: split {split!r} has no frames (cases: {project.cases})")
    engine = KeypointEngine(model, variables, meta, batch_size=batch_size, dtype=meta["dtype"])
    return engine, meta, project


def tune_project(workdir, data_dir, *, batch_size: int = 16, which: str = "best") -> dict:
    """Tunes visibility thresholds on the validation cases and writes W/thresholds.json."""
    engine, meta, project = _load(workdir, data_dir, "val", batch_size, which)
    pred = predict_project(engine, project, desc="tune on val")
    vis, _, _ = _frame_arrays(project)
    tuned = tune_thresholds(
        pred["visibility"],
        vis,
        meta["schema"],
        group_prob=pred["group"] if meta["grouped"] else None,
    )
    tuned.update(split="val", n_images=len(project.frames), step=meta["step"])
    save_thresholds(workdir, tuned)
    return tuned


def evaluate_project(
    workdir,
    data_dir,
    *,
    split: str = "val",
    threshold: float | None = None,
    batch_size: int = 16,
    overlays_dir=None,
    which: str = "best",
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

    Returns:
      `keypoint_metrics` of the split, plus `split`, `n_cases`, `step`, `backbone`, `head`,
      `grouped`, `image_size`. Errors are in pixels of the original frames.
    """
    engine, meta, project = _load(workdir, data_dir, split, batch_size, which)
    schema = meta["schema"]
    pred = predict_project(engine, project, desc=f"evaluate {split}")
    vis, xy, spacing = _frame_arrays(project)
    if threshold is None:
        point_thr, group_thr = load_thresholds(workdir, schema)  # float64, as tuned
    else:
        point_thr, group_thr = float(threshold), None
    metrics = keypoint_metrics(
        pred["visibility"],
        pred["coords"],
        vis,
        xy,
        schema,
        threshold=point_thr,
        group_prob=None if group_thr is None else pred["group"],
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
    )
    if overlays_dir is not None:
        shown = predicted_visibility(
            pred["visibility"],
            schema,
            threshold=point_thr,
            group_prob=None if group_thr is None else pred["group"],
            group_threshold=0.5 if group_thr is None else group_thr,
        )
        write_overlays(overlays_dir, project, pred["coords"], shown, pred["visibility"])
    return metrics


def write_overlays(out_dir, project, coords: np.ndarray, shown: np.ndarray, prob=None) -> int:
    """One PNG per frame: truth as circles, predictions as crosses, coloured by group."""
    import cv2  # noqa: PLC0415

    from tavr_jax.visualize import draw_keypoints, draw_legend  # noqa: PLC0415

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    schema = project.schema
    for i, f in enumerate(project.frames):
        image = project.load_image(i)
        rgb = draw_keypoints(image, f.coords, f.visibility, schema, marker="circle", labels=False)
        rgb = draw_keypoints(
            rgb,
            coords[i],
            shown[i],
            schema,
            marker="cross",
            probabilities=None if prob is None else prob[i],
        )
        draw_legend(rgb, schema)
        ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if not ok:
            raise ValueError(f"cannot encode the overlay of {f.image_path}")
        name = f"{f.case_id}__{pathlib.Path(f.frame_name).stem}.png"
        atomic_write_bytes(out_dir / name, png.tobytes())
    return len(project.frames)


# ----------------------------------------------------------------------------------------------
# Reports


def _fmt(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def summary_table(metrics: dict) -> str:
    """A short markdown table of one evaluation: pooled, per-image mean, per group."""
    head = "| | precision | recall | F1 | mean error px | loc. acc. 20 px |"
    lines = [head, "|---|---|---|---|---|---|"]

    def row(label, m):
        vals = [_fmt(m[k]) for k in ("precision", "recall", "f1")]
        vals += [_fmt(m["mean_error_px"], 2), _fmt(m["loc_accuracy_20px"])]
        lines.append(f"| {label} | " + " | ".join(vals) + " |")

    row("pooled", metrics)
    row("per-image mean", metrics["per_image_mean"])
    for name, m in metrics["per_group"].items():
        row(f"group {name}", m)
    extra = f"{metrics['n_images']} images"
    if metrics.get("mean_error_mm") is not None:
        extra += f", mean error {metrics['mean_error_mm']:.2f} mm"
    return "\n".join(lines) + f"\n\n{extra}\n"


# ----------------------------------------------------------------------------------------------
# Table 1 of the paper: backbones, head types and the grouping ablation under one budget

# (precision, recall, F1, mean error px, localisation accuracy) of the paper's Table 1.
PAPER_TABLE1 = {
    "resnet18": (0.8821, 0.9036, 0.8803, 25.61, 0.5570),
    "resnet34": (0.9235, 0.9602, 0.9332, 25.65, 0.5505),
    "resnet50": (0.8740, 0.8804, 0.8649, 37.69, 0.2541),
    "efficientnet_b7": (0.7645, 0.2810, 0.4077, 44.80, 0.1197),
    "vgg16": (0.7726, 0.3102, 0.4596, 42.70, 0.1363),
}
PAPER_GROUPING_GAIN = 0.08  # the paper: grouping improves F1 by more than 8%
_LABELS = {
    "resnet18": "ResNet18",
    "resnet34": "ResNet34",
    "resnet50": "ResNet50",
    "efficientnet_b7": "EfficientNet B7",
    "vgg16": "VGG16",
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the table: a backbone, a head type, grouped or not."""

    backbone: str
    head: str = "regression"
    grouped: bool = True

    @property
    def name(self) -> str:
        return f"{self.backbone}-{self.head}" + ("" if self.grouped else "-ungrouped")


def table1_variants(backbones: Sequence[str], ablation_backbone: str = "resnet34") -> list[Variant]:
    """Every backbone with the paper's head, then `ablation_backbone` with the paper's head,
    the integral head and without groups."""
    variants = [Variant(b) for b in (*backbones, ablation_backbone)]
    variants += [Variant(ablation_backbone, head="integral")]
    variants += [Variant(ablation_backbone, grouped=False)]
    return list(dict.fromkeys(variants))  # unique, in order


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def table1_markdown(
    results: Sequence[tuple[Variant, dict]],
    *,
    ablation_backbone: str,
    command: str,
    budget: str,
    device: str,
    date: str,
    data: str = "",
) -> str:
    """The markdown report: our rows beside the paper's, then the grouping ablation."""
    cols = (
        "backbone|head|groups|source|precision|recall|F1|mean error px|loc. acc. 20 px|"
        "error @1024 px|per-image F1|train s"
    ).split("|")
    lines = [
        "# Table 1 reproduced: backbones, heads and the grouping ablation",
        "",
        f"Command: `{command}`  ",
        f"Budget: {budget}  ",
        f"Device: {device}  ",
        f"Data: {data}  ",
        f"Date: {date}",
        "",
        "Metrics pooled over all (test frame, point) pairs of held-out test cases, thresholds "
        "tuned on the validation cases; errors in pixels of the original frames (error @1024 "
        "px rescales them to a 1024-pixel-wide frame). The paper's rows are its Table 1 "
        "(512x512 frames, its private data).",
        "",
        _row(cols),
        _row(["---"] * len(cols)),
    ]
    for v, m in results:
        width = m.get("frame_width_px")
        err = m.get("mean_error_px")
        at1024 = None if err is None or not width else err * 1024.0 / width
        lines.append(
            _row(
                [
                    _LABELS.get(v.backbone, v.backbone),
                    v.head,
                    "yes" if v.grouped else "no",
                    "ours",
                    _fmt(m["precision"]),
                    _fmt(m["recall"]),
                    _fmt(m["f1"]),
                    _fmt(err, 2),
                    _fmt(m["loc_accuracy_20px"]),
                    _fmt(at1024, 2),
                    _fmt(m["per_image_mean"]["f1"]),
                    _fmt(m.get("train_seconds"), 0),
                ]
            )
        )
        paper = PAPER_TABLE1.get(v.backbone)
        if paper is not None and v.head == "regression" and v.grouped:
            p, r, f1, e, acc = paper
            lines.append(
                _row(
                    [
                        _LABELS[v.backbone],
                        "regression",
                        "yes",
                        "paper",
                        _fmt(p),
                        _fmt(r),
                        _fmt(f1),
                        _fmt(e, 2),
                        _fmt(acc),
                        _fmt(e * 2, 2),
                        "-",
                        "-",
                    ]
                )
            )
    by_variant = dict(results)
    grouped = by_variant.get(Variant(ablation_backbone))
    ungrouped = by_variant.get(Variant(ablation_backbone, grouped=False))
    lines += ["", "## Grouped vs not grouped", ""]
    if grouped is None or ungrouped is None or None in (grouped["f1"], ungrouped["f1"]):
        lines.append(f"Not available: both {ablation_backbone} runs are needed.")
    else:
        diff = grouped["f1"] - ungrouped["f1"]
        rel = diff / ungrouped["f1"] if ungrouped["f1"] > 0 else None
        points = "holds" if diff > PAPER_GROUPING_GAIN else "does not hold"
        relative = "holds" if rel is not None and rel > PAPER_GROUPING_GAIN else "does not hold"
        lines += [
            _row(["network", "F1", "per-image F1"]),
            _row(["---"] * 3),
            _row(
                [
                    f"{ablation_backbone}, grouped",
                    _fmt(grouped["f1"]),
                    _fmt(grouped["per_image_mean"]["f1"]),
                ]
            ),
            _row(
                [
                    f"{ablation_backbone}, not grouped",
                    _fmt(ungrouped["f1"]),
                    _fmt(ungrouped["per_image_mean"]["f1"]),
                ]
            ),
            "",
            f"F1 difference (grouped - not grouped): {diff:+.4f} "
            f"({'-' if rel is None else f'{100 * rel:+.1f}%'} relative). The paper's claim of more "
            f"than 8% F1 from grouping, read as {PAPER_GROUPING_GAIN:.2f} F1 points, {points}; "
            f"read as 8% relative, {relative} at this budget.",
        ]
    return "\n".join(lines) + "\n"


def run_table1(
    base_config,
    data_dir,
    out,
    *,
    backbones: Sequence[str],
    steps: int,
    image_size: int,
    workdir_root,
    ablation_backbone: str = "resnet34",
    command: str = "",
    train_fn=None,
    eval_batch_size: int = 16,
) -> list[tuple[Variant, dict]]:
    """Trains and evaluates every variant with the same budget; writes the table after each.

    Each variant trains in `workdir_root/<name>` (resumed when present), gets thresholds tuned
    on the validation cases and is evaluated on the test cases (a test fraction of 0.2 is set
    when the config has none, so val can pick checkpoints and thresholds). A variant whose
    metrics_test.json records the same budget is reused, so an interrupted table resumes.
    `train_fn` defaults to `tavr_jax.train.train_and_evaluate`.
    """
    import datetime  # noqa: PLC0415
    import time  # noqa: PLC0415

    import jax  # noqa: PLC0415

    if train_fn is None:
        from tavr_jax.train import train_and_evaluate as train_fn  # noqa: PLC0415
    if steps < 1 or image_size < 8:
        raise ValueError(f"steps must be >= 1 and image_size >= 8, got {steps}, {image_size}")
    results = []
    variants = table1_variants(backbones, ablation_backbone)
    dev = jax.devices()[0]
    device = (
        f"{len(jax.devices())} x {dev.platform} ({dev.device_kind}), {os.cpu_count()} CPU cores"
    )
    budget = (
        f"{steps} steps x batch {base_config.batch_size} at {image_size}x{image_size} per variant "
        f"(optimizer {base_config.optimizer}, lr {base_config.learning_rate})"
    )
    for v in variants:
        config = base_config.copy_and_resolve_references()
        config.backbone, config.head, config.grouped = v.backbone, v.head, v.grouped
        config.num_steps, config.image_size = int(steps), int(image_size)
        config.eval_every = config.checkpoint_every = max(1, steps // 2)
        config.warmup_steps = min(config.warmup_steps, max(1, steps // 10))
        if config.test_fraction == 0:
            config.test_fraction = 0.2
        workdir = pathlib.Path(workdir_root) / v.name
        done = workdir / "metrics_test.json"
        budget_key = {"budget_steps": int(steps), "budget_image_size": int(image_size)}
        metrics = json.loads(done.read_text()) if done.exists() else {}
        if {k: metrics.get(k) for k in budget_key} != budget_key:
            t0 = time.perf_counter()
            train_fn(config, workdir, data_dir)
            train_s = time.perf_counter() - t0
            tune_project(workdir, data_dir, batch_size=eval_batch_size)
            metrics = evaluate_project(workdir, data_dir, split="test", batch_size=eval_batch_size)
            metrics.update(train_seconds=train_s, **budget_key)
            write_json_atomic(done, metrics)
        results.append((v, metrics))
        text = table1_markdown(
            results,
            ablation_backbone=ablation_backbone,
            command=command,
            budget=budget,
            device=device,
            date=datetime.date.today().isoformat(),
            data=f"{data_dir}; test split {metrics['n_images']} frames of {metrics['n_cases']} "
            f"cases, {metrics['frame_width_px']:.0f} px wide",
        )
        atomic_write_bytes(pathlib.Path(out), text.encode())
    return results
