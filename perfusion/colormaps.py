"""Workstation-like colormaps, uptake <-> colour, and reading a colour bar from an image.

A colormap is a (256, 3) uint8 table: entry i is the colour of relative uptake i / 255.
"""

from __future__ import annotations

import functools

import numpy as np

# Anchor lists (uptake, RGB). "spectrum" imitates the Cedars QPS / 4DM rainbow (black, violet,
# blue, green, yellow, orange, red, white); "thermal" the hot-iron scale of many consoles.
_ANCHORS = {
    "spectrum": (
        (0.00, (0, 0, 0)),
        (0.10, (70, 0, 110)),
        (0.25, (20, 20, 235)),
        (0.40, (0, 170, 230)),
        (0.55, (0, 200, 60)),
        (0.70, (240, 240, 0)),
        (0.82, (255, 140, 0)),
        (0.93, (225, 0, 0)),
        (1.00, (255, 255, 255)),
    ),
    "thermal": (
        (0.00, (0, 0, 0)),
        (0.30, (150, 0, 20)),
        (0.55, (240, 60, 0)),
        (0.75, (255, 170, 0)),
        (0.90, (255, 240, 90)),
        (1.00, (255, 255, 255)),
    ),
    "gray": ((0.0, (0, 0, 0)), (1.0, (255, 255, 255))),
}
# Further names served from matplotlib (imported lazily, only when asked for).
_MATPLOTLIB_NAMES = ("jet", "hot", "turbo", "viridis", "rainbow", "gist_rainbow", "inferno")
COLORMAP_NAMES = tuple(_ANCHORS) + _MATPLOTLIB_NAMES


def _from_anchors(anchors) -> np.ndarray:
    pos = np.array([a[0] for a in anchors])
    rgb = np.array([a[1] for a in anchors], np.float64)
    u = np.linspace(0.0, 1.0, 256)
    table = np.stack([np.interp(u, pos, rgb[:, c]) for c in range(3)], axis=1)
    return np.round(table).astype(np.uint8)


@functools.cache
def _table(name: str) -> np.ndarray:
    if name in _ANCHORS:
        table = _from_anchors(_ANCHORS[name])
    elif name in _MATPLOTLIB_NAMES:
        import matplotlib

        table = np.round(matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255)
        table = table.astype(np.uint8)
    else:
        raise ValueError(f"unknown colormap {name!r}; expected one of {COLORMAP_NAMES}")
    table.setflags(write=False)
    return table


def get_colormap(colormap) -> np.ndarray:
    """(N, 3) uint8 table from a name in COLORMAP_NAMES or an (N, 3) array (returned as uint8)."""
    if isinstance(colormap, str):
        return _table(colormap)
    table = np.asarray(colormap)
    if table.ndim != 2 or table.shape[1] != 3 or len(table) < 2:
        raise ValueError(f"a colormap table must be (N>=2, 3), got shape {table.shape}")
    if table.dtype != np.uint8:
        table = np.clip(np.round(table), 0, 255).astype(np.uint8)
    return table


def uptake_to_rgb(uptake, colormap="spectrum") -> np.ndarray:
    """Relative uptake (..., 0-1; NaN -> black) to (..., 3) uint8 RGB through a colormap."""
    table = get_colormap(colormap)
    u = np.asarray(uptake, np.float64)
    finite = np.isfinite(u)
    idx = np.round(np.clip(np.where(finite, u, 0.0), 0.0, 1.0) * (len(table) - 1)).astype(np.int64)
    return np.where(finite[..., None], table[idx], 0).astype(np.uint8)


def rgb_to_uptake(rgb, colormap="spectrum", *, return_distance: bool = False):
    """(..., 3) RGB to relative uptake (...) in 0-1 by the nearest colour in the table.

    Distances are computed once per distinct colour (an exported map holds a few thousand), so
    the cost is (distinct colours x table) rather than (pixels x table).
    With return_distance, also returns the Euclidean RGB distance to that nearest colour.
    """
    table = get_colormap(colormap).astype(np.float32)
    rgb = np.asarray(rgb)
    if rgb.shape[-1] != 3:
        raise ValueError(f"expected (..., 3) RGB, got shape {rgb.shape}")
    flat = np.clip(np.round(rgb.reshape(-1, 3)), 0, 255).astype(np.uint32)
    packed = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    unique, inverse = np.unique(packed, return_inverse=True)
    colours = np.stack([(unique >> 16) & 255, (unique >> 8) & 255, unique & 255], 1)
    colours = colours.astype(np.float32)
    best = np.empty(len(unique), np.int64)
    dist = np.empty(len(unique), np.float32)
    for start in range(0, len(unique), 4096):  # bounded memory: 4096 x N distances per chunk
        chunk = colours[start : start + 4096]
        # summed channel by channel in place: no (chunk, N, 3) temporary; exact for 8 bits
        d2 = (chunk[:, 0, None] - table[None, :, 0]) ** 2
        for c in (1, 2):
            d2 += (chunk[:, c, None] - table[None, :, c]) ** 2
        best[start : start + 4096] = d2.argmin(1)
        dist[start : start + 4096] = np.sqrt(d2.min(1))
    uptake = (best / (len(table) - 1)).astype(np.float32)[inverse].reshape(rgb.shape[:-1])
    if return_distance:
        return uptake, dist[inverse].reshape(rgb.shape[:-1])
    return uptake


