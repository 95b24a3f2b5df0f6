"""Normal limits, blackout masks, 17-segment scores, SSS/SRS/SDS, TPD and territories.

Everything works on relative uptake (0..1) resampled onto the canonical polar grid
(`perfusion.geometry.segment_map(size)`: 0 outside the disk, 1..17 AHA segments), batched
over studies and phases, with the per-segment statistics written as one matrix product
against the one-hot segment map (no loop over pixels, segments or studies).

Definitions (all documented in docs/perfusion_clinical.md):
  z-deficit      z = (mean - u) / sd per pixel, using the normal limits of the study's phase
                 (stress or rest) and sex; positive = below the normal mean.
  blackout       pixels of the LV with u < mean - k sd, i.e. z > k (k = 2.5 by default).
  extent         blackout pixels as % of the LV pixels.
  TPD            100 / N_LV * sum over blackout pixels of clip((mean - u) / mean, 0, 1): each
                 abnormal pixel weighs by the fraction of normal uptake it has lost, so TPD
                 combines extent and severity (Slomka et al. 2005); TPD <= extent, and a region
                 with no uptake at all contributes its full area.
  segment score  0..4 from the segment's mean z-deficit against `segment_z` = (t1, t2, t3, t4):
                 score = number of thresholds reached (z >= t1 -> 1 equivocal, ... >= t4 -> 4).
  SSS, SRS       sums of the 17 stress / rest scores; SDS = sum max(stress - rest, 0).
  territory      involved when the sum of its segments' stress scores >= `territory_min_score`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib

import numpy as np

from perfusion.geometry import NUM_SEGMENTS, TERRITORIES, TERRITORY_NAMES
from tavr_jax.fileio import atomic_write_bytes

PHASES = ("stress", "rest")
REVERSIBILITY = ("normal", "reversible", "partially_reversible", "fixed")


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """Thresholds that turn normal-limit deviations into clinical scores (tuned on training)."""

    k: float = 2.5  # blackout at mean - k SD (QPS-style databases use 2.5)
    segment_z: tuple[float, float, float, float] = (2.0, 3.0, 4.5, 6.0)
    territory_min_score: int = 2  # summed stress score in a territory to call it involved

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ScoreConfig:
        return cls(
            k=float(d["k"]),
            segment_z=tuple(float(t) for t in d["segment_z"]),
            territory_min_score=int(d["territory_min_score"]),
        )


@dataclasses.dataclass(frozen=True)
class NormalLimits:
    """Per-pixel mean and SD of relative uptake of normal studies, per phase and sex group.

    `mean[g]`, `sd[g]`: (2, S, S) float32 for phase (stress, rest); group "all" always exists,
    "M"/"F" only when the training set held at least `min_group` normals of that sex.
    """

    mean: dict[str, np.ndarray]
    sd: dict[str, np.ndarray]
    count: dict[str, int]

    @property
    def size(self) -> int:
        return int(self.mean["all"].shape[-1])

    def for_sex(self, sex: str | None) -> tuple[np.ndarray, np.ndarray]:
        """(mean, sd), each (2, S, S): the sex-specific limits when fitted, else the pooled ones."""
        g = _sex_group(sex)
        if g not in self.mean:
            g = "all"
        return self.mean[g], self.sd[g]

    def stack_for(self, sexes) -> tuple[np.ndarray, np.ndarray]:
        """(mean, sd), each (B, 2, S, S), for a sequence of B sexes (None = pooled)."""
        pairs = [self.for_sex(s) for s in sexes]
        return np.stack([m for m, _ in pairs]), np.stack([s for _, s in pairs])

    def save(self, path) -> None:
        """Atomic .npz write."""
        arrays = {}
        for g in self.mean:
            arrays[f"mean_{g}"] = self.mean[g]
            arrays[f"sd_{g}"] = self.sd[g]
        arrays["count"] = np.frombuffer(json.dumps(self.count).encode(), np.uint8)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path) -> NormalLimits:
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"normal limits file not found: {path}")
        with np.load(path) as z:
            count = json.loads(bytes(z["count"]).decode())
            mean = {g: z[f"mean_{g}"] for g in count}
            sd = {g: z[f"sd_{g}"] for g in count}
        return cls(mean=mean, sd=sd, count=count)


def _sex_group(sex) -> str:
    if sex is None:
        return "all"
    s = str(sex).strip().upper()[:1]
    return s if s in ("M", "F") else "all"


def fit_normal_limits(
    stress: np.ndarray,
    rest: np.ndarray,
    *,
    sex=None,
    min_group: int = 10,
    sd_floor: float = 0.02,
) -> NormalLimits:
    """Fit normal limits on N normal studies.

    Args:
      stress, rest: (N, S, S) relative uptake of normal studies.
      sex: optional length-N sequence of "M"/"F"/None; groups with >= min_group studies get
        their own limits.
      sd_floor: lower bound on the SD (relative uptake units) so that a pixel that happens to
        vary little in a small database does not flag every small deviation.
    """
    maps = np.stack([np.asarray(stress, np.float32), np.asarray(rest, np.float32)], axis=1)
    if maps.ndim != 4 or maps.shape[-1] != maps.shape[-2]:
        raise ValueError(
            f"normal limits need (N, S, S) square maps, got {maps.shape[:1] + maps.shape[2:]}"
        )
    if len(maps) < 2:
        raise ValueError(f"normal limits need at least 2 normal studies, got {len(maps)}")
    groups = {"all": np.ones(len(maps), bool)}
    if sex is not None:
        if len(sex) != len(maps):
            raise ValueError(f"sex has {len(sex)} entries for {len(maps)} studies")
        codes = np.array([_sex_group(s) for s in sex])
        for g in ("M", "F"):
            if (codes == g).sum() >= max(min_group, 2):
                groups[g] = codes == g
    mean, sd, count = {}, {}, {}
    for g, sel in groups.items():
        mean[g] = maps[sel].mean(axis=0).astype(np.float32)
        sd[g] = np.maximum(maps[sel].std(axis=0, ddof=1), sd_floor).astype(np.float32)
        count[g] = int(sel.sum())
    return NormalLimits(mean=mean, sd=sd, count=count)


def segment_onehot(segments: np.ndarray) -> np.ndarray:
    """(S*S, 17) float32 one-hot of the AHA segment of each pixel (all-zero outside the LV)."""
    seg = np.asarray(segments).reshape(-1)
    return (seg[:, None] == np.arange(1, NUM_SEGMENTS + 1)[None, :]).astype(np.float32)


def segment_means(values: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Mean of `values` (..., S, S) over each AHA segment -> (..., 17); 0 for empty segments."""
    onehot = segment_onehot(segments)  # (P, 17)
    flat = np.asarray(values, np.float32).reshape(*values.shape[:-2], -1)
    counts = onehot.sum(axis=0)
    return (flat @ onehot) / np.maximum(counts, 1.0)


