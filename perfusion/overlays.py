"""Drawings over a polar map (segment grid, scores, labels, a cursor): masked, then filled.

Workstations draw over their maps. A drawn pixel is either far from the colour table (a grey or
coloured line, and the anti-aliased or JPEG-blurred edges of any stroke) or, when its colour is
in the table (white at the top of a hot table, black at the bottom of most), out of line with
the map around it: a reconstructed map is smooth, while a stroke is a few pixels wide and
differs from the median of a window over twice that width. Masked pixels are filled from
their neighbours (normalized convolution of the uptake), so the map keeps its shape for what
reads it next.
"""

from __future__ import annotations

import cv2
import numpy as np

# Median window (px, odd) for the smooth map under a stroke: over twice the widest stroke
# seen in screenshots (3 px lines, bold digits, a 12 px arrow), small against a map's features.
_MAX_WINDOW = 15
_MIN_WINDOW = 5
# A pixel further from the window's median than 5 times the map's own pixel noise (JPEG's
# included; robust SD from the median absolute deviation) is a stroke, and always at 0.1
# (uptake). Not under 0.04: a drawn line that differs by less hardly changes what is read.
_NOISE_MULTIPLE = 5.0
_OUTLIER = 0.1
_MIN_OUTLIER = 0.04
# Share of a disk over 2 px from every stroke (its JPEG halo) at which the fill is taken from
# there: 0.3 on a 3 px grid over a 160 px map with 40% masked, 0.02-0.14 at 55-75% masked.
_MIN_BEYOND_HALO = 0.2
_PASSES = 3  # median passes; crossings of three strokes need the third
# The colour strokes are drawn in: JPEG moves a white line's pixels by up to ~20 RGB levels;
# it must be the colour of this share of the in-table strokes found, and of this many pixels.
_SAME_COLOUR = 24.0
_STROKE_COLOUR_SHARE = 0.2
_MIN_STROKE_PIXELS = 50


def within(cx: float, cy: float, radius: float, y0: int, y1: int, x0: int, x1: int):
    """(y1 - y0, x1 - x0) bool: the pixels of rows y0:y1, columns x0:x1 whose centres are
    within the radius of (cx, cy)."""
    yy, xx = np.ogrid[y0:y1, x0:x1]
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 < radius**2


def stroke_window(radius: float) -> int:
    """The median window for a disk of this radius (px): a fifth of it, within 5-15 px."""
    return int(np.clip(int(radius / 5) | 1, _MIN_WINDOW, _MAX_WINDOW))


def _mirror(shape, cx: float, cy: float, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """remap maps that leave pixels inside the radius and reflect those outside across it.

    Around the rim a filter then sees the map on both sides rather than the background.
    """
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    dx, dy = xx + 0.5 - cx, yy + 0.5 - cy
    r = np.maximum(np.hypot(dx, dy), 1e-6)
    scale = np.where(r > radius, np.maximum(2 * radius - r, 0.0) / r, 1.0)
    return (cx + dx * scale - 0.5).astype(np.float32), (cy + dy * scale - 0.5).astype(np.float32)


def fill_from_neighbours(values: np.ndarray, mask: np.ndarray, *, guard: int = 0) -> np.ndarray:
    """values with the masked pixels replaced by a weighted mean of the unmasked ones near them.

    Normalized convolution: Gaussian-weighted sums of the known values over those of the
    weights, at the narrowest scale (sigma 1, 2, 4, ... px) that reaches each masked pixel, so
    a thin line is filled from its two sides and a wide blot from further out. guard: pixels
    this close to the mask keep their values but are not used to fill it.
    """
    out = values.astype(np.float32, copy=True)
    todo = mask.copy()
    source = mask
    if guard:
        source = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=guard) > 0
    known = (~source).astype(np.float32)
    data = np.where(source, 0.0, out).astype(np.float32)
    sigma = 1.0
    while todo.any() and sigma <= max(mask.shape):
        weight = cv2.GaussianBlur(known, (0, 0), sigma)
        reached = todo & (weight > 0.05)
        out[reached] = cv2.GaussianBlur(data, (0, 0), sigma)[reached] / weight[reached]
        todo &= ~reached
        sigma *= 2
    return out


