"""Polar-map simulator: normal variation, ischemia and infarction, rendered like an export.

Uptake is relative (hottest pixel = 1) on the canonical grid of perfusion.geometry. A defect is
a smooth partial territory: an angular window inside one coronary territory times a radial
window from the base towards the apex, its depth graded. Ischemia: the stress defect largely
recovers at rest; infarction: the defect is fixed.
"""

from __future__ import annotations

import csv
import dataclasses
import os

import cv2
import numpy as np

from perfusion import colormaps, geometry
from tavr_jax.fileio import atomic_write_with

LABELS = ("normal", "ischemia", "infarction")
# A pixel is in the true defect mask when its uptake is reduced by at least this much
# (absolute, relative to the hottest pixel); a segment is involved when at least
# SEGMENT_FRACTION of its area is in the stress mask.
DEFECT_THRESHOLD = 0.15
SEGMENT_FRACTION = 0.3
# Angular centre and half-span (deg) of each territory on the bull's-eye (anterior 90 deg,
# septal 180, inferior 270, lateral 0): where a partial-territory defect is centred.
_TERRITORY_ANGLES = {"LAD": (125.0, 60.0), "RCA": (255.0, 45.0), "LCX": (10.0, 50.0)}


@dataclasses.dataclass
class SimulatedStudy:
    """Ground truth of one simulated study on the canonical (S, S) grid."""

    label: str
    sex: str
    stress: np.ndarray  # (S, S) float32 uptake 0-1, 0 outside the disk
    rest: np.ndarray
    stress_defect: np.ndarray  # (S, S) bool true defect masks
    rest_defect: np.ndarray
    territories: tuple[str, ...]
    segments: tuple[int, ...]  # AHA segments with a stress defect


def _angle_diff(a, b):
    return (a - b + 180.0) % 360.0 - 180.0


def _smooth_step(x, edge, width):
    """0 below edge - width, 1 above edge + width, a logistic ramp between."""
    return 1.0 / (1.0 + np.exp(-(x - edge) / max(width, 1e-6) * 4.0))


def _normal_pattern(rng, size: int, sex: str) -> np.ndarray:
    """Uptake of a normal heart before noise: apical thinning, attenuation, smooth variation."""
    r, a = geometry.polar_coords(size)
    u = np.full((size, size), rng.uniform(0.82, 0.92))
    u -= rng.uniform(0.04, 0.14) * np.exp(-((r / rng.uniform(0.25, 0.4)) ** 2))  # apical thinning
    # basal septum (membranous part) and the base fall off a little
    u -= (
        rng.uniform(0.03, 0.1)
        * np.exp(-((_angle_diff(a, 180) / 40) ** 2))
        * _smooth_step(r, 0.85, 0.1)
    )
    u -= rng.uniform(0.0, 0.05) * _smooth_step(r, 0.9, 0.08)
    if sex == "M":  # diaphragmatic attenuation: inferior wall
        depth, centre = rng.uniform(0.04, 0.2), 270 + rng.normal(0, 10)
    else:  # breast attenuation: anterior wall, sometimes shifted
        depth, centre = rng.uniform(0.04, 0.2), 90 + rng.normal(0, 20)
    width = rng.uniform(30, 55)
    u -= depth * np.exp(-((_angle_diff(a, centre) / width) ** 2)) * (0.4 + 0.6 * r)
    # low-frequency patient-to-patient variation
    for k in (1, 2, 3):
        u += rng.normal(0, 0.02 / k) * np.cos(np.radians(k * a) + rng.uniform(0, 2 * np.pi)) * r
    u += rng.uniform(0.0, 0.05) * np.cos(np.radians(a))  # lateral wall often a bit hotter
    return u


def _defect_field(rng, size: int, territory: str) -> np.ndarray:
    """(S, S) in 0-1: a smooth partial-territory defect shape (1 = full depth)."""
    r, a = geometry.polar_coords(size)
    centre, span = _TERRITORY_ANGLES[territory]
    c = centre + rng.uniform(-0.35, 0.35) * span
    half = rng.uniform(0.25, 0.8) * span
    soft = rng.uniform(6.0, 15.0)
    angular = _smooth_step(half - np.abs(_angle_diff(a, c)), 0.0, soft)
    inner = rng.uniform(0.0, 0.55) if territory == "LAD" else rng.uniform(0.2, 0.7)
    outer = rng.uniform(0.85, 1.1)
    radial = _smooth_step(r, inner, 0.15) * _smooth_step(outer - r, 0.0, 0.1)
    field = angular * radial
    if territory == "LAD" and inner < 0.25:  # LAD defects reaching the apex take the apex whole
        field = np.maximum(field, _smooth_step(0.25 - r, 0.0, 0.15))
    # keep the defect inside its territory, with a soft (not cut) boundary
    terr = geometry.territory_map(size) == 1 + geometry.TERRITORY_NAMES.index(territory)
    terr = cv2.GaussianBlur(terr.astype(np.float32), (0, 0), sigmaX=size / 15)
    field = field * np.clip(terr * 1.5, 0.0, 1.0)
    # perfusion falls off gradually at a defect border
    return cv2.GaussianBlur(field.astype(np.float32), (0, 0), sigmaX=size / 40)


