"""Metrics of a report against the truth: labels, territories, segments, calibration, masks."""

from __future__ import annotations

import pathlib
import zipfile

import cv2
import numpy as np

from perfusion import reliability, scores, studies


def load_true_masks(data_dir, names, size: int) -> np.ndarray | None:
    """(N, 2, S, S) bool true defect masks from DATA/masks/<name>.npz, or None if any is missing."""
    out = []
    for n in names:
        p = pathlib.Path(data_dir) / "masks" / f"{n}.npz"
        if not p.is_file():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                m = np.stack([z["stress"], z["rest"]]).astype(np.uint8)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{p}: not a readable mask file ({e})") from None
        if m.shape[-1] != size:
            m = np.stack([cv2.resize(x, (size, size), interpolation=cv2.INTER_NEAREST) for x in m])
        out.append(m.astype(bool))
    return np.stack(out)


def pooled_dice(pred: np.ndarray, true: np.ndarray) -> float:
    """Dice over all pixels of all maps together (1 when both are empty)."""
    p, t = np.asarray(pred, bool), np.asarray(true, bool)
    total = p.sum() + t.sum()
    return float(2 * (p & t).sum() / total) if total else 1.0


def segments_bool(segment_lists) -> np.ndarray:
    out = np.zeros((len(segment_lists), scores.NUM_SEGMENTS), bool)
    for i, segs in enumerate(segment_lists):
        out[i, np.asarray(list(segs), int) - 1] = True
    return out


def territories_bool(territory_lists) -> np.ndarray:
    return np.array([[t in set(ts) for t in scores.TERRITORY_NAMES] for ts in territory_lists])


def territories_of(segment_calls: np.ndarray) -> np.ndarray:
    """(B, 3) bool: a territory is involved when any of its segments is a defect."""
    return (segment_calls.astype(np.int32) @ scores.territory_matrix().T) > 0


# ---------------------------------------------------------------------------- evaluation


def evaluate_report(report: dict, labels_csv) -> dict:
    """Metrics of a report against labels.csv: label, territory (exact set, per territory)
    and segment accuracy; calibration and abstention of the probabilities; skipped count."""
    truth = {r["filename"]: r for r in studies.read_labels(labels_csv)}
    rows = report["studies"]
    missing = [r["file"] for r in rows if r["file"] not in truth]
    if missing:
        raise ValueError(f"{labels_csv}: no labels for {missing[:3]}")
    t = [truth[r["file"]] for r in rows]
    pred_terr = territories_bool([r["territories"] for r in rows])
    true_terr = territories_bool([x["territories"] for x in t])
    seg = scores.segment_f1(
        segments_bool([r["defect_segments"] for r in rows]),
        segments_bool([x["segments"] for x in t]),
    )
    labels_true = np.array([x["label"] for x in t])
    labels_pred = np.array([r["label"] for r in rows])
    abnormal = labels_true != "normal"
    both = abnormal & (labels_pred != "normal")
    certain = np.array([not r.get("uncertain", False) for r in rows], bool)
    p_abn = np.array([1.0 - r["probabilities"]["normal"] for r in rows])
    # P(infarction | abnormal) of the truly abnormal studies
    p_inf = np.array(
        [
            r["probabilities"]["infarction"] / max(1.0 - r["probabilities"]["normal"], 1e-9)
            for r in rows
        ]
    )

    def mean_or_none(x):
        return float(np.mean(x)) if len(x) else None

    pred_seg = segments_bool([r["defect_segments"] for r in rows])
    true_seg = segments_bool([x["segments"] for x in t])
    per_study = {  # per-study outcomes the bootstrap resamples
        "label_accuracy": (labels_true == labels_pred).astype(float),
        "abnormal_accuracy": (abnormal == (labels_pred != "normal")).astype(float),
        "ischemia_vs_infarction_accuracy": np.where(both, labels_true == labels_pred, np.nan),
        "territory_exact_accuracy": (pred_terr == true_terr).all(axis=1).astype(float),
    }
    counts = np.stack(
        [
            (pred_seg & true_seg).sum(1),
            (pred_seg & ~true_seg).sum(1),
            (~pred_seg & true_seg).sum(1),
        ],
        axis=1,
    )  # (N, 3) tp, fp, fn
    return {
        "n": len(rows),
        "skipped": len(report.get("skipped", [])),
        "label_accuracy": mean_or_none(labels_true == labels_pred),
        "abnormal_accuracy": mean_or_none(abnormal == (labels_pred != "normal")),
        "ischemia_vs_infarction_accuracy": mean_or_none(labels_true[both] == labels_pred[both]),
        "territory_exact_accuracy": mean_or_none((pred_terr == true_terr).all(axis=1)),
        "territory_accuracy": {
            n: mean_or_none(pred_terr[:, j] == true_terr[:, j])
            for j, n in enumerate(scores.TERRITORY_NAMES)
        },
        "segment": seg,
        "ci95": _bootstrap_ci(per_study, counts),
        "uncertain_rate": mean_or_none(~certain),
        "certain": {
            "label_accuracy": mean_or_none((labels_true == labels_pred)[certain]),
            "abnormal_accuracy": mean_or_none((abnormal == (labels_pred != "normal"))[certain]),
        },
        "calibration": {
            "abnormal": _calibration(p_abn, abnormal),
            "ischemia_vs_infarction": _calibration(
                p_inf[abnormal], labels_true[abnormal] == "infarction"
            ),
        },
    }


def _bootstrap_ci(per_study: dict, segment_counts, *, n_boot: int = 1000, seed: int = 0):
    """95% percentile intervals over studies resampled with replacement: each per-study
    metric (nan = not counted) and the pooled segment F1 from per-study (tp, fp, fn)."""
    n = len(segment_counts)
    if n == 0:
        return {}
    idx = np.random.default_rng(seed).integers(0, n, (n_boot, n))
    out = {}
    for name, values in per_study.items():
        v = values[idx]
        counted = ~np.isnan(v)
        total, k = np.where(counted, v, 0.0).sum(axis=1), counted.sum(axis=1)
        means = total[k > 0] / k[k > 0]
        out[name] = np.quantile(means, [0.025, 0.975]).tolist() if len(means) else None
    tp, fp, fn = segment_counts[idx].sum(axis=1).T
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    out["segment_f1"] = np.quantile(f1, [0.025, 0.975]).tolist()
    return out


def _calibration(p, y) -> dict:
    return {
        "n": int(len(p)),
        "brier": reliability.brier_score(p, y),
        "ece": reliability.expected_calibration_error(p, y),
        "reliability": reliability.reliability_bins(p, y),
        "abstention": reliability.abstention_curve(p, y),
    }
