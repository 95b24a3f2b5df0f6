"""Canonical bull's-eye grid: polar coordinates, AHA 17 segments, coronary territories.

A polar map of size S is the disk inscribed in an S x S image: radius 0 (apex) at the centre,
radius 1 (base) at the rim. Orientation follows the clinical convention: anterior up, septal
left, inferior down, lateral right. Angles are degrees counter-clockwise from the +x axis
(image right = lateral); image rows grow downward, so "up" is +y = -row.
"""

from __future__ import annotations

import functools

import numpy as np

# Ring boundaries (radius, 0 apex .. 1 base). Chosen so the ring areas match the AHA
# myocardial mass fractions (apex cap 5%, apical 25%, mid 35%, basal 35%; Cerqueira 2002):
# on a bull's-eye, area is what a reader weighs, so equal-mass rings keep segment sizes fair.
APEX_RADIUS = float(np.sqrt(0.05))  # ~0.224: segment 17 inside
APICAL_RADIUS = float(np.sqrt(0.30))  # ~0.548: apical ring 13-16 up to here
MID_RADIUS = float(np.sqrt(0.65))  # ~0.806: mid ring 7-12 up to here; basal 1-6 to 1.0
RING_RADII = (APEX_RADIUS, APICAL_RADIUS, MID_RADIUS, 1.0)

NUM_SEGMENTS = 17
SEGMENT_NAMES = (
    "basal anterior",
    "basal anteroseptal",
    "basal inferoseptal",
    "basal inferior",
    "basal inferolateral",
    "basal anterolateral",
    "mid anterior",
    "mid anteroseptal",
    "mid inferoseptal",
    "mid inferior",
    "mid inferolateral",
    "mid anterolateral",
    "apical anterior",
    "apical septal",
    "apical inferior",
    "apical lateral",
    "apex",
)

TERRITORY_NAMES = ("LAD", "LCX", "RCA")
TERRITORIES = {
    "LAD": (1, 2, 7, 8, 13, 14, 17),
    "RCA": (3, 4, 9, 10, 15),
    "LCX": (5, 6, 11, 12, 16),
}
# segment number (1..17) -> territory name
SEGMENT_TERRITORY = {s: t for t, segs in TERRITORIES.items() for s in segs}


@functools.lru_cache(maxsize=16)
def _polar_coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    if size < 4:
        raise ValueError(f"polar map size must be >= 4, got {size}")
    centre = size / 2.0
    idx = np.arange(size, dtype=np.float64) + 0.5  # pixel centres
    x = (idx[None, :] - centre) / centre
    y = (centre - idx[:, None]) / centre  # up is +y
    x, y = np.broadcast_arrays(x, y)
    radius = np.hypot(x, y)
    angle = np.degrees(np.arctan2(y, x)) % 360.0
    radius.setflags(write=False)
    angle.setflags(write=False)
    return radius, angle


def polar_coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel (radius (S,S) in units of the disk radius, angle_deg (S,S) in [0, 360))."""
    return _polar_coords(int(size))


def disk_mask(size: int) -> np.ndarray:
    """(S,S) bool: pixel centres inside the unit disk."""
    radius, _ = polar_coords(size)
    return radius <= 1.0


def segment_of(radius: np.ndarray, angle_deg: np.ndarray) -> np.ndarray:
    """AHA segment (1..17, 0 outside the disk) for arrays of polar coordinates."""
    radius = np.asarray(radius, np.float64)
    angle = np.asarray(angle_deg, np.float64) % 360.0
    # Six 60-degree sectors starting at 60 deg (anterior) going counter-clockwise:
    # anterior, anteroseptal, inferoseptal, inferior, inferolateral, anterolateral.
    sector6 = np.floor(((angle - 60.0) % 360.0) / 60.0).astype(np.int64)
    # Four 90-degree sectors centred on 90 (anterior), 180 (septal), 270 (inferior), 0 (lateral).
    sector4 = np.floor(((angle - 45.0) % 360.0) / 90.0).astype(np.int64)
    seg = np.where(
        radius < APEX_RADIUS,
        17,
        np.where(
            radius < APICAL_RADIUS,
            13 + sector4,
            np.where(radius < MID_RADIUS, 7 + sector6, 1 + sector6),
        ),
    )
    return np.where(radius <= 1.0, seg, 0).astype(np.int32)


@functools.lru_cache(maxsize=16)
def _segment_map(size: int) -> np.ndarray:
    radius, angle = polar_coords(size)
    seg = segment_of(radius, angle)
    seg.setflags(write=False)
    return seg


def segment_map(size: int) -> np.ndarray:
    """(S,S) int32: 0 outside the disk, 1..17 AHA segment inside (read-only, cached)."""
    return _segment_map(int(size))


def territory_map(size: int) -> np.ndarray:
    """(S,S) int32: 0 outside the disk, else 1 + index into TERRITORY_NAMES (LAD, LCX, RCA)."""
    lut = np.zeros(NUM_SEGMENTS + 1, np.int32)
    for s, t in SEGMENT_TERRITORY.items():
        lut[s] = 1 + TERRITORY_NAMES.index(t)
    return lut[segment_map(size)]


def segment_masks(size: int) -> np.ndarray:
    """(17,S,S) bool: one mask per AHA segment (index 0 = segment 1)."""
    seg = segment_map(size)
    return seg[None] == np.arange(1, NUM_SEGMENTS + 1)[:, None, None]


def segment_centroids(size: int) -> np.ndarray:
    """(17, 2) float: (x, y) pixel centroid of each segment (index 0 = segment 1)."""
    masks = segment_masks(size).astype(np.float64)
    idx = np.arange(size, dtype=np.float64)
    count = masks.sum(axis=(1, 2))
    cx = np.einsum("kyx,x->k", masks, idx) / count
    cy = np.einsum("kyx,y->k", masks, idx) / count
    return np.stack([cx, cy], axis=1)


def segments_to_territories(segments) -> list[str]:
    """Territories (in TERRITORY_NAMES order) touched by any of the given AHA segments."""
    hit = {SEGMENT_TERRITORY[int(s)] for s in segments}
    return [t for t in TERRITORY_NAMES if t in hit]


def territory_segments(territories) -> list[int]:
    """Sorted AHA segments of the given territories (names from TERRITORY_NAMES)."""
    out: set[int] = set()
    for t in territories:
        if t not in TERRITORIES:
            raise ValueError(f"unknown territory {t!r}; expected one of {TERRITORY_NAMES}")
        out.update(TERRITORIES[t])
    return sorted(out)


def segment_grid_lines() -> tuple[tuple[float, float, float], ...]:
    """The 17-segment grid's radial boundaries as (radius from, radius to, angle deg).

    With the ring circles at RING_RADII they draw the grid a workstation puts over a map.
    """
    basal_mid = tuple((APICAL_RADIUS, 1.0, float(deg)) for deg in range(60, 420, 60))
    apical = tuple((APEX_RADIUS, APICAL_RADIUS, float(deg)) for deg in (45, 135, 225, 315))
    return basal_mid + apical
