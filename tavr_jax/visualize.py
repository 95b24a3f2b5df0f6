"""Drawing keypoints coloured by group, and contact sheets (OpenCV).

Colours are RGB tuples (the drawn images are RGB); they come from the Okabe-Ito palette,
which stays distinguishable under the common colour-vision deficiencies.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from tavr_jax.schema import KeypointSchema

# One RGB colour per group index (wraps around for schemas with more groups).
GROUP_COLORS: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0),  # orange
    (86, 180, 233),  # sky blue
    (0, 158, 115),  # bluish green
    (240, 228, 66),  # yellow
    (213, 94, 0),  # vermillion
    (204, 121, 167),  # reddish purple
    (0, 114, 178),  # blue
)

_SHIFT = 4  # sub-pixel drawing: cv2 takes fixed-point coordinates with this many bits


def group_color(group_index: int) -> tuple[int, int, int]:
    """The RGB colour of a group index."""
    return GROUP_COLORS[int(group_index) % len(GROUP_COLORS)]


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(H,W) or (H,W,1) or (H,W,3) uint8 -> a new (H,W,3) uint8 RGB array."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image.copy()
    raise ValueError(f"expected an (H,W) or (H,W,3) image, got shape {image.shape}")


def _put_outlined_text(img, text, org, scale, color, thickness):
    # A dark outline keeps labels readable on both dark contrast and bright lung fields.
    cv2.putText(
        img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA
    )
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, color, thickness, cv2.LINE_AA)


def draw_keypoints(
    image: np.ndarray,
    coords: np.ndarray,
    visible: np.ndarray,
    schema: KeypointSchema,
    *,
    marker: str = "circle",
    labels: bool = True,
    probabilities: np.ndarray | None = None,
) -> np.ndarray:
    """Draws the visible keypoints of one frame, coloured by group.

    Args:
      image: (H, W) uint8 grayscale (or (H, W, 3) RGB) frame; not modified.
      coords: (K, 2) pixel (x, y) per schema point.
      visible: (K,) bool (or 0/1) per point; invisible points are not drawn.
      schema: the keypoint schema giving names and groups.
      marker: "circle" (e.g. ground truth) or "cross" (e.g. predictions).
      labels: write each point's name beside it.
      probabilities: optional (K,) visibility probabilities, appended to the labels.

    Returns:
      (H, W, 3) uint8 RGB image.
    """
    k = schema.num_points
    coords = np.asarray(coords, np.float64)
    visible = np.asarray(visible).astype(bool)
    if coords.shape != (k, 2) or visible.shape != (k,):
        raise ValueError(
            f"schema {schema.name!r} has {k} points; got coords {coords.shape}, "
            f"visible {visible.shape}"
        )
    if marker not in ("circle", "cross"):
        raise ValueError(f"marker must be 'circle' or 'cross', got {marker!r}")
    if probabilities is not None:
        probabilities = np.asarray(probabilities, np.float64)
        if probabilities.shape != (k,):
            raise ValueError(f"probabilities must have shape ({k},), got {probabilities.shape}")
    out = to_rgb(image)
    h, w = out.shape[:2]
    size = max(h, w)
    radius = max(2.0, size / 110.0)
    thick = max(1, round(size / 340))
    font = max(0.3, size / 1400.0)
    groups = schema.point_group
    for i in np.flatnonzero(visible & np.isfinite(coords).all(axis=1)):
        color = group_color(groups[i])
        x, y = coords[i]
        c = (round(x * (1 << _SHIFT)), round(y * (1 << _SHIFT)))
        r = round(radius * (1 << _SHIFT))
        if marker == "circle":
            cv2.circle(out, c, r, color, thick, cv2.LINE_AA, _SHIFT)
            cv2.circle(out, c, max(1 << _SHIFT, r // 4), color, -1, cv2.LINE_AA, _SHIFT)
        else:
            for dx, dy in ((1, 1), (1, -1)):
                p0 = (c[0] - dx * r, c[1] - dy * r)
                p1 = (c[0] + dx * r, c[1] + dy * r)
                cv2.line(out, p0, p1, color, thick, cv2.LINE_AA, _SHIFT)
        if labels:
            text = schema.point_names[i]
            if probabilities is not None:
                text += f" {probabilities[i]:.2f}"
            org = (int(x + radius + 2), int(y - radius))
            _put_outlined_text(out, text, org, font, color, thick)
    return out


def draw_legend(image_rgb: np.ndarray, schema: KeypointSchema) -> np.ndarray:
    """Writes the group names in their colours in the top-left corner (in place; returns it)."""
    size = max(image_rgb.shape[:2])
    font = max(0.3, size / 1400.0)
    step = max(10, round(size / 30))
    for g, name in enumerate(schema.group_names):
        _put_outlined_text(image_rgb, name, (4, step * (g + 1)), font, group_color(g), 1)
    return image_rgb


def contact_sheet(
    images: Sequence[np.ndarray],
    ncols: int,
    *,
    titles: Sequence[str] | None = None,
    gap: int = 2,
) -> np.ndarray:
    """Tiles images (grayscale or RGB, any sizes) into one RGB grid, row by row.

    Each cell is as large as the largest image; smaller images sit in the top-left corner
    of their cell on black. Optional titles are written at the bottom of each cell.
    """
    if len(images) == 0:
        raise ValueError("contact_sheet needs at least one image")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
    rgb = [to_rgb(im) for im in images]
    ch = max(im.shape[0] for im in rgb)
    cw = max(im.shape[1] for im in rgb)
    ncols = min(ncols, len(rgb))
    nrows = -(-len(rgb) // ncols)
    sheet = np.zeros((nrows * ch + (nrows - 1) * gap, ncols * cw + (ncols - 1) * gap, 3), np.uint8)
    font = max(0.3, max(ch, cw) / 1400.0)
    for n, im in enumerate(rgb):
        r, c = divmod(n, ncols)
        y0, x0 = r * (ch + gap), c * (cw + gap)
        sheet[y0 : y0 + im.shape[0], x0 : x0 + im.shape[1]] = im
        if titles is not None:
            cell = sheet[y0 : y0 + ch, x0 : x0 + cw]
            _put_outlined_text(cell, str(titles[n]), (4, ch - 6), font, (255, 255, 255), 1)
    return sheet
