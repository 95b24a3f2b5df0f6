"""Guidance readouts from tracked keypoints: the numbers the operator acts on during a TAVR.

- Implantation depth per side: the signed perpendicular distance from each corner of the valve
  frame's inflow edge (FE1, FE2) to the annular line AA1-AA2, positive toward the ventricle.
- Coaxiality: the angle (0..90 degrees) between the inflow edge FE1-FE2 and the annular line.
- The annulus between contrast injections: it shows only while contrast fills the root, so the
  annular line of the last injection is carried forward with the pigtail tip (PT, which sits in
  a cusp and moves with the root) for up to `carry_max_s`: the hinge points' offsets from PT,
  averaged over the injection's frames (inverse-variance weights), placed at PT's position now.
- The deployment stage, from the groups in view and where the delivery catheter is.

Which side is the ventricle: it is decided per frame from anatomy, never from the image axes
alone, so mirrored and rotated views read the same. A point known to lie on the aortic side of
the annulus gives it; the first reported one of, in this order (most robust first):
  STJ1/STJ2 (their mean): the sinotubular junction, 16-22 mm above the annulus;
  CD, CM, CP: the delivery catheter's capsule end, shaft middle and entry come down the aorta
              (not CT: the nose cone crosses into the ventricle);
  PT: the pigtail tip lies in a cusp, a few mm above the annulus;
a candidate closer to the annular line than `REFERENCE_MIN_OFFSET` annulus lengths is skipped
(it could be on either side within the points' error). With none, the tracker keeps the side it
last decided; with no history at all the image convention of aortography is used: the ventricle
is below the annulus (+y, image y points down).

Uncertainty: each point's positional sd is s_i = max(spread_i, MIN_SPREAD_PX) / clip(p_i, 0.05,
1) (spread from the tracker, DEFAULT_SPREAD_PX when unknown; a point seen at probability 0.5
counts twice as uncertain). With t the position of the FE corner's foot along AA1 -> AA2,
first-order propagation through the perpendicular distance gives
  sd(depth)^2 = s_FE^2 + (1 - t)^2 s_AA1^2 + t^2 s_AA2^2
(moving a hinge point along the line does not move the line). A carried annulus adds, per hinge
point, the pigtail's sd now and when the annulus was seen, and a drift of CARRY_DRIFT_PER_S
annulus lengths per second of carry (the root also rotates and deforms, which PT misses).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from tavr_jax.data.simulate.truth import GUIDANCE_TRUTH_FILE
from tavr_jax.schema import KeypointSchema

STAGES = ("positioning", "deploying", "deployed")
SIDES = ("FE1", "FE2")
REQUIRED_POINTS = ("AA1", "AA2", "FE1", "FE2")
AORTIC_REFERENCES = (("STJ1", "STJ2"), ("CD",), ("CM",), ("CP",), ("PT",))
REFERENCE_MIN_OFFSET = 0.15  # annulus lengths off the line for a side reference to count
DEFAULT_SPREAD_PX = 2.0  # positional sd of a point when the tracker gives none
MIN_SPREAD_PX = 0.5  # a fresh tracker reports ~0 spread; no point is known better than this
MIN_PROBABILITY = 0.05
CARRY_DRIFT_PER_S = 0.02  # annulus lengths per second: ~0.5 mm/s for a 24-mm annulus

__all__ = [
    "GUIDANCE_TRUTH_FILE",
    "STAGES",
    "GuidanceTracker",
    "coaxiality_deg",
    "depth_sd",
    "implantation_depths",
    "read_truth",
    "score_readouts",
    "signed_depth",
    "ventricle_normal",
]


# ----------------------------------------------------------------------------------------------
# Geometry: vectorised over leading axes; NaN in, NaN out.


def _xy(points, what: str) -> np.ndarray:
    a = np.asarray(points, np.float64)
    if a.ndim == 0 or a.shape[-1] != 2:
        raise ValueError(f"{what} must be (..., 2) (x, y) pixels, got shape {a.shape}")
    return a


def ventricle_normal(aa1, aa2, aortic_point=None, prior_normal=None) -> np.ndarray:
    """(..., 2) unit normal of the annular line AA1-AA2 that points toward the ventricle.

    `aortic_point` (..., 2) lies on the aortic side (NaN: unknown); where it is unknown the
    normal is oriented like `prior_normal` (..., 2) if given, else toward +y (image down).
    NaN where AA1 and AA2 coincide or are missing.
    """
    a1, a2 = _xy(aa1, "AA1"), _xy(aa2, "AA2")
    d = a2 - a1
    length = np.hypot(d[..., 0], d[..., 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        n = np.stack([-d[..., 1], d[..., 0]], axis=-1) / length[..., None]
    n = np.where((length > 0)[..., None], n, np.nan)
    fallback = np.broadcast_to(np.array([0.0, 1.0]), n.shape)
    if prior_normal is not None:
        prior = _xy(prior_normal, "prior_normal")
        fallback = np.where(np.isfinite(prior).all(-1, keepdims=True), prior, fallback)
    side = np.sum(n * fallback, axis=-1)
    # a vertical annulus in the image convention: no up or down to choose; +x, arbitrary
    side = np.where(side == 0, n[..., 0], side)
    if aortic_point is not None:
        ref = _xy(aortic_point, "aortic point")
        toward_aorta = np.sum(n * (ref - 0.5 * (a1 + a2)), axis=-1)
        side = np.where(np.isfinite(toward_aorta) & (toward_aorta != 0), -toward_aorta, side)
    return np.where((side < 0)[..., None], -n, n)


def signed_depth(aa1, aa2, point, normal=None) -> np.ndarray:
    """(...) signed perpendicular distance of `point` from the line AA1-AA2, positive along
    `normal` (from `ventricle_normal`; None: its image convention, toward +y)."""
    if normal is None:
        normal = ventricle_normal(aa1, aa2)
    return np.sum((_xy(point, "point") - _xy(aa1, "AA1")) * _xy(normal, "normal"), axis=-1)


def depth_sd(aa1, aa2, point, sd_aa1, sd_aa2, sd_point) -> np.ndarray:
    """(...) first-order sd of `signed_depth` from isotropic positional sds of the three points.

    sd^2 = sd_point^2 + (1 - t)^2 sd_aa1^2 + t^2 sd_aa2^2, t the foot of `point` along AA1 -> AA2.
    """
    a1, a2, p = _xy(aa1, "AA1"), _xy(aa2, "AA2"), _xy(point, "point")
    d = a2 - a1
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.sum((p - a1) * d, axis=-1) / np.sum(d * d, axis=-1)
    s1, s2, sp = (np.asarray(s, np.float64) for s in (sd_aa1, sd_aa2, sd_point))
    return np.sqrt(sp**2 + (1.0 - t) ** 2 * s1**2 + t**2 * s2**2)


def coaxiality_deg(fe1, fe2, aa1, aa2) -> np.ndarray:
    """(...) angle in degrees, 0..90, between the lines FE1-FE2 and AA1-AA2 (NaN if degenerate)."""
    u = _xy(fe2, "FE2") - _xy(fe1, "FE1")
    v = _xy(aa2, "AA2") - _xy(aa1, "AA1")
    cross = np.abs(u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0])
    dot = np.abs(np.sum(u * v, axis=-1))
    degenerate = (np.linalg.norm(u, axis=-1) == 0) | (np.linalg.norm(v, axis=-1) == 0)
    return np.where(degenerate, np.nan, np.degrees(np.arctan2(cross, dot)))


def _aortic_reference(points: Mapping[str, np.ndarray | None], aa1, aa2) -> np.ndarray | None:
    """The first usable aortic-side point of `AORTIC_REFERENCES` (module docstring), or None."""
    a1, a2 = np.asarray(aa1, np.float64), np.asarray(aa2, np.float64)
    length = float(np.hypot(*(a2 - a1)))
    n = np.array([a1[1] - a2[1], a2[0] - a1[0]]) / length
    for names in AORTIC_REFERENCES:
        seen = [points[k] for k in names if points.get(k) is not None]
        if not seen:
            continue
        ref = np.mean(seen, axis=0)
        if abs(float(np.dot(ref - 0.5 * (a1 + a2), n))) >= REFERENCE_MIN_OFFSET * length:
            return ref
    return None


def implantation_depths(
    points: Mapping[str, Sequence[float] | np.ndarray | None], *, mm_per_px: float | None = None
) -> dict[str, float | None]:
    """{"FE1": depth | None, "FE2": ...} of one frame's points (name -> (x, y), None: missing).

    Pixels, or mm with `mm_per_px`; the ventricle side as the module docstring says (with no
    history: image down when no aortic-side point is given).
    """
    spacing = _spacing(mm_per_px, "mm_per_px")
    pts = {k: None if v is None else _xy(v, k) for k, v in points.items()}
    aa1, aa2 = pts.get("AA1"), pts.get("AA2")
    out: dict[str, float | None] = dict.fromkeys(SIDES)
    if aa1 is None or aa2 is None or np.array_equal(aa1, aa2):
        return out
    normal = ventricle_normal(aa1, aa2, _aortic_reference(pts, aa1, aa2))
    for side in SIDES:
        if pts.get(side) is not None:
            out[side] = float(signed_depth(aa1, aa2, pts[side], normal)) * (spacing or 1.0)
    return out


def _spacing(value, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise ValueError(f"{what} must be a positive number of mm per pixel, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a positive number of mm per pixel, got {value!r}")
    return float(value)


def _target(value, what: str = "target_depth_mm") -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be (low, high) in mm, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"{what} must be finite (low, high) with low <= high, got {value!r}")
    return lo, hi


def _round(x, digits: int = 3) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


# ----------------------------------------------------------------------------------------------
# The per-stream tracker


class GuidanceTracker:
    """Guidance readouts of one stream, one `update` per processed frame (module docstring).

    `mm_per_px`: frame spacing (a frame's own overrides it); without one the readouts are in
    pixels (`depth_px`) and the target is not checked. `target_depth_mm` = (low, high): a side
    out of it raises an alert. `carry_max_s`: how long a carried annulus lives. `stage_prior`:
    one of `STAGES`, reported instead of the inferred stage.
    """

    def __init__(
        self,
        schema: KeypointSchema,
        *,
        mm_per_px: float | None = None,
        target_depth_mm: tuple[float, float] | None = None,
        carry_max_s: float = 8.0,
        stage_prior: str | None = None,
    ):
        missing = [n for n in REQUIRED_POINTS if n not in schema.point_names]
        if missing:
            raise ValueError(
                f"guidance needs points {', '.join(missing)}, not in schema {schema.name!r}"
            )
        if stage_prior is not None and stage_prior not in STAGES:
            raise ValueError(f"stage_prior must be one of {', '.join(STAGES)}, got {stage_prior!r}")
        if not (isinstance(carry_max_s, int | float) and carry_max_s >= 0):
            raise ValueError(f"carry_max_s must be a number of seconds >= 0, got {carry_max_s!r}")
        self.schema = schema
        self.mm_per_px = _spacing(mm_per_px, "mm_per_px")
        self.target_depth_mm = _target(target_depth_mm)
        self.carry_max_s = float(carry_max_s)
        self.stage_prior = stage_prior
        self._index = {n: i for i, n in enumerate(schema.point_names)}
        self.reset()

    def reset(self) -> None:
        """Forgets the stream: the last annulus seen, the ventricle side, the clock."""
        self._seen: dict | None = None  # the annulus when last seen, to carry
        self._seen_run = False  # whether the previous frame saw the annulus
        self._normal: np.ndarray | None = None  # ventricle side last decided
        self._had_annulus = False
        self._last_time: float | None = None

    def _inputs(self, coords, probability, reported, spread_px):
        k = self.schema.num_points
        coords = np.asarray(coords, np.float64)
        probability = np.asarray(probability, np.float64)
        reported = np.asarray(reported)
        if coords.shape != (k, 2) or probability.shape != (k,) or reported.shape != (k,):
            raise ValueError(
                f"expected coords ({k}, 2), probability ({k},), reported ({k},); got "
                f"{coords.shape}, {probability.shape}, {reported.shape}"
            )
        spread = np.full(k, DEFAULT_SPREAD_PX)
        if spread_px is not None:
            spread = np.asarray(spread_px, np.float64)
            if spread.shape != (k,):
                raise ValueError(f"spread_px must be ({k},), got {spread.shape}")
            spread = np.where(np.isfinite(spread) & (spread >= 0), spread, DEFAULT_SPREAD_PX)
        on = reported.astype(bool) & np.isfinite(coords).all(axis=1)
        p = np.clip(np.nan_to_num(probability, nan=0.0), MIN_PROBABILITY, 1.0)
        sd = np.maximum(spread, MIN_SPREAD_PX) / p
        pts = {n: coords[i] if on[i] else None for n, i in self._index.items()}
        sds = {n: float(sd[i]) for n, i in self._index.items()}
        return pts, sds

    def _annulus(self, time_s: float, pts: dict, sds: dict):
        """(aa1, aa2, sd_aa1, sd_aa2, normal, "seen" | "carried", age) or None."""
        aa1, aa2 = pts["AA1"], pts["AA2"]
        if aa1 is not None and aa2 is not None and not np.array_equal(aa1, aa2):
            ref = _aortic_reference(pts, aa1, aa2)
            normal = ventricle_normal(aa1, aa2, ref, self._normal)
            self._remember(time_s, pts, sds, normal)
            return aa1, aa2, sds["AA1"], sds["AA2"], normal, "seen", 0.0
        self._seen_run = False
        seen = self._seen
        if seen is None:
            return None
        age = time_s - seen["time"]
        pt = pts.get("PT")
        if seen["weight"] is None or pt is None or age > self.carry_max_s:
            self._seen = None  # gone for good: it only comes back seen
            return None
        # The hinge points where the injection put them relative to the pigtail, averaged over
        # its frames (one frame's points at the end of a washing-out injection are the
        # noisiest), moved with the pigtail now.
        offsets = seen["sum"] / seen["weight"][:, None]
        a1, a2 = pt + offsets[0], pt + offsets[1]
        length = float(np.hypot(*(a2 - a1)))
        drift = CARRY_DRIFT_PER_S * length * age
        extra = sds["PT"] ** 2 + drift**2
        s1, s2 = (math.sqrt(1.0 / w + extra) for w in seen["weight"])
        return a1, a2, s1, s2, seen["normal"], "carried", age

    def _remember(self, time_s: float, pts: dict, sds: dict, normal) -> None:
        """Adds a frame with the annulus in view to the running inverse-variance mean of the
        hinge points' offsets from the pigtail; a new injection starts a new mean."""
        run = self._seen if self._seen_run and self._seen is not None else None
        self._seen_run = True
        total = run["sum"] if run else np.zeros((2, 2))
        weight = run["weight"] if run else None
        pt = pts.get("PT")
        if pt is not None:
            var = np.array([sds["AA1"] ** 2, sds["AA2"] ** 2]) + sds["PT"] ** 2
            offsets = np.stack([pts["AA1"] - pt, pts["AA2"] - pt])
            total = total + offsets / var[:, None]
            weight = (0.0 if weight is None else weight) + 1.0 / var
        self._seen = dict(sum=total, weight=weight, normal=normal, time=time_s)

    def _stage(self, pts: dict, normal: np.ndarray | None) -> str:
        """positioning: no valve frame; deploying: the delivery catheter still crosses it;
        deployed: the frame is out and the catheter is gone or withdrawn above it."""
        fe = [pts[s] for s in SIDES if pts[s] is not None]
        if not fe:
            return "positioning"
        ct, cd = pts.get("CT"), pts.get("CD")
        if ct is None:
            # the capsule end alone is above the frame both while deploying and once the
            # nose cone is pulled back through it: keep the cautious answer
            return "deploying" if cd is not None else "deployed"
        if len(fe) == 2 and not np.array_equal(fe[0], fe[1]):
            # the nose cone (CT) below the inflow edge and the capsule end (CD) above it: the
            # catheter still runs through the frame. Needs no idea of which side is which.
            across = np.array([fe[0][1] - fe[1][1], fe[1][0] - fe[0][0]])
            if cd is not None:
                side_ct, side_cd = np.dot(ct - fe[0], across), np.dot(cd - fe[0], across)
                return "deploying" if side_ct * side_cd < 0 else "deployed"
        if normal is None:
            return "deploying"
        below = np.dot(ct - np.mean(fe, axis=0), normal)
        return "deploying" if below > 0 else "deployed"

    def update(
        self,
        time_s: float,
        coords: np.ndarray,
        probability: np.ndarray,
        reported: np.ndarray,
        spread_px: np.ndarray | None = None,
        mm_per_px: float | None = None,
    ) -> dict:
        """One frame's readouts (JSON-ready); see the module and class docstrings."""
        if isinstance(time_s, bool) or not isinstance(time_s, int | float | np.number):
            raise ValueError(f"time_s must be a number of seconds, got {time_s!r}")
        time_s = float(time_s)
        if not math.isfinite(time_s):
            raise ValueError(f"time_s must be finite, got {time_s!r}")
        spacing = _spacing(mm_per_px, "mm_per_px") or self.mm_per_px
        pts, sds = self._inputs(coords, probability, reported, spread_px)
        if self._last_time is not None and time_s < self._last_time:
            self.reset()  # the clock went back: a new series, nothing of the old one holds
        self._last_time = time_s
        annulus = self._annulus(time_s, pts, sds)
        scale = spacing or 1.0
        depth: dict[str, float | None] = dict.fromkeys(SIDES)
        sd: dict[str, float | None] = dict.fromkeys(SIDES)
        angle = None
        normal = self._normal
        if annulus is not None:
            a1, a2, s1, s2, normal, how, age = annulus
            self._normal, self._had_annulus = normal, True
            for side in SIDES:
                if pts[side] is not None:
                    depth[side] = _round(float(signed_depth(a1, a2, pts[side], normal)) * scale)
                    s = depth_sd(a1, a2, pts[side], s1, s2, sds[side])
                    sd[side] = _round(float(s) * scale)
            if pts["FE1"] is not None and pts["FE2"] is not None:
                angle = _round(float(coaxiality_deg(pts["FE1"], pts["FE2"], a1, a2)), 2)
        if self.stage_prior is not None:
            stage, stage_source = self.stage_prior, "prior"
        else:
            stage, stage_source = self._stage(pts, normal), "inferred"
        units = "mm" if spacing else "px"
        return {
            f"depth_{units}": depth,
            "depth_sd": sd,
            "angle_deg": angle,
            "annulus": None if annulus is None else annulus[5],
            "annulus_age_s": None if annulus is None else _round(annulus[6]),
            "stage": stage,
            "stage_source": stage_source,
            "alerts": self._alerts(depth, annulus is not None, pts, spacing is not None),
            "units": units,
            "calibrated": spacing is not None,
        }

    def _alerts(self, depth: dict, has_annulus: bool, pts: dict, calibrated: bool) -> list[str]:
        alerts = []
        target = self.target_depth_mm
        if target is not None and calibrated:
            lo, hi = target
            for side in SIDES:
                d = depth[side]
                if d is not None and not lo <= d <= hi:
                    how = "deeper" if d > hi else "shallower"
                    alerts.append(f"{side} depth {d:.1f} mm {how} than target {lo:g}-{hi:g} mm")
        elif target is not None and any(d is not None for d in depth.values()):
            alerts.append("no pixel spacing: depth target not checked")
        if not has_annulus and any(pts[s] is not None for s in SIDES):
            alerts.append("annulus lost" if self._had_annulus else "annulus not seen")
        return alerts


# ----------------------------------------------------------------------------------------------
# Truth and scoring


def read_truth(path: os.PathLike) -> dict[str, dict]:
    """A simulated project's true readouts: frame name -> record (`simulate.truth`).

    `path` is the JSON-lines file or the project folder holding `GUIDANCE_TRUTH_FILE`.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / GUIDANCE_TRUTH_FILE
    truth: dict[str, dict] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row["frame"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}:{number}: not a truth record with a 'frame'") from None
        if name in truth:
            raise ValueError(f"{path}:{number}: frame {name!r} appears twice")
        truth[name] = row
    return truth


def _lookup(truth: Mapping[str, dict], frame) -> dict | None:
    """The truth of a record's frame: its name as written, or a path ending in it."""
    if not isinstance(frame, str):
        return None
    name = frame.replace("\\", "/")
    if name in truth:
        return truth[name]
    parts = name.split("/")
    for i in range(1, len(parts)):
        hit = truth.get("/".join(parts[i:]))
        if hit is not None:
            return hit
    return None


def _summary(rows: list[tuple[dict, dict]], target) -> dict:
    errors = [abs(r["depth_mm"][s] - t["depth_mm"][s]) for r, t in rows for s in SIDES]
    angles = [
        abs(r["angle_deg"] - t["angle_deg"])
        for r, t in rows
        if r.get("angle_deg") is not None and t.get("angle_deg") is not None
    ]
    agree = None
    if target is not None and rows:
        lo, hi = target
        inside = lambda d: lo <= d <= hi  # noqa: E731
        same = [
            inside(r["depth_mm"][s]) == inside(t["depth_mm"][s]) for r, t in rows for s in SIDES
        ]
        agree = _round(float(np.mean(same)), 4)
    return {
        "n_frames": len(rows),
        "depth_mae_mm": _round(float(np.mean(errors)), 4) if errors else None,
        "range_agreement": agree,
        "angle_mae_deg": _round(float(np.mean(angles)), 4) if angles else None,
    }


def score_readouts(
    records: Sequence[Mapping], truth: Mapping[str, dict], *, target_depth_mm=None
) -> dict:
    """Readouts (one record per frame: "frame" name plus `GuidanceTracker.update`'s keys)
    against the simulator's truth (`read_truth`).

    Scored frames: both sides read in mm and both known in the truth. Per set (all scored
    frames; `seen`, those whose annulus was on the frame; `carried`, those whose annulus was
    carried forward with the pigtail): `n_frames`, `depth_mae_mm` (over sides),
    `range_agreement` (fraction of sides on the same side of `target_depth_mm` as the truth;
    None without a target), `angle_mae_deg`. `carried.coverage`: of the frames whose truth has
    a valve frame out and no contrast, the fraction read with a carried annulus.
    `unmatched_frames`: records whose frame the truth does not name.
    """
    target = _target(target_depth_mm)
    scored, seen, carried = [], [], []
    unmatched = no_contrast = covered = 0
    for record in records:
        t = _lookup(truth, record.get("frame"))
        if t is None:
            unmatched += 1
            continue
        true_depth = t.get("depth_mm") or {}
        known = all(true_depth.get(s) is not None for s in SIDES)
        read = record.get("depth_mm")
        both = isinstance(read, Mapping) and all(read.get(s) is not None for s in SIDES)
        is_carried = record.get("annulus") == "carried"
        if known and not t.get("contrast"):
            no_contrast += 1
            covered += both and is_carried
        if known and both:
            scored.append((record, t))
            (carried if is_carried else seen).append((record, t))
    return {
        **_summary(scored, target),
        "seen": _summary(seen, target),
        "carried": {
            **_summary(carried, target),
            "coverage": _round(covered / no_contrast, 4) if no_contrast else None,
        },
        "unmatched_frames": unmatched,
    }
