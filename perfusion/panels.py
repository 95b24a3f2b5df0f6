"""Where the maps are in a screenshot: nested panels of one colour, each its own background.

A program window is a nest of rectangles, each filled with its own colour: a frame, a title
bar, menu and tool strips, side panels, and the panel holding the maps. Against the export's
background (the most common colour on its border) a panel is one large component, so the
maps inside it cannot be told apart. Each such panel is opened in turn and its own most common
colour taken as the background inside it, down to the panel the maps lie on. What is left,
the foreground, holds the maps, the colour bar, text and icons; `find_disks` picks the maps
from it by their shape, and `reading_order` puts them in the order their labels follow.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from perfusion import colormaps

_MIN_PANEL_SIDE = 40  # px; a colour bar or a strip of text is narrower
# A panel's own colour covers this share of it at least (a tight export of two maps leaves
# about a fifth of its area to the background), as one flat area: most of its pixels have all
# their neighbours in that colour too. A map's most common colour covers a few percent, in
# specks: a reconstructed map is noisy at the pixel level.
_PANEL_COLOUR_SHARE = 0.2
_PANEL_FLATNESS = 0.6
_SAME_PANEL_COLOUR = 6  # levels: JPEG's drift of a flat area, not another panel
_PANEL_NOISE = 12.0  # RGB distance: JPEG's noise over a flat panel, away from edges
_PANEL_REACH = 8  # px from its flat area: a JPEG halo around what lies on the panel
_PANEL_CORE = 7  # px: the flat area is where a square of this side is all the panel's colour
_MAX_DEPTH = 5  # window, body, side or maps panel, ...: deeper nests are not seen in practice
# Share of a component's outline on its circle: a disk's (even with a defect eating into the
# rim, or a label touching it) is 0.7-1; a square's about 0.2.
_MIN_RIM_SUPPORT = 0.5
# Intersection over union of a component and its circle: a disk's is 0.85-1 (a defect eating
# into the rim, a label touching it); a letter blob's or a ring's far less.
_MIN_CIRCLE_OVERLAP = 0.75


@dataclasses.dataclass(frozen=True)
class Disk:
    """A detected disk: centre (x, y) in pixel coordinates and radius to its edge."""

    cx: float
    cy: float
    radius: float


def _support(points: np.ndarray, circle) -> float:
    """Fraction of contour points within max(2 px, 3% of r) of the circle (cx, cy, r)."""
    cx, cy, r = circle
    off = np.abs(np.hypot(points[:, 0] - cx, points[:, 1] - cy) - r)
    return float(np.mean(off < max(2.0, 0.03 * r)))


def _refit(points: np.ndarray, circle) -> tuple[float, float, float]:
    """A least-squares circle through the outline points near the given one, trimmed in steps.

    What touches a map (its label, a colour bar, a cursor) or sticks out (grid-line ends, the
    soft JPEG edge of a drawn outline) lies off the circle and is left out of the fit.
    """
    cx, cy, r = circle
    for band in (0.2, 0.1, 0.05):
        near = np.abs(np.hypot(points[:, 0] - cx, points[:, 1] - cy) - r) < max(band * r, 2.0)
        if near.sum() < 20:
            break
        x, y = points[near, 0], points[near, 1]
        design = np.stack([2 * x, 2 * y, np.ones_like(x)], axis=1)
        (cx, cy, c), *_ = np.linalg.lstsq(design, x * x + y * y, rcond=None)
        r = float(np.sqrt(max(c + cx * cx + cy * cy, 0.0)))
    return float(cx), float(cy), r


def _circle(part: np.ndarray) -> tuple[float, float, float] | None:
    """(cx, cy, r) of a component ((h, w) uint8 mask) that is a filled disk, else None.

    r reaches the outline's pixel centres. Three starting circles, each also refitted to the
    outline near it (`_refit`); the one most of the outline lies on is kept: the min enclosing
    circle (right when a dark defect eats into the rim), the largest inscribed circle, the
    distance-transform peak (right when a label touches the disk), and the centroid with the
    median outline radius (right when grid-line ends or a cursor stick out around the rim).
    """
    contours, _ = cv2.findContours(part, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    points = np.concatenate(contours, axis=0).reshape(-1, 2).astype(np.float64)
    solid = cv2.drawContours(np.zeros_like(part), contours, -1, 1, thickness=-1)
    (ex, ey), er = cv2.minEnclosingCircle(points.astype(np.float32))
    dist = cv2.distanceTransform(solid, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    iy, ix = np.unravel_index(dist.argmax(), dist.shape)
    m = cv2.moments(solid, binaryImage=True)
    mx, my = m["m10"] / m["m00"], m["m01"] / m["m00"]
    mr = float(np.median(np.hypot(points[:, 0] - mx, points[:, 1] - my)))
    starts = [(ex, ey, er), (float(ix), float(iy), float(dist.max()) - 1.0), (mx, my, mr)]
    candidates = starts + [_refit(points, c) for c in starts]
    support = [_support(points, c) for c in candidates]
    cx, cy, r = candidates[int(np.argmax(support))]
    if r < 4 or max(support) < _MIN_RIM_SUPPORT:  # a panel, a window, a thumbnail: no circle
        return None
    # the component and its circle overlap: a letter blob or a ring does not fill a disk
    yy, xx = np.ogrid[: part.shape[0], : part.shape[1]]
    overlap = int(((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r)[solid > 0].sum())
    if overlap / (solid.sum() + np.pi * r * r - overlap) < _MIN_CIRCLE_OVERLAP:
        return None
    return float(cx), float(cy), float(r)


def _panel_colour(box: np.ndarray, part: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(colour, share, flatness) of a component's most common colour.

    box: (h, w, 3) uint8 pixels of its bounding box; part: (h, w) bool, its pixels. Colours
    are binned 4 levels wide, and the pixels within 4 levels of the bin's mean count, so that
    JPEG's drift of a flat area by a level or two stays in. flatness: the share of those
    pixels whose 8 neighbours are in it too.
    """
    q = (box >> 2).astype(np.int32)
    packed = (q[..., 0] << 12) | (q[..., 1] << 6) | q[..., 2]
    best = int(np.bincount(packed[part], minlength=1 << 18).argmax())
    colour = box[part & (packed == best)].mean(axis=0)
    members = part & (np.abs(box.astype(np.float32) - colour).max(axis=-1) <= 4)
    count = int(members.sum())
    inner = int(cv2.erode(members.astype(np.uint8), np.ones((3, 3), np.uint8)).sum())
    return colour, count / int(part.sum()), inner / max(count, 1)