def _stroke_colour(rgb: np.ndarray, strokes: np.ndarray, radius: float) -> np.ndarray:
    """(H, W) bool: the thin parts of the colour most of the given stroke pixels share.

    Grid and scores are drawn in one colour. Where it is white or black, also the ends of
    most tables, the median finds its strokes only where the map differs; the rest blend in
    and would read as map. Every thin stretch of that colour is taken as drawn; a map area of
    the same colour is broad and stays.
    """
    pixels = rgb[strokes]
    if len(pixels) < _MIN_STROKE_PIXELS:
        return np.zeros(strokes.shape, bool)
    q = (pixels >> 3).astype(np.int32)
    packed = (q[:, 0] << 10) | (q[:, 1] << 5) | q[:, 2]
    best = int(np.bincount(packed).argmax())
    colour = pixels[packed == best].mean(axis=0)
    # Drawn in white or black, the ends of most tables. (A stroke in a colour from the middle
    # of a table differs from the map around it enough for the median; and the isolines of a
    # map's own colours are thin too.)
    if not (colour.min() >= 255 - _SAME_COLOUR or colour.max() <= _SAME_COLOUR):
        return np.zeros(strokes.shape, bool)
    same = np.linalg.norm(rgb.astype(np.float32) - colour, axis=-1) <= _SAME_COLOUR
    if same[strokes].mean() < _STROKE_COLOUR_SHARE:  # no one colour: noise, not a drawing
        return np.zeros(strokes.shape, bool)
    return same & ~broad(same, radius)


def mask_and_fill(rgb, uptake, far, cx: float, cy: float, radius: float):
    """(filled uptake, drawn mask) of a disk's crop, both (H, W).

    rgb: (H, W, 3) uint8 crop; uptake: (H, W) float32 read through the colour table; far:
    (H, W) bool, colours far from it; (cx, cy, radius): the part of the disk to keep, in crop
    pixels. Outside it the returned uptake is the map reflected across the rim.
    """
    window = stroke_window(radius)
    mirror = _mirror(uptake.shape, cx, cy, radius)
    rgb = cv2.remap(rgb, *mirror, cv2.INTER_NEAREST)
    uptake = cv2.remap(uptake.astype(np.float32), *mirror, cv2.INTER_NEAREST)
    far = cv2.remap(far.astype(np.uint8), *mirror, cv2.INTER_NEAREST) > 0
    # Off-table pixels carry the uptake of whatever table colour is nearest: they are filled
    # before the median is taken. Where strokes cross (grid rings and spokes, digits on a
    # line) in table colours they can fill half the window: each pass fills what was found
    # and takes the median again over the filled map, finding the rest of the crossing.
    drawn = far
    u8 = np.round(np.clip(uptake, 0, 1) * 255).astype(np.int16)
    for n in range(_PASSES):
        filled = fill_from_neighbours(uptake, drawn)
        smooth = cv2.medianBlur(np.round(np.clip(filled, 0, 1) * 255).astype(np.uint8), window)
        deviation = np.abs(u8 - smooth)
        if n == 0:  # the map's own pixel noise, robustly (strokes are a minority)
            noise = 1.4826 * np.median(deviation[~far])
            threshold = float(np.clip(_NOISE_MULTIPLE * noise, _MIN_OUTLIER * 255, _OUTLIER * 255))
            outlier = deviation > threshold
            outlier |= _stroke_colour(rgb, outlier & ~far, radius)
        else:
            outlier = deviation > threshold
        # The anti-aliased edge of a stroke in a table colour blends it with the map: colours
        # still in the table, between the two. A stroke's neighbours join it when they are
        # half as far off (hysteresis), so the map beside a stroke is kept.
        beside = cv2.dilate(outlier.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        outlier |= beside & (deviation > threshold / 2)
        if not (outlier & ~drawn).any():
            break
        drawn = drawn | outlier
    # A stroke's JPEG halo (ringing within its 8 x 8 blocks) is off by less than a stroke but
    # all to one side: the fill is taken from beyond 2 px of it where that leaves map between
    # the strokes. Between the 3 px lines of a grid on a 140-160 px map it does not (under 15%
    # of the disk is over 2 px from every stroke): the fill reached across a cell to the next
    # and was off by 0.13-0.19 where 60-75% was masked; from beyond 1 px, 0.017-0.041.
    disk = within(cx, cy, radius, 0, drawn.shape[0], 0, drawn.shape[1])
    halo = cv2.dilate(drawn.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2) > 0
    guard = 2 if 1 - halo[disk].mean() >= _MIN_BEYOND_HALO else 1
    return fill_from_neighbours(uptake, drawn, guard=guard), drawn


def map_colours(rgb: np.ndarray, inside: np.ndarray, radius: float) -> np.ndarray:
    """(N, 3) the pixels inside a disk that agree with the median colour around them.

    Before the colour table is known: the map's own colours, without most of what is drawn
    over it (strokes differ from the median of a window over twice their width), so that
    the table is chosen on the map, not on the colour of its grid.
    """
    smooth = cv2.medianBlur(np.ascontiguousarray(rgb), stroke_window(radius))
    agree = np.abs(rgb.astype(np.int16) - smooth).max(axis=-1) <= _SAME_COLOUR
    return rgb[inside & agree]


def broad(mask: np.ndarray, radius: float) -> np.ndarray:
    """The parts of a mask wider than any stroke: areas, not lines or text."""
    k = stroke_window(radius)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, kernel) > 0
