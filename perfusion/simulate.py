"""Polar-map simulator: normal variation, ischemia and infarction, rendered like an export.

Uptake is relative (hottest pixel = 1) on the canonical grid of perfusion.geometry. A defect is
a smooth partial territory: an angular window inside one coronary territory times a radial
window from the base towards the apex, its depth graded. Ischemia: the stress defect largely
recovers at rest; infarction: the defect is fixed, possibly with a reversible rim.

How hard the studies are is one `Difficulty` (presets `EASY` and `CLINICAL`): defect depth and
extent, attenuation strength by sex, noise, reversibility, and the share of normal studies.
"""

from __future__ import annotations

import csv
import dataclasses
import os

import cv2
import numpy as np

from cardiac_core.fileio import atomic_write_bytes, atomic_write_with
from perfusion import colormaps, exports, geometry

LABELS = ("normal", "ischemia", "infarction")
# A pixel is in the true defect mask when its uptake is reduced by at least this much
# (absolute, relative to the hottest pixel); a segment is involved when at least
# SEGMENT_FRACTION of its area is in the stress mask.
DEFECT_THRESHOLD = 0.15
SEGMENT_FRACTION = 0.3
# Angular centre and half-span (deg) of each territory on the bull's-eye (anterior 90 deg,
# septal 180, inferior 270, lateral 0): where a partial-territory defect is centred.
_TERRITORY_ANGLES = {"LAD": (125.0, 60.0), "RCA": (255.0, 45.0), "LCX": (10.0, 50.0)}


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """How hard the simulated studies are: every range is (low, high) of a uniform draw.

    `EASY` is the simulator as first written (large defects, balanced classes); `CLINICAL`
    follows a referred clinical population: mild and small defects, attenuation that mimics
    them, noisier maps, infarcts with peri-infarct ischemia, 60% normal studies.
    """

    depth: tuple[float, float] = (0.2, 0.65)  # uptake lost at a defect's core (of the hottest)
    span: tuple[float, float] = (0.25, 0.8)  # defect half-width, fraction of its territory's
    inner: tuple[float, float] = (0.2, 0.7)  # where a defect starts towards the base (radius)
    inner_lad: tuple[float, float] = (0.0, 0.55)  # LAD defects may reach the apex
    two_territories: float = 0.3  # probability of a second territory
    attenuation_m: tuple[float, float] = (0.04, 0.2)  # inferior (diaphragm), men
    attenuation_f: tuple[float, float] = (0.04, 0.2)  # anterior (breast), women
    noise: tuple[float, float] = (0.02, 0.06)  # pixel noise SD before the smoothing
    ischemia_rest: tuple[float, float] = (0.0, 0.4)  # of the stress depth still lost at rest
    infarction_rest: tuple[float, float] = (0.7, 1.0)
    peri_infarct: float = 0.0  # probability that an infarct has a reversible rim (mixed)
    normal_fraction: float | None = None  # None: the three labels in equal numbers
    # True defect mask: uptake reduced by at least this much (absolute); None = half the
    # defect's own depth, so mild defects have a mask too.
    mask_drop: float | None = DEFECT_THRESHOLD

    def label_counts(self, n: int) -> dict[str, int]:
        """Studies per label for a folder of n: exact numbers, not a random draw."""
        if self.normal_fraction is None:
            return {lab: len(range(i, n, 3)) for i, lab in enumerate(LABELS)}
        normal = int(round(n * self.normal_fraction))
        ischemia = (n - normal + 1) // 2
        return {"normal": normal, "ischemia": ischemia, "infarction": n - normal - ischemia}


EASY = Difficulty()
CLINICAL = Difficulty(
    depth=(0.14, 0.35),
    span=(0.2, 0.6),
    inner=(0.3, 0.75),
    inner_lad=(0.1, 0.6),
    two_territories=0.2,
    attenuation_m=(0.05, 0.22),
    attenuation_f=(0.03, 0.18),
    noise=(0.03, 0.07),
    ischemia_rest=(0.0, 0.5),
    infarction_rest=(0.6, 1.0),
    peri_infarct=0.5,
    normal_fraction=0.6,
    mask_drop=None,
)
DIFFICULTIES = {"easy": EASY, "clinical": CLINICAL}