def rank_colormaps(rgb_pixels, *, cap: float = 30.0, names=COLORMAP_NAMES) -> list:
    """[(name, score)] of `names`, nearest to the given (N, 3) pixels first.

    The score is the mean distance with each pixel's capped at `cap`: pixels of drawings over
    the map (a grid, scores) are far from every table and weigh the same for each, however
    many there are, while the map's pixels decide.
    """
    px = np.asarray(rgb_pixels).reshape(-1, 3)
    if len(px) > 20000:  # a strided subsample is plenty to rank the tables
        px = px[:: len(px) // 20000]
    scores = {
        name: float(np.minimum(rgb_to_uptake(px, name, return_distance=True)[1], cap).mean())
        for name in names
    }
    return sorted(scores.items(), key=lambda item: item[1])


def best_colormap(rgb_pixels, *, cap: float = 30.0, names=COLORMAP_NAMES) -> str:
    """The colormap of `names` whose colours lie nearest to the given (N, 3) pixels."""
    return rank_colormaps(rgb_pixels, cap=cap, names=names)[0][0]


def match_named(table, *, tolerance: float = 6.0) -> str | None:
    """The named colormap a colour-bar table is a stretch of, or None.

    A bar whose dark low end merges into a dark background is read short; when its colours lie
    on a known table (median distance below tolerance, rising uptake) that whole table is used.
    """
    table = np.asarray(table)
    best, best_d = None, tolerance
    for name in COLORMAP_NAMES:
        u, d = rgb_to_uptake(table, name, return_distance=True)
        rising = np.mean(np.diff(u) >= -1e-6) > 0.95 and u[-1] - u[0] > 0.5
        if rising and np.median(d) < best_d:
            best, best_d = name, float(np.median(d))
    return best


def colorbar_from_image(image, *, background=None, min_length: int = 40, min_aspect: float = 4.0):
    """The colour table of a colour bar in an RGB image, or None when there is none.

    A colour bar is the most elongated connected non-background component (long side at least
    min_length pixels, aspect ratio at least min_aspect). The table is read along its long axis
    through the central third; a vertical bar runs low uptake at the bottom to high at the top,
    a horizontal bar low at the left to high at the right (the usual workstation layouts).
    """
    fg = foreground_mask(image, background=background)
    boxes = find_colorbars(fg, min_length=min_length, min_aspect=min_aspect)
    return colorbar_table(np.asarray(image), boxes[0]) if boxes else None


def find_colorbars(foreground, *, min_length: int = 40, min_aspect: float = 4.0) -> list:
    """(x, y, w, h) of the bar-like components of a (H, W) foreground, most elongated first.

    A bar fills its bounding box; text and disks do not look like this. A title bar or a
    tool strip does too: which bar belongs to the maps is for the caller to judge by colour.
    """
    import cv2

    # a 3-px opening cuts ticks and frame lines that touch a bar without thinning the bar
    fg = cv2.morphologyEx(
        np.asarray(foreground, np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)
    )
    n, _, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    found = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        long, short = max(w, h), max(min(w, h), 1)
        if long >= min_length and long / short >= min_aspect and area >= 0.7 * w * h:
            found.append((long / short, (x, y, w, h)))
    return [box for _, box in sorted(found, key=lambda t: -t[0])]


def colorbar_table(image: np.ndarray, box) -> np.ndarray:
    """(N, 3) uint8 table read from the bar at box (x, y, w, h), low uptake first."""
    x, y, w, h = box
    bar = image[y : y + h, x : x + w].astype(np.float32)
    if h >= w:  # vertical: rows along the bar, top = high uptake
        c0, c1 = w // 3, max(w - w // 3, w // 3 + 1)
        line = np.median(bar[:, c0:c1], axis=1)[::-1]
    else:
        r0, r1 = h // 3, max(h - h // 3, h // 3 + 1)
        line = np.median(bar[r0:r1], axis=0)
    # trim a pixel each end: anti-aliased borders blend with the background
    if len(line) > 8:
        line = line[1:-1]
    return np.clip(np.round(line), 0, 255).astype(np.uint8)


def background_colour(image: np.ndarray) -> np.ndarray:
    """The most common colour on the image border (the export's background)."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]], axis=0).reshape(
        -1, image.shape[-1] if image.ndim == 3 else 1
    )
    values, counts = np.unique(border, axis=0, return_counts=True)
    return values[counts.argmax()]


def foreground_mask(image: np.ndarray, *, background=None, tolerance: float = 40.0) -> np.ndarray:
    """(H, W) bool: pixels farther than tolerance (RGB distance) from the background colour.

    Squared distances are summed channel by channel in int32, so a large export costs about
    9 bytes per pixel here rather than the float copies of the whole image.
    """
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    bg = background_colour(img) if background is None else np.asarray(background)
    bg = np.broadcast_to(np.asarray(bg, np.int32).reshape(-1), (img.shape[-1],))
    d2 = np.zeros(img.shape[:2], np.int32)
    part = np.empty(img.shape[:2], np.int32)
    for c in range(img.shape[-1]):
        np.subtract(img[..., c], bg[c], out=part, dtype=np.int32)
        np.multiply(part, part, out=part)
        d2 += part
    return d2 > tolerance * tolerance