def deficit_maps(uptake: np.ndarray, mean: np.ndarray, sd: np.ndarray, *, k: float):
    """Per-pixel z-deficit, blackout mask and severity.

    Args:
      uptake, mean, sd: broadcastable arrays (..., S, S).
    Returns:
      z (mean - u) / sd, blackout z > k, severity clip((mean - u) / mean, 0, 1) on blackout.
    """
    u = np.asarray(uptake, np.float32)
    z = (mean - u) / sd
    blackout = z > k
    severity = np.where(blackout, np.clip((mean - u) / np.maximum(mean, 1e-6), 0.0, 1.0), 0.0)
    return z, blackout, severity


def scores_from_z(z_segment: np.ndarray, thresholds) -> np.ndarray:
    """Segment scores 0..4: the number of thresholds (t1 <= t2 <= t3 <= t4) the mean z reaches."""
    t = np.asarray(thresholds, np.float32)
    return (np.asarray(z_segment)[..., None] >= t).sum(axis=-1).astype(np.int32)


def reversibility(stress_scores: np.ndarray, rest_scores: np.ndarray) -> np.ndarray:
    """Per-segment index into REVERSIBILITY: 0 normal, 1 reversible, 2 partially, 3 fixed."""
    s, r = np.asarray(stress_scores), np.asarray(rest_scores)
    return np.where(s == 0, 0, np.where(r == 0, 1, np.where(r < s, 2, 3))).astype(np.int32)


def territory_matrix() -> np.ndarray:
    """(3, 17) 0/1 membership of the AHA segments in LAD, LCX, RCA."""
    m = np.zeros((len(TERRITORY_NAMES), NUM_SEGMENTS), np.int32)
    for i, name in enumerate(TERRITORY_NAMES):
        m[i, np.asarray(TERRITORIES[name]) - 1] = 1
    return m