def _finish(u, rng, size: int, noise: float) -> np.ndarray:
    """Noise, smoothing (the reconstruction filter), normalisation to the hottest pixel."""
    mask = geometry.disk_mask(size)
    u = u + rng.normal(0.0, noise, u.shape)
    u = cv2.GaussianBlur(u.astype(np.float32), (0, 0), sigmaX=size / 100)
    u = np.clip(u / np.percentile(u[mask], 99.5), 0.0, 1.0)
    return np.where(mask, u, 0.0).astype(np.float32)


def _segment_fractions(defect: np.ndarray) -> np.ndarray:
    """(17,) fraction of each AHA segment's area inside a (S, S) bool mask."""
    seg = geometry.segment_map(defect.shape[0])
    area = np.bincount(seg.ravel(), minlength=18)[1:]
    return np.bincount(seg[defect & (seg > 0)], minlength=18)[1:] / np.maximum(area, 1)


def simulate_study(
    rng: np.random.Generator,
    size: int = 128,
    *,
    label: str | None = None,
    sex: str | None = None,
    territories=None,
) -> SimulatedStudy:
    """One study's ground truth: canonical stress/rest uptake maps, defect masks, segments."""
    label = label or LABELS[rng.integers(3)]
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; expected one of {LABELS}")
    sex = sex or ("M" if rng.random() < 0.5 else "F")
    base = _normal_pattern(rng, size, sex)
    stress_drop = np.zeros((size, size))
    rest_drop = np.zeros((size, size))
    if label != "normal":
        if territories is None:
            k = 1 if rng.random() < 0.7 else 2
            territories = rng.choice(geometry.TERRITORY_NAMES, size=k, replace=False)
        territories = tuple(t for t in geometry.TERRITORY_NAMES if t in set(territories))
        for t in territories:
            # redraw a defect too small or too shallow to involve any segment, so every
            # labelled territory shows in the segments
            for _ in range(20):
                field = _defect_field(rng, size, t)
                depth = rng.uniform(0.2, 0.65)  # graded severity: mild to severe
                if _segment_fractions(depth * field >= DEFECT_THRESHOLD).max() >= SEGMENT_FRACTION:
                    break
            # ischemia recovers most of the way at rest; infarction stays (nearly) fixed
            rest_frac = rng.uniform(0.0, 0.4) if label == "ischemia" else rng.uniform(0.7, 1.0)
            stress_drop = np.maximum(stress_drop, depth * field)
            rest_drop = np.maximum(rest_drop, rest_frac * depth * field)
    else:
        territories = ()
    noise = rng.uniform(0.02, 0.06)
    variation = rng.normal(0.0, 0.025, 3)  # stress and rest differ a little in shape
    r, a = geometry.polar_coords(size)
    wobble = variation[0] * np.cos(np.radians(a) + variation[1] * 50) * r
    stress = _finish(base - stress_drop, rng, size, noise)
    rest = _finish(base + wobble - rest_drop, rng, size, noise)
    mask = geometry.disk_mask(size)
    stress_defect = (stress_drop >= DEFECT_THRESHOLD) & mask
    rest_defect = (rest_drop >= DEFECT_THRESHOLD) & mask
    frac = _segment_fractions(stress_defect)
    segments = tuple(int(s) + 1 for s in np.flatnonzero(frac >= SEGMENT_FRACTION))
    # territories: those given a defect, plus any a defect spilled over into a whole segment
    involved = set(territories) | set(geometry.segments_to_territories(segments))
    territories = tuple(t for t in geometry.TERRITORY_NAMES if t in involved)
    return SimulatedStudy(
        label, sex, stress, rest, stress_defect, rest_defect, territories, segments
    )