def get_difficulty(name_or_difficulty) -> Difficulty:
    """A preset by name ("easy", "clinical") or a Difficulty as is."""
    if isinstance(name_or_difficulty, Difficulty):
        return name_or_difficulty
    if name_or_difficulty not in DIFFICULTIES:
        raise ValueError(
            f"unknown difficulty {name_or_difficulty!r}; expected one of {tuple(DIFFICULTIES)}"
        )
    return DIFFICULTIES[name_or_difficulty]


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
    depth: float = 0.0  # deepest defect's core depth (0 for a normal study)


def _angle_diff(a, b):
    return (a - b + 180.0) % 360.0 - 180.0


def _smooth_step(x, edge, width):
    """0 below edge - width, 1 above edge + width, a logistic ramp between."""
    return 1.0 / (1.0 + np.exp(-(x - edge) / max(width, 1e-6) * 4.0))


def _normal_pattern(rng, size: int, sex: str, difficulty: Difficulty = EASY) -> np.ndarray:
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
        depth, centre = rng.uniform(*difficulty.attenuation_m), 270 + rng.normal(0, 10)
    else:  # breast attenuation: anterior wall, sometimes shifted
        depth, centre = rng.uniform(*difficulty.attenuation_f), 90 + rng.normal(0, 20)
    width = rng.uniform(30, 55)
    u -= depth * np.exp(-((_angle_diff(a, centre) / width) ** 2)) * (0.4 + 0.6 * r)
    # low-frequency patient-to-patient variation
    for k in (1, 2, 3):
        u += rng.normal(0, 0.02 / k) * np.cos(np.radians(k * a) + rng.uniform(0, 2 * np.pi)) * r
    u += rng.uniform(0.0, 0.05) * np.cos(np.radians(a))  # lateral wall often a bit hotter
    return u


def _defect_shape(rng, territory: str, difficulty: Difficulty) -> dict:
    """Random parameters of a partial-territory defect (drawn once, drawn at any size)."""
    centre, span = _TERRITORY_ANGLES[territory]
    inner = difficulty.inner_lad if territory == "LAD" else difficulty.inner
    return dict(
        centre=centre + rng.uniform(-0.35, 0.35) * span,
        half=rng.uniform(*difficulty.span) * span,
        soft=rng.uniform(6.0, 15.0),
        inner=rng.uniform(*inner),
        outer=rng.uniform(0.85, 1.1),
    )


