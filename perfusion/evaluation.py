"""Metrics of a report against the truth: labels, territories, segments, calibration, masks,
and the figures the clinical literature reports (per-patient and per-vessel ROC AUC,
sensitivity and specificity of the abnormal call), with bootstrap intervals over studies."""

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


def per_territory(segment_values, how: str) -> np.ndarray:
    """(B, 3) in TERRITORY_NAMES order: the largest ("max") or the sum ("sum") of each
    territory's segment values, from (B, 17) in AHA order."""
    v = np.asarray(segment_values, np.float64)
    member = scores.territory_matrix().astype(bool)  # (3, 17)
    if how == "sum":
        return v @ member.T.astype(np.float64)
    if how == "max":
        return np.where(member[None], v[:, None, :], -np.inf).max(axis=-1)
    raise ValueError(f"unknown reduction {how!r}; expected 'max' or 'sum'")


def roc_auc(score, positive) -> float:
    """Area under the ROC curve: the chance that a positive outscores a negative, a tie
    counting half (the Mann-Whitney U over n1 n0); nan without both classes."""
    s = np.asarray(score, np.float64).ravel()
    y = np.asarray(positive, bool).ravel()
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    return float((_average_ranks(s)[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    first = np.concatenate([[True], xs[1:] != xs[:-1]])  # each run of equal values
    starts = np.flatnonzero(first)
    ends = np.append(starts[1:], len(x))
    ranks = np.empty(len(x))
    ranks[order] = ((starts + 1 + ends) / 2)[np.cumsum(first) - 1]
    return ranks


def bootstrap_indices(n: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_boot, n) studies resampled with replacement; the same draws as the bootstrap of
    perfusion.classifiers for the same n and seed, so intervals of one folder line up."""
    if n == 0:
        return np.zeros((n_boot, 0), np.int64)
    return np.random.default_rng(seed).integers(0, n, (n_boot, n))


def auc_with_interval(score, positive, resamples) -> dict:
    """ROC AUC with its 95% percentile interval over the resampled studies (rows of
    `bootstrap_indices`); score and positive are (N,) or (N, K) for K scores per study
    (pooled, the K kept together when a study is drawn)."""
    score, positive = np.asarray(score, np.float64), np.asarray(positive, bool)
    boot = np.array([roc_auc(score[i], positive[i]) for i in resamples])
    boot = boot[np.isfinite(boot)]
    return {
        "value": roc_auc(score, positive),
        "ci95": np.quantile(boot, [0.025, 0.975]).tolist() if len(boot) else None,
        "n_positive": int(positive.sum()),
        "n": int(positive.size),
    }


def vessel_aucs(score, positive, resamples) -> dict:
    """Per-vessel ROC AUC (LAD, LCX, RCA) and pooled over the three, from (N, 3) arrays."""
    out = {
        n: auc_with_interval(score[:, j], positive[:, j], resamples)
        for j, n in enumerate(scores.TERRITORY_NAMES)
    }
    out["pooled"] = auc_with_interval(score, positive, resamples)
    return out


# ---------------------------------------------------------------------------- evaluation


def evaluate_report(report: dict, labels_csv, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """`evaluate_rows` of a report against labels.csv (rows matched by file name)."""
    truth = {r["filename"]: r for r in studies.read_labels(labels_csv)}
    rows = report["studies"]
    missing = [r["file"] for r in rows if r["file"] not in truth]
    if missing:
        raise ValueError(f"{labels_csv}: no labels for {missing[:3]}")
    return evaluate_rows(
        rows,
        [truth[r["file"]] for r in rows],
        skipped=len(report.get("skipped", [])),
        n_boot=n_boot,
        seed=seed,
    )


def evaluate_rows(rows, truth, *, skipped: int = 0, n_boot: int = 1000, seed: int = 0) -> dict:
    """Metrics of report entries against their truth (dicts with label, territories,
    segments): label, territory (exact set, per territory) and segment accuracy; sensitivity
    and specificity of the abnormal call; per-patient and per-vessel ROC AUC; calibration
    and abstention; 95% bootstrap intervals over studies.

    Per-vessel scores: the model's (a territory's largest segment defect probability, the
    score its territory call thresholds) and the summed stress score of the territory's
    segments (the classical regional score), one ROC AUC per vessel and pooled over the three.
    """
    t = list(truth)
    pred_terr = territories_bool([r["territories"] for r in rows])
    true_terr = territories_bool([x["territories"] for x in t])
    seg = scores.segment_f1(
        segments_bool([r["defect_segments"] for r in rows]),
        segments_bool([x["segments"] for x in t]),
    )
    labels_true = np.array([x["label"] for x in t])
    labels_pred = np.array([r["label"] for r in rows])
    abnormal = labels_true != "normal"
    called = labels_pred != "normal"  # the call at the model's operating point
    both = abnormal & called
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
        "abnormal_accuracy": (abnormal == called).astype(float),
        "sensitivity": np.where(abnormal, called, np.nan),
        "specificity": np.where(~abnormal, ~called, np.nan),
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
    resamples = bootstrap_indices(len(rows), n_boot, seed)
    roc = _roc_aucs(rows, t, resamples) if rows else {}
    return {
        "n": len(rows),
        "skipped": skipped,
        "label_accuracy": mean_or_none(labels_true == labels_pred),
        "abnormal_accuracy": mean_or_none(abnormal == called),
        "sensitivity": mean_or_none(called[abnormal]),
        "specificity": mean_or_none(~called[~abnormal]),
        "ischemia_vs_infarction_accuracy": mean_or_none(labels_true[both] == labels_pred[both]),
        "territory_exact_accuracy": mean_or_none((pred_terr == true_terr).all(axis=1)),
        "territory_accuracy": {
            n: mean_or_none(pred_terr[:, j] == true_terr[:, j])
            for j, n in enumerate(scores.TERRITORY_NAMES)
        },
        "segment": seg,
        "roc_auc": roc,
        "ci95": _bootstrap_ci(per_study, counts, resamples),
        "uncertain_rate": mean_or_none(~certain),
        "certain": {
            "label_accuracy": mean_or_none((labels_true == labels_pred)[certain]),
            "abnormal_accuracy": mean_or_none((abnormal == called)[certain]),
        },
        "calibration": {
            "abnormal": _calibration(p_abn, abnormal),
            "ischemia_vs_infarction": _calibration(
                p_inf[abnormal], labels_true[abnormal] == "infarction"
            ),
        },
    }


def roc_inputs(rows, truth) -> dict[str, np.ndarray | None]:
    """The scores and outcomes of the ROC curves, from report entries and their truth:
    per patient the abnormal probability and stress TPD against abnormal, and the calls made
    (N,); per vessel
    the model's territory probabilities (None when the report has none) and the summed stress
    score of each territory against the listed territories (N, 3)."""
    names = scores.TERRITORY_NAMES
    with_p = bool(rows) and all(r.get("territory_probabilities") for r in rows)
    return {
        "abnormal": np.array([x["label"] != "normal" for x in truth], bool),
        "called": np.array([r["label"] != "normal" for r in rows], bool),
        "abnormal_probability": np.array([1.0 - r["probabilities"]["normal"] for r in rows]),
        "tpd_stress": np.array([r["TPD_stress"] for r in rows], np.float64),
        "territories": territories_bool([x["territories"] for x in truth]),
        "territory_probability": np.array(
            [[r["territory_probabilities"][n] for n in names] for r in rows]
        )
        if with_p
        else None,
        "territory_sss": per_territory(
            np.array([r["stress_scores"] for r in rows]).reshape(len(rows), -1), "sum"
        ),
    }


def _roc_aucs(rows, truth, resamples) -> dict:
    """Per-patient ROC AUC of the abnormal probability and of stress TPD; per-vessel ROC AUC
    of the model's territory probabilities and of each territory's summed stress score."""
    x = roc_inputs(rows, truth)
    model = x["territory_probability"]
    return {
        "patient": auc_with_interval(x["abnormal_probability"], x["abnormal"], resamples),
        "patient_tpd": auc_with_interval(x["tpd_stress"], x["abnormal"], resamples),
        "vessel": None if model is None else vessel_aucs(model, x["territories"], resamples),
        "vessel_sss": vessel_aucs(x["territory_sss"], x["territories"], resamples),
    }


def _bootstrap_ci(per_study: dict, segment_counts, idx) -> dict:
    """95% percentile intervals over the resampled studies (idx: `bootstrap_indices`): each
    per-study metric (nan = not counted) and the pooled segment F1 from per-study (tp, fp, fn)."""
    if len(segment_counts) == 0:
        return {}
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
