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

Learned models read the deviations from the normal limits as features: `polar_features` per
study (per-segment z, extent and relative deficit at stress and rest, their change, territory
and global sums, and how much of the stress defect persists at rest) and `segment_features`
per (study, segment).
"""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import zipfile

import numpy as np

from cardiac_core.fileio import atomic_write_bytes
from perfusion.geometry import NUM_SEGMENTS, TERRITORIES, TERRITORY_NAMES, polar_coords

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
        """Reads limits saved by `save` (no pickle); a broken file is a one-line ValueError."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"normal limits file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                count = {str(g): int(c) for g, c in json.loads(bytes(z["count"]).decode()).items()}
                mean = {g: z[f"mean_{g}"].astype(np.float32) for g in count}
                sd = {g: z[f"sd_{g}"].astype(np.float32) for g in count}
            shapes = {a.shape for a in (*mean.values(), *sd.values())}
            if "all" not in count or len(shapes) != 1 or len(next(iter(shapes))) != 3:
                raise ValueError(f"expected (2, S, S) limits with a pooled group, got {shapes}")
        except (
            OSError,
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
            EOFError,
            zipfile.BadZipFile,
        ) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{path}: not a readable normal-limits file ({reason})") from None
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


def cross_fitted_limits(stress, rest, labels, sexes, *, folds: int = 5, seed: int = 0):
    """Normal limits of a labelled set, and each study's own limits to score it against.

    Returns (limits fitted on all normals, mean (N, 2, S, S), sd (N, 2, S, S)): an abnormal
    study gets the full limits of its sex, a normal study limits fitted without it (k-fold over
    the normals), so its deviations are what a new normal study's would be.
    """
    labels = np.asarray(labels)
    normal = np.flatnonzero(labels == "normal")
    if len(normal) < 4:
        raise ValueError(f"need at least 4 normal studies for normal limits, got {len(normal)}")
    full = fit_normal_limits(stress[normal], rest[normal], sex=[sexes[i] for i in normal])
    mean, sd = full.stack_for(sexes)
    fold_of = np.random.default_rng(seed).permutation(len(normal)) % min(folds, len(normal) // 2)
    for f in np.unique(fold_of):
        keep, held = normal[fold_of != f], normal[fold_of == f]
        lim = fit_normal_limits(stress[keep], rest[keep], sex=[sexes[i] for i in keep])
        mean[held], sd[held] = lim.stack_for([sexes[i] for i in held])
    return full, mean, sd


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


# ------------------------------------------------------------------ features for learned models

_SEG = [str(i) for i in range(1, NUM_SEGMENTS + 1)]
REVERSAL_FEATURES = ("core", "rim", "core_minus_rim", "area", "correlation", "peak")
FEATURE_K = 2.0  # extent features count pixels more than 2 SD below the normal mean
POLAR_FEATURE_NAMES = tuple(
    [f"z_{p}_{s}" for p in PHASES for s in _SEG]
    + [f"extent_{p}_{s}" for p in PHASES for s in _SEG]
    + [f"deficit_{p}_{s}" for p in PHASES for s in _SEG]
    + [f"z_change_{s}" for s in _SEG]
    + [f"territory_z_{p}_{t}" for p in PHASES for t in TERRITORY_NAMES]
    + [f"{g}_{p}" for g in ("tpd", "extent", "z_sum", "z_max") for p in PHASES]
    + ["z_sum_change", "rest_over_stress"]
    + [f"persistence_{u}{c}" for u in ("deficit", "z") for c in ("", "_core")]
    + [f"reversal_{n}" for n in REVERSAL_FEATURES]
)
PERSISTENCE_CORE = 0.97  # the stress defect's core: LV pixels above this quantile of its deficit
SEGMENT_FEATURE_NAMES = tuple(
    ["z_stress", "z_rest", "z_change", "deficit_stress", "deficit_rest"]
    + ["extent_stress_1.5", "extent_stress_2.5", "extent_stress_3.5", "extent_rest_2.5"]
    + ["territory_z_stress", "study_z_sum_stress", "study_z_max_stress"]
    + [f"is_segment_{s}" for s in _SEG]
)


def _segment_stats(stress, rest, mean, sd, segments, ks) -> dict[str, np.ndarray]:
    """Per-segment means (B, 2, 17) of z, of z > k for each k, and of the relative deficit."""
    u = np.stack([np.asarray(stress, np.float32), np.asarray(rest, np.float32)], axis=1)
    mean = np.asarray(mean, np.float32)
    lv = np.asarray(segments) > 0
    z = np.where(lv, (mean - u) / np.asarray(sd, np.float32), 0.0)
    deficit = np.where(lv, (mean - u) / np.maximum(mean, 1e-3), 0.0)
    out = {"z": segment_means(z, segments), "deficit": segment_means(deficit, segments)}
    for k in ks:
        out[k] = segment_means((z > k).astype(np.float32), segments)
    tpd = 100.0 * np.where(z > FEATURE_K, np.clip(deficit, 0.0, 1.0), 0.0)
    out["tpd"] = tpd.reshape(*tpd.shape[:2], -1).sum(-1) / max(int(lv.sum()), 1)  # (B, 2)
    return out


def polar_features(stress, rest, mean, sd, segments) -> np.ndarray:
    """(B, len(POLAR_FEATURE_NAMES)) float32: a study's deviations from its normal limits.

    Args:
      stress, rest: (B, S, S) relative uptake; mean, sd: (B, 2, S, S) or (2, S, S) limits for
        the study's sex; segments: (S, S) AHA segment map.
    """
    st = _segment_stats(stress, rest, mean, sd, segments, (FEATURE_K,))
    z, extent = st["z"], st[FEATURE_K]  # (B, 2, 17)
    b = len(z)
    zpos = np.maximum(z, 0.0)
    territory = zpos @ territory_matrix().T  # (B, 2, 3)
    z_sum = zpos.sum(-1)  # (B, 2)
    glob = [st["tpd"], 100.0 * extent @ _segment_area_fractions(segments), z_sum, z.max(-1)]
    cols = [
        z.reshape(b, -1), extent.reshape(b, -1), st["deficit"].reshape(b, -1), z[:, 0] - z[:, 1],
        territory.reshape(b, -1), np.concatenate(glob, axis=1),
        np.maximum(z[:, 0] - z[:, 1], 0.0).sum(-1, keepdims=True),
        ((z_sum[:, 1] + 1.0) / (z_sum[:, 0] + 1.0))[:, None],
        defect_persistence(stress, rest, mean, sd, segments),
        defect_reversal(stress, rest, mean, sd, segments),
    ]  # fmt: skip
    return np.concatenate(cols, axis=1).astype(np.float32)


def defect_persistence(stress, rest, mean, sd, segments) -> np.ndarray:
    """(B, 4) float32: how much of the stress defect is still there at rest, pixel by pixel.

    Infarcted muscle stays hypoperfused at rest, ischemic muscle recovers. The per-segment
    features compare segment means, which mixes a defect with its normal neighbours and with
    artefacts elsewhere; these compare the rest deficit with the stress deficit where the
    stress deficit is, about 1 for a fixed defect and about 0 for a reversible one. For the
    deficit below the normal mean (uptake units), then for the z-deficit:
      persistence     sum(s * r) / sum(s * s) over the LV (s, r: positive stress, rest deficits)
      persistence_core  sum(r) / sum(s) over the core of the stress defect (PERSISTENCE_CORE)
    """
    lv = np.asarray(segments) > 0
    u = np.stack([np.asarray(stress, np.float32), np.asarray(rest, np.float32)], axis=1)
    mean = np.broadcast_to(np.asarray(mean, np.float32), u.shape)
    sd = np.broadcast_to(np.asarray(sd, np.float32), u.shape)
    deficit = np.maximum(mean - u, 0.0)[..., lv]  # (B, 2, n_lv)
    out = []
    for d in (deficit, deficit / sd[..., lv]):
        s, r = d[:, 0], d[:, 1]
        out.append((s * r).sum(-1) / ((s * s).sum(-1) + 1e-6))
        core = s >= np.maximum(np.quantile(s, PERSISTENCE_CORE, axis=-1, keepdims=True), 1e-6)
        out.append((r * core).sum(-1) / ((s * core).sum(-1) + 1e-6))
    return np.stack(out, axis=1).astype(np.float32)


# Where the stress defect is "healthy" enough to learn how rest differs from stress: z-deficit
# below this. The smoothing (in units of the map's size) averages out the pixel noise of a
# reconstruction before deficits are compared pixel by pixel.
REVERSAL_HEALTHY_Z = 2.0
REVERSAL_SMOOTH = 1.0 / 64.0


def defect_reversal(stress, rest, mean, sd, segments) -> np.ndarray:
    """(B, 6) float32: where and in what shape the stress defect is still there at rest.

    An ischemic defect recovers at rest in proportion: its rest deficit is the stress deficit
    scaled down, the same shape. An infarct keeps most of its depth, and with peri-infarct
    ischemia only its core stays: the stress defect is wider than the rest defect. Mean
    ratios (`defect_persistence`) mix the two patterns, so these compare shape:

    1. How rest differs from stress on the healthy pixels (z-deficit < REVERSAL_HEALTHY_Z),
       rest - stress ~ b + c r cos(angle) + d r sin(angle) by least squares: the two
       acquisitions' own offset and tilt. What rest has above stress beyond that is the
       reversal e. The study's own pattern (attenuation, apical thinning) is in both maps, so
       it cancels here, which the normal limits cannot do. (A free scale on stress, fitted
       too, can absorb a defect's tails as if rest were stress scaled down: on a flat map it
       explains an ischemic defect away. Out of fold it was also worse.)
    2. Stress deficit s = max(mean_stress - stress, 0) over the LV; rest deficit
       r = max(s - e, 0); both smoothed (Gaussian, REVERSAL_SMOOTH of the map's size).
    3. core       sum r / sum s over the core (s >= 0.8 max s)
       rim        sum r / sum s over the rim (0.3 max s <= s < 0.6 max s)
       core_minus_rim   a fixed core inside a reversible rim; about 0 for a scaled defect
       area       area(r >= max r / 2) / (area(s >= max s / 2) + 1)
       correlation      Pearson correlation of r and s over the LV
       peak       max r / max s
    On 240 abnormal clinical-difficulty training studies, ischemia vs infarction out of fold
    went from 0.925 to 0.971 accurate with these (docs/perfusion_clinical.md).
    """
    lv = np.asarray(segments) > 0
    size = lv.shape[-1]
    stress = np.asarray(stress, np.float32)
    rest = np.asarray(rest, np.float32)
    mean = np.broadcast_to(np.asarray(mean, np.float32), (len(stress), 2, size, size))
    sd = np.broadcast_to(np.asarray(sd, np.float32), mean.shape)
    radius, angle = polar_coords(size)
    s_lv, r_lv = stress[:, lv], rest[:, lv]
    tilt = [radius[lv] * np.cos(np.radians(angle[lv])), radius[lv] * np.sin(np.radians(angle[lv]))]
    design = np.stack([np.ones_like(tilt[0]), *tilt], axis=-1)  # (P, 3)
    healthy = (((mean[:, 0] - stress) / sd[:, 0])[:, lv] < REVERSAL_HEALTHY_Z).astype(np.float32)
    gram = np.einsum("pk,bp,pl->bkl", design, healthy, design) + 1e-6 * np.eye(3)
    coef = np.linalg.solve(gram, np.einsum("pk,bp,bp->bk", design, healthy, r_lv - s_lv)[..., None])
    reversal = r_lv - s_lv - coef[..., 0] @ design.T
    s_def = np.maximum(mean[:, 0][:, lv] - s_lv, 0.0)
    r_def = np.maximum(s_def - reversal, 0.0)
    s_def, r_def = (_smooth_lv(d, lv, REVERSAL_SMOOTH * size) for d in (s_def, r_def))
    s_max = s_def.max(-1, keepdims=True) + 1e-6
    r_max = r_def.max(-1, keepdims=True) + 1e-6
    core = s_def >= 0.8 * s_max
    rim = (s_def >= 0.3 * s_max) & (s_def < 0.6 * s_max)

    def ratio(region):
        return (r_def * region).sum(-1) / ((s_def * region).sum(-1) + 1e-6)

    area = (r_def >= 0.5 * r_max).sum(-1) / ((s_def >= 0.5 * s_max).sum(-1) + 1.0)
    sc = s_def - s_def.mean(-1, keepdims=True)
    rc = r_def - r_def.mean(-1, keepdims=True)
    correlation = (sc * rc).sum(-1) / np.sqrt((sc * sc).sum(-1) * (rc * rc).sum(-1) + 1e-9)
    cols = [ratio(core), ratio(rim), ratio(core) - ratio(rim), area, correlation,
            r_max[:, 0] / s_max[:, 0]]  # fmt: skip
    return np.stack(cols, axis=1).astype(np.float32)


def _smooth_lv(values, lv, sigma: float) -> np.ndarray:
    """(B, P) LV pixel values Gaussian-smoothed on the (S, S) grid (zero outside the LV and the
    grid), as two matrix products with the 1-D kernel matrix (separable; no image library)."""
    size = lv.shape[-1]
    offset = np.arange(-size + 1, size, dtype=np.float64)
    weights = np.exp(-0.5 * (offset / sigma) ** 2)
    x = np.arange(size)
    kernel = (weights[x[:, None] - x[None, :] + size - 1] / weights.sum()).astype(np.float32)
    grid = np.zeros((len(values), size, size), np.float32)
    grid[:, lv] = values
    # The kernel is symmetric: smooth the rows, transpose, smooth the rows again, each one
    # 2-D matrix product (a stacked product with a transposed view runs ~100x slower).
    for _ in range(2):
        grid = (grid.reshape(-1, size) @ kernel).reshape(grid.shape).transpose(0, 2, 1)
    return grid[:, lv]


def segment_features(stress, rest, mean, sd, segments) -> np.ndarray:
    """(B, 17, len(SEGMENT_FEATURE_NAMES)) float32: each segment's deviations and context."""
    st = _segment_stats(stress, rest, mean, sd, segments, (1.5, 2.5, 3.5))
    z = st["z"]
    b = len(z)
    zpos = np.maximum(z[:, 0], 0.0)  # (B, 17)
    membership = territory_matrix()  # (3, 17)
    own_territory = (zpos @ membership.T)[:, np.argmax(membership, axis=0)]  # (B, 17)
    per_segment = [
        z[:, 0], z[:, 1], z[:, 0] - z[:, 1], st["deficit"][:, 0], st["deficit"][:, 1],
        st[1.5][:, 0], st[2.5][:, 0], st[3.5][:, 0], st[2.5][:, 1], own_territory,
        np.repeat(zpos.sum(-1, keepdims=True), NUM_SEGMENTS, 1),
        np.repeat(z[:, 0].max(-1, keepdims=True), NUM_SEGMENTS, 1),
    ]  # fmt: skip
    identity = np.broadcast_to(np.eye(NUM_SEGMENTS, dtype=np.float32), (b, NUM_SEGMENTS, 17))
    return np.concatenate([np.stack(per_segment, -1), identity], axis=-1).astype(np.float32)


def _segment_area_fractions(segments) -> np.ndarray:
    """(17,) share of the LV's pixels in each segment."""
    counts = segment_onehot(segments).sum(axis=0)
    return counts / max(counts.sum(), 1.0)