def render_study_image(
    stress: np.ndarray,
    rest: np.ndarray,
    *,
    colormap="spectrum",
    disk_px: int = 200,
    rng: np.random.Generator | None = None,
    colorbar: bool = True,
    text: bool = True,
) -> np.ndarray:
    """An export-like RGB image: stress disk left, rest right, labels and a colour bar."""
    rng = rng or np.random.default_rng(0)
    margin, gap, top = 30, int(rng.integers(30, 60)), 50
    bar_w = 18
    width = margin * 2 + disk_px * 2 + gap + (60 + bar_w if colorbar else 0)
    height = top + disk_px + margin
    bg = int(rng.integers(0, 25))
    image = np.full((height, width, 3), bg, np.uint8)
    yy, xx = np.mgrid[:disk_px, :disk_px]
    rr = np.hypot(xx + 0.5 - disk_px / 2, yy + 0.5 - disk_px / 2) / (disk_px / 2)
    alpha = np.clip((1.0 - rr) * disk_px / 2 + 0.5, 0.0, 1.0)[..., None]  # anti-aliased rim
    for i, (u, title) in enumerate(((stress, "STRESS"), (rest, "REST"))):
        up = cv2.resize(u.astype(np.float32), (disk_px, disk_px), interpolation=cv2.INTER_LINEAR)
        rgb = colormaps.uptake_to_rgb(up, colormap).astype(np.float32)
        x0 = margin + i * (disk_px + gap)
        tile = image[top : top + disk_px, x0 : x0 + disk_px].astype(np.float32)
        image[top : top + disk_px, x0 : x0 + disk_px] = np.round(alpha * rgb + (1 - alpha) * tile)
        if text:
            cv2.putText(
                image,
                title,
                (x0 + disk_px // 2 - 45, top - 15),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.8,
                (230, 230, 230),
                2,
                cv2.LINE_AA,
            )
    if colorbar:
        bx = margin + 2 * disk_px + gap + 25
        ramp = np.linspace(1.0, 0.0, disk_px)[:, None].repeat(bar_w, 1)  # high at the top
        image[top : top + disk_px, bx : bx + bar_w] = colormaps.uptake_to_rgb(ramp, colormap)
        if text:
            for val, y in (("100%", top + 8), ("0%", top + disk_px)):
                cv2.putText(
                    image,
                    val,
                    (bx + bar_w + 4, y),
                    cv2.FONT_HERSHEY_SIMPLEX,
                    0.35,
                    (230, 230, 230),
                    1,
                    cv2.LINE_AA,
                )
    return image


def _write_png(path: str, image: np.ndarray) -> None:
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    atomic_write_with(path, lambda p: cv2.imwrite(p, bgr))


def _write_masks(path: str, sim: SimulatedStudy) -> None:
    def write(p):
        with open(p, "wb") as f:
            np.savez_compressed(
                f,
                stress=sim.stress_defect,
                rest=sim.rest_defect,
                stress_uptake=sim.stress,
                rest_uptake=sim.rest,
            )

    atomic_write_with(path, write)


def simulate_dataset(
    out,
    n: int,
    seed: int,
    *,
    size: int = 128,
    colormap="spectrum",
    disk_px: int = 200,
    progress: bool = False,
) -> list[SimulatedStudy]:
    """Write a study folder: images/<id>.png, masks/<id>.npz, labels.csv (with sex). Balanced."""
    out = os.fspath(out)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    os.makedirs(os.path.join(out, "masks"), exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = [LABELS[i % 3] for i in range(n)]
    rng.shuffle(labels)
    rows = [("filename", "label", "territories", "segments", "sex")]
    studies = []
    items = range(n)
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="simulating", unit="study")
    for i in items:
        srng = np.random.default_rng([seed, i])  # per-study stream: any study can be redone alone
        sim = simulate_study(srng, size, label=labels[i])
        name = f"study_{i:04d}.png"
        image = render_study_image(
            sim.stress, sim.rest, colormap=colormap, disk_px=disk_px, rng=srng
        )
        _write_png(os.path.join(out, "images", name), image)
        _write_masks(os.path.join(out, "masks", name.replace(".png", ".npz")), sim)
        rows.append(
            (name, sim.label, "+".join(sim.territories), "+".join(map(str, sim.segments)), sim.sex)
        )
        studies.append(sim)

    def write_csv(p):
        with open(p, "w", newline="") as f:
            csv.writer(f).writerows(rows)

    atomic_write_with(os.path.join(out, "labels.csv"), write_csv)
    return studies