def _near_panel(box, background_pixels, background, tolerance: float) -> np.ndarray:
    """(h, w) bool: the pixels within tolerance of a panel whose colour is near the background.

    A panel less than the tolerance away from the colour around it (a grey maps panel in a
    grey frame) is background with it, but its JPEG noise straddles the tolerance's edge:
    speckles of it would stand out and, closed, swell every map and label they touch. The
    most common colour of what reads as background, when it is not the background's own and
    covers a flat fifth of it, is background too: within the tolerance of that colour and
    _PANEL_REACH of its flat area, so that another panel's pixels stay as they were.
    """
    if not background_pixels.any():
        return background_pixels
    colour, share, flatness = _panel_colour(box, background_pixels)
    own = np.abs(colour - np.asarray(background, np.float32)).max() <= _SAME_PANEL_COLOUR
    if own or share < _PANEL_COLOUR_SHARE or flatness < _PANEL_FLATNESS:
        return np.zeros(background_pixels.shape, bool)
    # the panel's own flat area, not the stray pixels of its colour elsewhere (the blend of
    # a map's anti-aliased rim with another panel), and the halo within reach of it
    flat = ~colormaps.foreground_mask(box, background=colour, tolerance=_PANEL_NOISE)
    core = cv2.erode(flat.astype(np.uint8), np.ones((_PANEL_CORE, _PANEL_CORE), np.uint8))
    size = 2 * (_PANEL_REACH + _PANEL_CORE // 2) + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    reach = cv2.dilate(core, kernel) > 0
    return reach & ~colormaps.foreground_mask(box, background=colour, tolerance=tolerance)


def map_foreground(image: np.ndarray, *, tolerance: float = 40.0) -> np.ndarray:
    """(H, W) bool: the pixels that stand out from the panel they lie on.

    A tight export (maps, labels and a bar on one background) gives the same foreground as
    `colormaps.foreground_mask`; in a screenshot each panel (a large component, not a disk,
    most of it one flat colour) is opened and its own background removed in turn (see the
    module docstring). A panel need not be a rectangle: around a side panel of another
    colour, the maps panel and the strips above it make one L-shaped component. A panel
    whose colour is within the tolerance of the one around it is background with it
    (`_near_panel`).
    """
    h, w = image.shape[:2]
    out = np.zeros((h, w), bool)
    # (rows, cols, which pixels of that box belong to the panel, its background colour, depth)
    todo = [(slice(0, h), slice(0, w), None, colormaps.background_colour(image), 0)]
    while todo:
        rows, cols, within, background, depth = todo.pop()
        box = image[rows, cols]
        fg = colormaps.foreground_mask(box, background=background, tolerance=tolerance)
        if within is not None:
            fg &= within
        fg &= ~_near_panel(box, ~fg if within is None else within & ~fg, background, tolerance)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=8)
        for i in range(1, n):
            x, y, bw, bh, _ = (int(v) for v in stats[i])
            part = labels[y : y + bh, x : x + bw] == i
            inner = (
                slice(rows.start + y, rows.start + y + bh),
                slice(cols.start + x, cols.start + x + bw),
            )
            if (
                depth < _MAX_DEPTH
                and min(bw, bh) >= _MIN_PANEL_SIDE
                and _circle(part.astype(np.uint8)) is None
            ):
                colour, share, flatness = _panel_colour(box[y : y + bh, x : x + bw], part)
                if share >= _PANEL_COLOUR_SHARE and flatness >= _PANEL_FLATNESS:
                    todo.append((*inner, part, colour, depth + 1))
                    continue
            out[inner] |= part
    return out