def _defect_field(size: int, territory: str, shape: dict, *, widen: float = 1.0) -> np.ndarray:
    """(S, S) in 0-1: a smooth partial-territory defect (1 = full depth).

    widen > 1 stretches the same defect wider and further towards the apex: the rim of
    peri-infarct ischemia around an infarct's core.
    """
    r, a = geometry.polar_coords(size)
    half = shape["half"] * widen
    angular = _smooth_step(half - np.abs(_angle_diff(a, shape["centre"])), 0.0, shape["soft"])
    inner = max(shape["inner"] - 0.3 * (widen - 1.0), 0.0)
    radial = _smooth_step(r, inner, 0.15) * _smooth_step(shape["outer"] - r, 0.0, 0.1)
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
    difficulty: Difficulty | str = EASY,
) -> SimulatedStudy:
    """One study's ground truth: canonical stress/rest uptake maps, defect masks, segments."""
    difficulty = get_difficulty(difficulty)
    label = label or LABELS[rng.integers(3)]
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; expected one of {LABELS}")
    sex = sex or ("M" if rng.random() < 0.5 else "F")
    base = _normal_pattern(rng, size, sex, difficulty)
    stress_drop = np.zeros((size, size))
    rest_drop = np.zeros((size, size))
    stress_defect = np.zeros((size, size), bool)
    rest_defect = np.zeros((size, size), bool)
    deepest = 0.0
    if label != "normal":
        if territories is None:
            k = 1 if rng.random() < 1.0 - difficulty.two_territories else 2
            territories = rng.choice(geometry.TERRITORY_NAMES, size=k, replace=False)
        territories = tuple(t for t in geometry.TERRITORY_NAMES if t in set(territories))
        for t in territories:
            # redraw a defect too small or too shallow to involve any segment, so every
            # labelled territory shows in the segments
            for _ in range(20):
                shape = _defect_shape(rng, t, difficulty)
                field = _defect_field(size, t, shape)
                depth = rng.uniform(*difficulty.depth)  # graded severity
                drop = difficulty.mask_drop if difficulty.mask_drop is not None else depth / 2
                if _segment_fractions(depth * field >= drop).max() >= SEGMENT_FRACTION:
                    break
            # ischemia recovers most of the way at rest; infarction stays (nearly) fixed
            rest_range = (
                difficulty.ischemia_rest if label == "ischemia" else difficulty.infarction_rest
            )
            stress_t = depth * field
            rest_t = rng.uniform(*rest_range) * stress_t
            if (
                label == "infarction"
                and difficulty.peri_infarct
                and (rng.random() < difficulty.peri_infarct)
            ):  # a reversible rim around the fixed core: stress wider than rest
                stress_t = np.maximum(stress_t, depth * _defect_field(size, t, shape, widen=1.5))
            stress_drop = np.maximum(stress_drop, stress_t)
            rest_drop = np.maximum(rest_drop, rest_t)
            stress_defect |= stress_t >= drop
            rest_defect |= rest_t >= drop
            deepest = max(deepest, float(depth))
    else:
        territories = ()
    noise = rng.uniform(*difficulty.noise)
    variation = rng.normal(0.0, 0.025, 3)  # stress and rest differ a little in shape
    r, a = geometry.polar_coords(size)
    wobble = variation[0] * np.cos(np.radians(a) + variation[1] * 50) * r
    stress = _finish(base - stress_drop, rng, size, noise)
    rest = _finish(base + wobble - rest_drop, rng, size, noise)
    mask = geometry.disk_mask(size)
    stress_defect &= mask
    rest_defect &= mask
    frac = _segment_fractions(stress_defect)
    segments = tuple(int(s) + 1 for s in np.flatnonzero(frac >= SEGMENT_FRACTION))
    # territories: those given a defect, plus any a defect spilled over into a whole segment
    involved = set(territories) | set(geometry.segments_to_territories(segments))
    territories = tuple(t for t in geometry.TERRITORY_NAMES if t in involved)
    return SimulatedStudy(
        label, sex, stress, rest, stress_defect, rest_defect, territories, segments, deepest
    )


LAYOUTS = ("side", "stacked")


