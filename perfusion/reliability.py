"""Saying when unsure: calibration of binary probabilities, and abstention.

Pure numpy, shared by the fit (the log loss that chooses the label model; Platt scaling is
fitted in perfusion.classifiers), the report (`uncertain_reason`, with the band moved to the
operating point by `band_around`) and the evaluation (reliability bins, expected calibration
error, Brier score, abstention rate against accuracy).
"""

from __future__ import annotations

import numpy as np


def reliability_bins(p, y, *, bins: int = 10) -> dict[str, list]:
    """Equal-width bins of the predicted probability: mean prediction, observed rate, count."""
    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    total_p = np.bincount(which, weights=p, minlength=bins)
    total_y = np.bincount(which, weights=y, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.where(count > 0, total_p / np.maximum(count, 1), np.nan)
        observed = np.where(count > 0, total_y / np.maximum(count, 1), np.nan)
    return {
        "lower": edges[:-1].tolist(),
        "upper": edges[1:].tolist(),
        "mean_predicted": [None if np.isnan(v) else float(v) for v in mean_p],
        "observed": [None if np.isnan(v) else float(v) for v in observed],
        "count": count.tolist(),
    }


def log_loss(p, y, *, eps: float = 1e-6) -> float:
    """Mean negative log-likelihood of binary outcomes y under P(y = 1) = p (clipped to eps)."""
    p = np.clip(np.asarray(p, np.float64), eps, 1.0 - eps)
    y = np.asarray(y, np.float64)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))


def expected_calibration_error(p, y, *, bins: int = 10) -> float:
    """Sum over bins of |mean prediction - observed rate| weighted by the bin's share."""
    r = reliability_bins(p, y, bins=bins)
    n = max(sum(r["count"]), 1)
    return float(
        sum(
            c / n * abs(m - o)
            for m, o, c in zip(r["mean_predicted"], r["observed"], r["count"], strict=True)
            if c
        )
    )


def brier_score(p, y) -> float:
    """Mean squared difference between the probability and the 0/1 outcome."""
    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
    return float(np.mean((p - y) ** 2)) if len(p) else float("nan")


def in_band(p, band) -> np.ndarray:
    """True where the probability lies inside the abstention band [low, high]."""
    low, high = band
    p = np.asarray(p)
    return (p >= low) & (p <= high)


def abstention_curve(p, y, *, half_widths=np.arange(0.0, 0.5, 0.05)) -> list[dict]:
    """For bands 0.5 +- w: the share of studies abstained on and the accuracy (at 0.5) of the
    rest, the trade a clinician makes by reading the uncertain studies herself."""
    p, y = np.asarray(p, np.float64), np.asarray(y).astype(bool)
    out = []
    for w in half_widths:
        band = (0.5 - float(w), 0.5 + float(w))
        keep = ~in_band(p, band) if w > 0 else np.ones(len(p), bool)
        accuracy = float(((p[keep] > 0.5) == y[keep]).mean()) if keep.any() else None
        out.append(
            {
                "band": [round(band[0], 3), round(band[1], 3)],
                "abstention_rate": float(1.0 - keep.mean()) if len(p) else 0.0,
                "accuracy": accuracy,
            }
        )
    return out


def band_around(threshold: float, band) -> tuple[float, float]:
    """The abstention band, given around 0.5, moved to a decision threshold: the same odds
    ratios either side of it (logits shifted by logit(threshold)).

    A band around 0.5 says how far the odds may sit from even before the call is trusted;
    around a threshold of 0.05 the even point is odds 1:19, so [0.25, 0.75] (odds 1/3 to 3
    times the threshold's) becomes 0.017-0.136. Unchanged for a threshold of 0.5.
    """
    t = float(np.clip(threshold, 1e-6, 1.0 - 1e-6))
    shift = np.log(t / (1.0 - t))

    def moved(q):
        q = float(np.clip(q, 1e-12, 1.0 - 1e-12))
        return float(1.0 / (1.0 + np.exp(-(np.log(q / (1.0 - q)) + shift))))

    low, high = band
    return (0.0 if low <= 0 else moved(low)), (1.0 if high >= 1 else moved(high))


def uncertain_reason(
    p_abnormal: float, p_infarction: float | None, band, *, abnormal_band=None
) -> str | None:
    """Why a study's call is uncertain, or None: a probability inside the abstention band.

    p_infarction: the probability of infarction given abnormal; only asked about when the
    study is called abnormal (None otherwise). abnormal_band: the band of the abnormal
    probability when it differs from `band` (around an operating point, `band_around`).
    """

    def within(b):
        return f"is within the abstention band {b[0]:.2f}-{b[1]:.2f}"

    abnormal_band = band if abnormal_band is None else abnormal_band
    if in_band(p_abnormal, abnormal_band):
        return f"abnormal probability {p_abnormal:.2f} {within(abnormal_band)}"
    if p_infarction is not None and in_band(p_infarction, band):
        return f"infarction (vs ischemia) probability {p_infarction:.2f} {within(band)}"
    return None