def find_disks(
    image: np.ndarray, *, min_area_fraction: float = 0.002, foreground=None
) -> list[Disk]:
    """Colour-coded disks in an RGB image, largest first.

    The foreground (`map_foreground`, or the one given) is closed (bridging thin grid lines),
    opened (cutting a cursor line or a tick that joins a disk to something else), and split
    into connected components; a component is a disk when it fills a circle most of its
    outline lies on (`_circle`). Text (small components), the colour bar (a filled elongated
    rectangle), panels and thumbnails are left out.
    """
    h, w = image.shape[:2]
    fg = map_foreground(image) if foreground is None else foreground
    # bridges grid lines drawn in the background's colour (up to 3 px and their soft edges)
    k = max(7, min(h, w) // 120) | 1
    fg = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((k, k), np.uint8))
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    disks = []
    for i in range(1, n):
        x, y, bw, bh, area = (int(v) for v in stats[i])
        if area < max(min_area_fraction * h * w, 50):
            continue
        if max(bw, bh) / max(min(bw, bh), 1) > 1.5:  # colour bar, text lines
            continue
        circle = _circle((labels[y : y + bh, x : x + bw] == i).astype(np.uint8))
        if circle is not None:
            cx, cy, r = circle
            # contour points are pixel centres: the disk edge lies half a pixel further out
            disks.append((area, Disk(cx + x, cy + y, r + 0.5)))
    disks.sort(key=lambda t: -t[0])
    return [d for _, d in disks]


def reading_order(disks: list[Disk]) -> list[Disk]:
    """Rows top to bottom (centres less than a radius apart in height), left to right."""
    rows: list[list[Disk]] = []
    for d in sorted(disks, key=lambda d: d.cy):
        if rows and d.cy - rows[-1][0].cy < rows[-1][0].radius:
            rows[-1].append(d)
        else:
            rows.append([d])
    return [d for row in rows for d in sorted(row, key=lambda d: d.cx)]