def _put_text(image, text, org, scale, thickness=1):
    cv2.putText(
        image, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (230, 230, 230), thickness, cv2.LINE_AA
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
    layout: str = "side",
) -> np.ndarray:
    """An export-like RGB image of a study with labels and a colour bar.

    layout "side": stress left, rest right, titles above, a vertical bar on the right, dark
    background. "stacked": stress above rest, titles on the left, a horizontal bar underneath,
    mid-grey background.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    rng = rng or np.random.default_rng(0)
    bar_w = 18
    if layout == "side":
        margin, gap, top = 30, int(rng.integers(30, 60)), 50
        width = margin * 2 + disk_px * 2 + gap + (60 + bar_w if colorbar else 0)
        height = top + disk_px + margin
        bg = int(rng.integers(0, 25))
        origins = [(margin, top), (margin + disk_px + gap, top)]
        titles = [(x + disk_px // 2 - 45, y - 15) for x, y in origins]
    else:
        left, gap, top = 110, int(rng.integers(20, 40)), 20
        width = left + disk_px + 30
        height = top + 2 * disk_px + gap + (70 if colorbar else 20)
        bg = int(rng.integers(40, 80))
        origins = [(left, top), (left, top + disk_px + gap)]
        titles = [(10, y + disk_px // 2) for _, y in origins]
    image = np.full((height, width, 3), bg, np.uint8)
    for u, (x0, y0), org, title in zip(
        (stress, rest), origins, titles, ("STRESS", "REST"), strict=True
    ):
        exports.paste_disk(image, u, x0, y0, disk_px, colormap)
        if text:
            _put_text(image, title, org, 0.8, 2)
    if colorbar and layout == "side":
        bx, top = origins[1][0] + disk_px + 25, origins[0][1]
        ramp = np.linspace(1.0, 0.0, disk_px)[:, None].repeat(bar_w, 1)  # high at the top
        image[top : top + disk_px, bx : bx + bar_w] = colormaps.uptake_to_rgb(ramp, colormap)
        if text:
            for val, y in (("100%", top + 8), ("0%", top + disk_px)):
                _put_text(image, val, (bx + bar_w + 4, y), 0.35)
    elif colorbar:
        bx, by = origins[0][0], origins[1][1] + disk_px + 20
        ramp = np.linspace(0.0, 1.0, disk_px)[None, :].repeat(bar_w, 0)  # high at the right
        image[by : by + bar_w, bx : bx + disk_px] = colormaps.uptake_to_rgb(ramp, colormap)
        if text:
            _put_text(image, "0%", (bx, by + bar_w + 16), 0.4)
            _put_text(image, "100%", (bx + disk_px - 36, by + bar_w + 16), 0.4)
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
    difficulty: Difficulty | str = EASY,
    layout: str = "side",
    export_style: str = "plain",
    progress: bool = False,
) -> list[SimulatedStudy]:
    """Write a study folder: images/<id>.png, masks/<id>.npz, labels.csv (with sex and depth).

    Label counts are exact (`Difficulty.label_counts`), in a shuffled order. export_style
    "plain" draws `render_study_image` exports in colormap, disk_px and layout; "screenshot"
    draws workstation screenshots (`exports.random_style`: their own table, size and layout,
    PNG or JPEG, so some images are <id>.jpg).
    """
    if export_style not in exports.EXPORT_STYLES:
        raise ValueError(
            f"unknown export style {export_style!r}; expected one of {exports.EXPORT_STYLES}"
        )
    out = os.fspath(out)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    difficulty = get_difficulty(difficulty)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    os.makedirs(os.path.join(out, "masks"), exist_ok=True)
    rng = np.random.default_rng(seed)
    if difficulty.normal_fraction is None:
        labels = [LABELS[i % 3] for i in range(n)]
    else:
        labels = [lab for lab, k in difficulty.label_counts(n).items() for _ in range(k)]
    rng.shuffle(labels)
    rows = [("filename", "label", "territories", "segments", "sex", "depth")]
    studies = []
    items = range(n)
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="simulating", unit="study")
    for i in items:
        srng = np.random.default_rng([seed, i])  # per-study stream: any study can be redone alone
        sim = simulate_study(srng, size, label=labels[i], difficulty=difficulty)
        if export_style == "screenshot":
            style = exports.random_style(srng)
            image = exports.render_screenshot(sim.stress, sim.rest, style, srng)
            name = f"study_{i:04d}.{style.file_format}"
            atomic_write_bytes(os.path.join(out, "images", name), exports.encode(image, style))
        else:
            name = f"study_{i:04d}.png"
            image = render_study_image(
                sim.stress, sim.rest, colormap=colormap, disk_px=disk_px, rng=srng, layout=layout
            )
            _write_png(os.path.join(out, "images", name), image)
        _write_masks(os.path.join(out, "masks", f"study_{i:04d}.npz"), sim)
        rows.append(
            (
                name,
                sim.label,
                "+".join(sim.territories),
                "+".join(map(str, sim.segments)),
                sim.sex,
                f"{sim.depth:.3f}",
            )
        )
        studies.append(sim)

    def write_csv(p):
        with open(p, "w", newline="") as f:
            csv.writer(f).writerows(rows)

    atomic_write_with(os.path.join(out, "labels.csv"), write_csv)
    return studies
