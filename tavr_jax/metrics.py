"""The paper's keypoint metrics and visibility thresholds tuned on validation (pure numpy).

Definitions. A point k of image n is predicted visible when its probability exceeds its
threshold (strictly, as in the paper's `p_k > 0.5`) and, when group probabilities are given,
its group's probability exceeds the group threshold too (gating, `infer.postprocess`). Against
the annotated visibility this gives TP / FP / FN per (image, point); then

- precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2 TP / (2 TP + FP + FN);
- mean_error_px: mean Euclidean distance over the TP pairs (visible in truth and prediction),
  in pixels of the ORIGINAL frames; loc_accuracy_20px: share of those with distance <= dist_px;
- mean_error_mm: the same distances times each frame's pixel spacing, over frames whose
  spacing is known (> 0); None when no frame has one.

Calibration of the visibility probabilities (`calibration`): the (image, point) pairs are put
in equal-width probability bins; a bin's confidence is its mean probability, its accuracy the
share of annotated-visible points in it; ECE = sum over bins of (bin size / N) |accuracy -
confidence|. Calibrated probabilities make one threshold (0.5) close to the best one.

"Pooled" values sum the counts over all (image, point) pairs. `per_image_mean` is the public
reference's protocol: each image gets its own five values, then they are averaged over images.
A value whose denominator is zero is undefined (None when pooled) and such images are left out
of the per-image mean (nan-mean): an image with no predicted point has no precision, one with
no annotated point has no recall, one with neither has no F1, one with no TP pair has no error
or localisation accuracy. `per_image_defined` says how many images each mean is over.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tavr_jax.reporting import reported_points, thresholds
from tavr_jax.schema import KeypointSchema

METRIC_KEYS = ("precision", "recall", "f1", "mean_error_px", "loc_accuracy_20px")


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den == 0."""
    num = np.asarray(num, np.float64)
    den = np.asarray(den, np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def visibility_f1(pred: np.ndarray, truth: np.ndarray, axis=None):
    """F1 of predicted against annotated visibility, pooled over `axis` (all by default).

    1 where there is nothing to find and nothing is claimed (no TP, FP or FN): a point never
    annotated and never predicted is not an error.
    """
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    tp = (pred & truth).sum(axis=axis)
    fp = (pred & ~truth).sum(axis=axis)
    fn = (~pred & truth).sum(axis=axis)
    return np.nan_to_num(_div(2 * tp, 2 * tp + fp + fn), nan=1.0)


def calibration(probability: np.ndarray, truth: np.ndarray, *, bins: int = 10) -> dict:
    """Expected calibration error and reliability bins of binary probabilities.

    Bin b of `bins` equal-width bins holds probabilities in [b / bins, (b + 1) / bins), the
    last bin including 1. Empty bins have count 0 and None for their means.

    Returns:
      {"ece": float or None (no pairs), "n": pairs, "bins": [{"lo", "hi", "count",
      "confidence", "accuracy"}]}, JSON-serialisable.
    """
    if bins < 1:
        raise ValueError(f"calibration needs at least one bin, got {bins}")
    p = np.asarray(probability, np.float64).ravel()
    y = np.asarray(truth).astype(bool).ravel()
    if p.shape != y.shape:
        raise ValueError(
            f"probability and truth must have the same size, got {p.size} and {y.size}"
        )
    index = np.clip(np.floor(p * bins).astype(np.int64), 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    confidence = _div(np.bincount(index, weights=p, minlength=bins), count)
    accuracy = _div(np.bincount(index, weights=y.astype(np.float64), minlength=bins), count)
    gaps = np.where(count > 0, np.abs(accuracy - confidence), 0.0)
    ece = float(np.sum(count * gaps) / p.size) if p.size else None
    return {
        "ece": ece,
        "n": int(p.size),
        "bins": [
            {
                "lo": b / bins,
                "hi": (b + 1) / bins,
                "count": int(count[b]),
                "confidence": _to_json_value(confidence[b]),
                "accuracy": _to_json_value(accuracy[b]),
            }
            for b in range(bins)
        ],
    }


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


def keypoint_metrics(
    visibility: np.ndarray,
    coords: np.ndarray,
    true_visible: np.ndarray,
    true_coords: np.ndarray,
    schema: KeypointSchema,
    *,
    threshold=0.5,
    group: np.ndarray | None = None,
    group_threshold=0.5,
    dist_px: float = 20.0,
    pixel_spacing_mm: np.ndarray | None = None,
) -> dict:
    """The paper's metrics, pooled, per image (averaged), per group and per point.

    Args:
      visibility: (N, K) predicted visibility probabilities.
      coords: (N, K, 2) predicted (x, y) in pixels of the original frames.
      true_visible: (N, K) bool annotated flags (visible).
      true_coords: (N, K, 2) annotated (x, y) in pixels of the original frames.
      schema: the keypoint schema (K points in G groups).
      threshold: scalar or (K,) per-point visibility thresholds.
      group: optional (N, G) group presence probabilities; gates the points of each group.
      group_threshold: scalar or (G,) thresholds for `group`.
      dist_px: localisation radius in original pixels (a distance equal to it counts).
      pixel_spacing_mm: optional (N,) mm per original pixel, <= 0 or NaN when unknown.

    Returns:
      A JSON-serialisable dict (floats, ints, None): the five metrics pooled, `mean_error_mm`,
      `per_image_mean`, `per_image_defined`, `per_group`, `per_point`, `counts`, `threshold`,
      `group_threshold`, `dist_px`, `n_images`, and `visibility_calibration` (`calibration`
      of the visibility probabilities against the annotations, before any threshold or
      gating). See the module docstring for the definitions.
    """
    k = schema.num_points
    probability = np.asarray(visibility, np.float64)
    if probability.ndim != 2 or probability.shape[1] != k:
        raise ValueError(
            f"visibility must have shape (N, {k}) for schema {schema.name!r}, "
            f"got {probability.shape}"
        )
    n = probability.shape[0]
    visible = np.asarray(true_visible).astype(bool)
    pxy = np.asarray(coords, np.float64)
    txy = np.asarray(true_coords, np.float64)
    for name, arr, shape in (
        ("true_visible", visible, (n, k)),
        ("coords", pxy, (n, k, 2)),
        ("true_coords", txy, (n, k, 2)),
    ):
        if arr.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    pred = reported_points(
        probability, group, schema, point_thresholds=threshold, group_thresholds=group_threshold
    )

    tp = pred & visible
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
        "fp": (pred & ~visible).astype(np.float64),
        "fn": (~pred & visible).astype(np.float64),
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

    t = thresholds(threshold, k, "point")
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
        if group is None
        else _as_json_thresholds(group_threshold, schema.group_names),
        dist_px=float(dist_px),
        n_images=int(n),
        visibility_calibration=calibration(probability, visible),
    )
    return out


def _as_json_thresholds(threshold, names: Sequence[str]):
    t = thresholds(threshold, len(names), "group")
    return float(t[0]) if np.all(t == t[0]) else dict(zip(names, t.tolist(), strict=True))


# ----------------------------------------------------------------------------------------------
# Threshold tuning


def _best_threshold(pred: np.ndarray, truth: np.ndarray, candidates: np.ndarray):
    """pred (C, N, J) bool per candidate, truth (N, J) -> (best threshold (J,), best F1 (J,)).

    F1 is taken as 1 where neither truth nor prediction has a positive (nothing to find,
    nothing claimed), so a point never seen in validation gets a threshold that predicts
    nothing. Ties go to the candidate closest to 0.5, the paper's default.
    """
    f1 = visibility_f1(pred, truth[None], axis=1)  # (C, J)
    best = f1.max(axis=0)
    tie = np.isclose(f1, best)  # (C, J)
    closeness = np.where(tie, -np.abs(candidates - 0.5)[:, None], -np.inf)
    idx = closeness.argmax(axis=0)
    return candidates[idx], best


def tune_thresholds(
    visibility: np.ndarray,
    true_visible: np.ndarray,
    schema: KeypointSchema,
    candidates: Sequence[float] | np.ndarray | None = None,
    *,
    group: np.ndarray | None = None,
) -> dict:
    """Per-point (and per-group) visibility thresholds maximising F1 on validation.

    Each point's threshold maximises that point's pooled F1 over `candidates` (default
    0.05, 0.10, ..., 0.95). With `group`, group thresholds are tuned on group presence
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
    probability = np.asarray(visibility, np.float64)
    visible = np.asarray(true_visible).astype(bool)
    if (
        probability.ndim != 2
        or probability.shape[1] != schema.num_points
        or visible.shape != probability.shape
    ):
        raise ValueError(
            f"visibility and true_visible must both have shape (N, {schema.num_points}), "
            f"got {probability.shape} and {visible.shape}"
        )
    p_thr, p_f1 = _best_threshold(probability[None] > cand[:, None, None], visible, cand)
    groups, group_f1 = None, None
    if group is not None:
        presence = np.asarray(group, np.float64)
        if presence.shape != (probability.shape[0], schema.num_groups):
            want = (probability.shape[0], schema.num_groups)
            raise ValueError(f"group must have shape {want}, got {presence.shape}")
        g_thr, g_f1 = _best_threshold(
            presence[None] > cand[:, None, None], schema.group_presence(visible), cand
        )
        gate = (presence > g_thr)[:, schema.point_group]
        gated_thr, gated_f1 = _best_threshold(
            (probability[None] > cand[:, None, None]) & gate[None], visible, cand
        )
        # Gating is kept only when it raises the pooled validation F1 over ungated points.
        if visibility_f1((probability > gated_thr) & gate, visible) > visibility_f1(
            probability > p_thr, visible
        ):
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


# ----------------------------------------------------------------------------------------------
# Comparing two models over patients


def paired_bootstrap_f1(
    counts_a: dict, counts_b: dict, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict:
    """F1(a) - F1(b), pooled over cases, with a percentile interval from resampling patients.

    Both arms are scored on the same resampled cases in each replicate (a paired bootstrap),
    so the interval reflects how much the difference depends on which patients were tested.
    """
    cases = sorted(counts_a)
    if sorted(counts_b) != cases or not cases:
        raise ValueError("both arms must be scored on the same, non-empty set of cases")
    a = np.array([counts_a[c] for c in cases], np.float64)  # (cases, 3)
    b = np.array([counts_b[c] for c in cases], np.float64)

    def f1(counts):  # (..., 3) summed counts -> F1
        tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
        return 2 * tp / np.maximum(2 * tp + fp + fn, 1)

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(cases), (n_boot, len(cases)))
    boot_a, boot_b = f1(a[draws].sum(1)), f1(b[draws].sum(1))
    q = [50 * (1 - level), 50 * (1 + level)]
    f1_a, f1_b = float(f1(a.sum(0))), float(f1(b.sum(0)))
    return {
        "f1_a": f1_a,
        "f1_b": f1_b,
        "diff": f1_a - f1_b,
        "ci": np.percentile(boot_a - boot_b, q).tolist(),
        "relative": (f1_a - f1_b) / f1_b if f1_b > 0 else None,
        "relative_ci": np.percentile((boot_a - boot_b) / np.maximum(boot_b, 1e-12), q).tolist(),
        "level": level,
        "n_cases": len(cases),
        "n_boot": n_boot,
    }
