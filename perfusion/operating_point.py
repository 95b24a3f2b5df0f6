"""The operating point of the normal-vs-abnormal call: the probability at which a study is
called abnormal, chosen on out-of-fold probabilities of the training folder.

A rule names what to hold: "sensitivity:0.95" (of the thresholds that call at least 95% of
the abnormal studies abnormal, the most specific, and of those the most sensitive; never
above 0.5, so a study more likely abnormal than not is never called normal),
"specificity:0.9" (of those that call at least 90% of the normal studies normal, the most
sensitive, then the most specific; never below 0.5) or "balanced" (Youden's J, sensitivity +
specificity - 1, at its largest; ties go to the lower threshold). A study is abnormal when
its probability reaches the threshold. Pure numpy, shared by the fit (perfusion.fitting), the
report (perfusion.analyze) and the cross-validation (perfusion.clinical_cv).
"""

from __future__ import annotations

import dataclasses

import numpy as np

RULE_KINDS = ("sensitivity", "specificity", "balanced")
# Folders fitted before operating points were stored are read with the threshold the
# calibrated probabilities were made for.
LEGACY_RULE = "0.5 (model folder fitted before operating points: re-fit it to choose one)"


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
    """A threshold on the calibrated abnormal probability and how it was chosen."""

    rule: str
    threshold: float
    sensitivity: float | None = None  # out of fold, on the training folder
    specificity: float | None = None

    def to_dict(self) -> dict:
        return {
            "rule": self.rule,
            "threshold": self.threshold,
            "oof_sensitivity": self.sensitivity,
            "oof_specificity": self.specificity,
        }

    @classmethod
    def from_dict(cls, d: dict) -> OperatingPoint:
        threshold = float(d["threshold"])
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold {threshold} is not a probability")
        sens, spec = d.get("oof_sensitivity"), d.get("oof_specificity")
        return cls(
            str(d["rule"]),
            threshold,
            None if sens is None else float(sens),
            None if spec is None else float(spec),
        )


LEGACY = OperatingPoint(LEGACY_RULE, 0.5)


def parse_rule(rule: str) -> tuple[str, float | None]:
    """("sensitivity", 0.95) from "sensitivity:0.95"; ("balanced", None) from "balanced"."""
    kind, _, value = str(rule).partition(":")
    if kind == "balanced" and not value:
        return kind, None
    if kind in ("sensitivity", "specificity"):
        try:
            target = float(value)
        except ValueError:
            target = float("nan")
        if 0.0 < target <= 1.0:
            return kind, target
    raise ValueError(
        f"operating point {rule!r}: expected sensitivity:X, specificity:X (0 < X <= 1) or balanced"
    )


def candidate_thresholds(p) -> np.ndarray:
    """0, the midpoints between consecutive distinct probabilities (with 0 and 1 as bounds)
    and 1: every way to split the studies, each cut as far from a study as it can be."""
    values = np.unique(np.concatenate([[0.0, 1.0], np.asarray(p, np.float64)]))
    return np.unique(np.concatenate([[0.0], (values[:-1] + values[1:]) / 2, [1.0]]))


def sensitivity_specificity(p, y, thresholds) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivity and specificity of the call p >= t for each threshold t."""
    p, y = np.asarray(p, np.float64), np.asarray(y).astype(bool)
    called = p[None, :] >= np.asarray(thresholds, np.float64)[:, None]  # (T, N)
    sensitivity = (called & y).sum(1) / max(int(y.sum()), 1)
    specificity = (~called & ~y).sum(1) / max(int((~y).sum()), 1)
    return sensitivity, specificity


def choose_operating_point(p, y, rule: str, *, even: float = 0.5) -> OperatingPoint:
    """The threshold the rule picks on calibrated probabilities p of studies with outcomes y
    (1 abnormal).

    even: where a calibrated probability says abnormal is as likely as not. A sensitivity rule
    only ever lowers the threshold from it (a study more likely abnormal than not is never
    called normal), a specificity rule only ever raises it.
    """
    kind, target = parse_rule(rule)
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        raise ValueError("an operating point needs normal and abnormal studies")
    cuts = candidate_thresholds(p)
    sens, spec = sensitivity_specificity(p, y, cuts)
    if kind == "balanced":
        i = int(np.argmax(sens + spec))  # first = lowest cut among ties
        return OperatingPoint(str(rule), float(cuts[i]), float(sens[i]), float(spec[i]))
    # small tolerance: 19/20 must count as 0.95 although it is 0.9499999... in floating point
    held = np.flatnonzero((sens if kind == "sensitivity" else spec) >= target - 1e-9)
    if not len(held):  # only when normal studies sit at probability 1 exactly
        raise ValueError(f"operating point {rule!r}: no threshold reaches it")
    # The target is a floor: of the cuts that hold it, the one best at the other measure,
    # then at this one. Taking the highest cut that holds sensitivity instead would, on a
    # training folder separated perfectly out of fold, give up 5% of the abnormal studies for
    # no specificity at all (it did: 34 of 400 easy studies missed).
    this, other = (sens, spec) if kind == "sensitivity" else (spec, sens)
    cut = cuts[held[np.lexsort((-this[held], -other[held]))[0]]]
    # The most specific cut at 95% sensitivity lies above the even call when the folder has
    # sensitivity to spare (easy studies: 0.84, which missed 5 of 400 held-out abnormal
    # studies where 0.5 missed 1): out of fold no abnormal study fell in between, a new one
    # may, and the model calls it more likely abnormal than not.
    cut = min(cut, even) if kind == "sensitivity" else max(cut, even)
    (sens_at,), (spec_at,) = sensitivity_specificity(p, y, [cut])
    return OperatingPoint(str(rule), float(cut), float(sens_at), float(spec_at))