def score_studies(
    stress: np.ndarray,
    rest: np.ndarray,
    mean: np.ndarray,
    sd: np.ndarray,
    segments: np.ndarray,
    config: ScoreConfig = ScoreConfig(),
) -> dict[str, np.ndarray]:
    """Clinical quantities for a batch of B studies.

    Args:
      stress, rest: (B, S, S) relative uptake.
      mean, sd: (B, 2, S, S) or (2, S, S) normal limits for (stress, rest).
      segments: (S, S) int AHA segment map (0 outside the LV).
    Returns dict of arrays: blackout (B,2,S,S) bool, extent_pct (B,2), tpd (B,2),
      segment_z (B,2,17), scores (B,2,17) int, sss/srs/sds (B,), reversibility (B,17),
      territory_score (B,3), territories (B,3) bool in TERRITORY_NAMES order.
    """
    u = np.stack([np.asarray(stress, np.float32), np.asarray(rest, np.float32)], axis=1)
    mean = np.asarray(mean, np.float32)
    sd = np.asarray(sd, np.float32)
    if mean.ndim == 3:
        mean, sd = mean[None], sd[None]
    if u.shape[-2:] != segments.shape or mean.shape[-2:] != segments.shape:
        raise ValueError(
            f"map size {u.shape[-2:]} / normal limits {mean.shape[-2:]} / segment map "
            f"{segments.shape} differ"
        )
    lv = np.asarray(segments) > 0
    n_lv = max(int(lv.sum()), 1)
    z, blackout, severity = deficit_maps(u, mean, sd, k=config.k)
    blackout &= lv
    severity = np.where(lv, severity, 0.0)
    extent = 100.0 * blackout.reshape(*blackout.shape[:2], -1).sum(-1) / n_lv
    tpd = 100.0 * severity.reshape(*severity.shape[:2], -1).sum(-1) / n_lv
    seg_z = segment_means(np.where(lv, z, 0.0), segments)  # (B, 2, 17)
    scores = scores_from_z(seg_z, config.segment_z)
    s, r = scores[:, 0], scores[:, 1]
    terr_score = s @ territory_matrix().T  # (B, 3)
    return {
        "blackout": blackout,
        "extent_pct": extent.astype(np.float32),
        "tpd": tpd.astype(np.float32),
        "segment_z": seg_z.astype(np.float32),
        "scores": scores,
        "sss": s.sum(-1),
        "srs": r.sum(-1),
        "sds": np.maximum(s - r, 0).sum(-1),
        "reversibility": reversibility(s, r),
        "territory_score": terr_score,
        "territories": terr_score >= config.territory_min_score,
    }


def territory_names(flags) -> list[str]:
    """['LAD', ...] for a (3,) bool row in TERRITORY_NAMES order."""
    return [n for n, f in zip(TERRITORY_NAMES, np.asarray(flags), strict=True) if f]


def segment_f1(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Segment-level precision, recall and F1 pooled over studies; pred, true (B, 17) bool."""
    p, t = np.asarray(pred, bool), np.asarray(true, bool)
    tp, fp, fn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def tune_config(
    segment_z: np.ndarray,
    true_segments: np.ndarray,
    true_territories: np.ndarray,
    *,
    base: ScoreConfig = ScoreConfig(),
    t1_grid=np.arange(0.5, 10.01, 0.1),
    territory_grid=range(1, 9),
) -> tuple[ScoreConfig, dict]:
    """Pick the segment thresholds and territory threshold on training studies.

    The four score thresholds are scaled together so that t1 maximises the pooled segment F1
    (defect = stress score >= 1); then the territory threshold maximises the exact-set match.
    Without any true defect segments (or territories) in the labels, the base values stay:
    there is nothing to tune them on.

    Args:
      segment_z: (B, 17) stress mean z-deficit per segment (from `score_studies`).
      true_segments: (B, 17) bool, true_territories: (B, 3) bool.
    """
    seg_z = np.asarray(segment_z, np.float32)
    true_segments = np.asarray(true_segments, bool)
    ratios = np.asarray(base.segment_z, np.float32) / base.segment_z[0]
    grid = np.asarray(t1_grid, np.float32)
    # (T, B, 17) defect calls for every candidate t1 at once.
    calls = seg_z[None] >= grid[:, None, None]
    tp = (calls & true_segments).sum(axis=(1, 2))
    fp = (calls & ~true_segments).sum(axis=(1, 2))
    fn = (~calls & true_segments).sum(axis=(1, 2))
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    info = {}
    thresholds = tuple(float(t) for t in base.segment_z)
    if true_segments.any():
        thresholds = tuple(float(grid[int(np.argmax(f1))] * q) for q in ratios)
        info["segment_f1"] = float(f1.max())
    scores = scores_from_z(seg_z, thresholds)
    terr_score = scores @ territory_matrix().T
    tgrid = np.asarray(list(territory_grid))
    exact = (
        ((terr_score[None] >= tgrid[:, None, None]) == np.asarray(true_territories, bool)[None])
        .all(axis=-1)
        .mean(axis=-1)
    )
    tmin = base.territory_min_score
    if np.asarray(true_territories, bool).any():
        tmin = int(tgrid[int(np.argmax(exact))])
        info["territory_exact"] = float(exact.max())
    config = ScoreConfig(k=base.k, segment_z=thresholds, territory_min_score=tmin)
    return config, info
