"""Workstation screenshots of a study: the polar maps inside a review program's window.

What a nuclear-medicine workstation gives when a user saves the screen: a window frame and
title bar, menu and tool strips, side panels of text and other views around the polar maps;
the 17-segment grid and a score per segment drawn over each map; "STRESS"/"REST" labels; a
cursor; a colour table (a black-red-yellow-white "hot" table, a rainbow, ...) with or without
its bar; sometimes a third map (reversibility, difference); saved as PNG or JPEG. Each of these
is drawn at random (`random_style`), broader than any one vendor, so that the reader is tested
on what it has to tolerate rather than on one program's layout.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from perfusion import colormaps, geometry

EXPORT_STYLES = ("plain", "screenshot")  # the simulator's study images (--export_style)
SCREEN_LAYOUTS = ("side", "stacked", "grid")  # grid: stress, rest above; the third map below
THIRD_MAPS = ("reversibility", "difference")
COLORBAR_PLACES = ("right", "left", "below", "above")
# The grey table is left out: a grey export is read only with the grey table named on purpose.
SCREENSHOT_COLORMAPS = ("hot", "thermal", "spectrum", "jet", "turbo", "rainbow", "inferno")
FONTS = (
    cv2.FONT_HERSHEY_SIMPLEX,
    cv2.FONT_HERSHEY_PLAIN,
    cv2.FONT_HERSHEY_DUPLEX,
    cv2.FONT_HERSHEY_COMPLEX,
    cv2.FONT_HERSHEY_TRIPLEX,
    cv2.FONT_HERSHEY_COMPLEX_SMALL,
)
# Grey levels of the maps panel's background: black, dark grey, light grey.
BACKGROUNDS = ((0, 10), (30, 70), (170, 215))
LINE_COLOURS = (
    (255, 255, 255),
    (0, 0, 0),
    (128, 128, 128),
    (0, 255, 255),
    (0, 220, 0),
    (255, 0, 255),
    (255, 255, 0),
    (120, 170, 255),
)
_THIRD_TITLES = {"reversibility": "REVERSIBILITY", "difference": "DIFFERENCE"}
_PATIENT_LINES = (
    "Patient: ANON^0042",
    "DOB 1957-03-14  M",
    "Study: SPECT MPI",
    "Tc-99m sestamibi",
    "Stress: regadenoson",
    "SSS 12  SRS 4  SDS 8",
    "TID 1.05",
    "EF 58%  EDV 96 ml",
    "TPD 9%",
)


@dataclasses.dataclass(frozen=True)
class ScreenshotStyle:
    """How one screenshot looks; `random_style` draws every field."""

    layout: str = "side"  # SCREEN_LAYOUTS
    third_map: str | None = None  # THIRD_MAPS, or None for stress and rest only
    colormap: str = "hot"
    disk_px: int = 200  # map diameter on the screen
    background: int = 0  # grey level of the maps panel
    chrome: bool = True  # window frame, title bar, menu and tool strips, side and other panels
    grid_colour: tuple[int, int, int] | None = (255, 255, 255)  # None: no segment grid
    grid_thickness: int = 1
    score_colour: tuple[int, int, int] | None = (255, 255, 255)  # None: no segment scores
    font: int = cv2.FONT_HERSHEY_SIMPLEX
    font_scale: float = 0.45
    font_thickness: int = 1
    anti_aliased: bool = True
    labels: bool = True  # "STRESS" / "REST" (and the third map's name)
    cursor: str | None = "crosshair"  # "crosshair", "arrow" or None
    colorbar: str | None = "right"  # COLORBAR_PLACES, or None
    file_format: str = "png"  # "png" or "jpg"
    jpeg_quality: int = 90


def random_style(rng: np.random.Generator, **fixed) -> ScreenshotStyle:
    """A screenshot style drawn at random; keyword arguments fix fields.

    Every field is drawn whatever is fixed, so a fixed field leaves the others' draws as they
    were for the same stream.
    """

    def pick(options):
        return options[int(rng.integers(len(options)))]

    low, high = pick(BACKGROUNDS)
    style = ScreenshotStyle(
        layout=pick(SCREEN_LAYOUTS),
        third_map=pick(THIRD_MAPS) if rng.random() < 0.3 else None,
        colormap=pick(SCREENSHOT_COLORMAPS),
        disk_px=int(rng.integers(140, 261)),
        background=int(rng.integers(low, high + 1)),
        chrome=bool(rng.random() < 0.8),
        grid_colour=pick(LINE_COLOURS) if rng.random() < 0.85 else None,
        grid_thickness=int(rng.integers(1, 4)),
        score_colour=pick(((255, 255, 255),) * 3 + LINE_COLOURS) if rng.random() < 0.8 else None,
        font=pick(FONTS),
        font_scale=float(rng.uniform(0.35, 0.7)),
        font_thickness=int(rng.integers(1, 3)),
        anti_aliased=bool(rng.random() < 0.7),
        labels=bool(rng.random() < 0.9),
        cursor=pick(("crosshair", "arrow", None)),
        colorbar=pick((*COLORBAR_PLACES, None)),
        file_format="jpg" if rng.random() < 0.6 else "png",
        jpeg_quality=int(rng.integers(60, 96)),
    )
    return dataclasses.replace(style, **fixed)


def paste_disk(image, uptake, x0: int, y0: int, disk_px: int, colormap) -> None:
    """Draws a polar map ((S, S) uptake) as an anti-aliased disk of disk_px at (x0, y0)."""
    yy, xx = np.mgrid[:disk_px, :disk_px]
    rr = np.hypot(xx + 0.5 - disk_px / 2, yy + 0.5 - disk_px / 2) / (disk_px / 2)
    alpha = np.clip((1.0 - rr) * disk_px / 2 + 0.5, 0.0, 1.0)[..., None]  # anti-aliased rim
    up = cv2.resize(uptake.astype(np.float32), (disk_px, disk_px), interpolation=cv2.INTER_LINEAR)
    rgb = colormaps.uptake_to_rgb(up, colormap).astype(np.float32)
    tile = image[y0 : y0 + disk_px, x0 : x0 + disk_px].astype(np.float32)
    image[y0 : y0 + disk_px, x0 : x0 + disk_px] = np.round(alpha * rgb + (1 - alpha) * tile)


def segment_scores(uptake: np.ndarray) -> np.ndarray:
    """(17,) 0-4 scores a workstation might print: 0 at 85% mean uptake, one per 10% below."""
    seg = geometry.segment_map(uptake.shape[0])
    mean = np.bincount(seg.ravel(), uptake.ravel(), minlength=18)[1:]
    mean = mean / np.maximum(np.bincount(seg.ravel(), minlength=18)[1:], 1)
    return np.clip(np.round((0.85 - mean) / 0.1), 0, 4).astype(int)


def _third_uptake(stress, rest, kind: str) -> np.ndarray:
    inside = geometry.disk_mask(stress.shape[0])
    if kind == "reversibility":  # the stress map, reversible pixels painted at the table's top
        return np.where(inside & (rest - stress > 0.08), 1.0, stress).astype(np.float32)
    return np.where(inside, np.clip(0.5 + 1.25 * (rest - stress), 0, 1), 0).astype(np.float32)


def _contrast(rng, grey: int) -> tuple[int, int, int]:
    """A text colour readable on a background of the given grey level."""
    if grey > 128:
        return ((0, 0, 0), (0, 0, 120), (60, 60, 60))[int(rng.integers(3))]
    return ((255, 255, 255), (255, 255, 0), (210, 210, 210))[int(rng.integers(3))]


def _text(image, text, org, colour, style: ScreenshotStyle, scale=None) -> None:
    line = cv2.LINE_AA if style.anti_aliased else cv2.LINE_8
    scale = style.font_scale if scale is None else scale
    cv2.putText(image, text, org, style.font, scale, colour, style.font_thickness, line)


def _draw_grid_and_scores(image, x0, y0, style: ScreenshotStyle, scores, rng) -> None:
    """The 17-segment grid and per-segment scores over the disk at (x0, y0)."""
    line = cv2.LINE_AA if style.anti_aliased else cv2.LINE_8
    r = style.disk_px / 2
    cx, cy = x0 + r, y0 + r

    def point(radius, deg):
        a = np.radians(deg)
        return int(round(cx + radius * r * np.cos(a))), int(round(cy - radius * r * np.sin(a)))

    if style.grid_colour is not None:
        outer = rng.random() < 0.5  # some programs outline the disk, some do not
        for ring in geometry.RING_RADII if outer else geometry.RING_RADII[:-1]:
            radius = int(round(ring * r - (style.grid_thickness // 2 if ring == 1.0 else 0)))
            centre = (int(round(cx)), int(round(cy)))
            cv2.circle(image, centre, radius, style.grid_colour, style.grid_thickness, line)
        for r0, r1, deg in geometry.segment_grid_lines():
            cv2.line(
                image, point(r0, deg), point(r1, deg), style.grid_colour, style.grid_thickness, line
            )
    if style.score_colour is not None and scores is not None:
        size = 64
        for (sx, sy), score in zip(geometry.segment_centroids(size), scores, strict=True):
            text = str(int(score))
            (w, h), _ = cv2.getTextSize(text, style.font, style.font_scale, style.font_thickness)
            x = x0 + (sx + 0.5) / size * style.disk_px - w / 2
            y = y0 + (sy + 0.5) / size * style.disk_px + h / 2
            _text(image, text, (int(round(x)), int(round(y))), style.score_colour, style)


def _draw_colorbar(image, box, style: ScreenshotStyle, text_colour, rng) -> None:
    """The colour table as a bar in box (x, y, w, h), high uptake at the top / right."""
    x, y, w, h = box
    if h >= w:
        ramp = np.linspace(1.0, 0.0, h)[:, None].repeat(w, 1)
    else:
        ramp = np.linspace(0.0, 1.0, w)[None, :].repeat(h, 0)
    image[y : y + h, x : x + w] = colormaps.uptake_to_rgb(ramp, style.colormap)
    if rng.random() < 0.5:  # a thin frame around the bar
        cv2.rectangle(image, (x - 1, y - 1), (x + w, y + h), text_colour, 1)
    for frac, label in ((0.0, "0"), (0.5, "50"), (1.0, "100")):
        if h >= w:
            ty = int(round(y + h - 1 - frac * (h - 1)))
            cv2.line(image, (x + w + 1, ty), (x + w + 5, ty), text_colour, 1)
            _text(image, label, (x + w + 8, ty + 5), text_colour, style, 0.4)
        else:
            tx = int(round(x + frac * (w - 1)))
            cv2.line(image, (tx, y + h + 1), (tx, y + h + 5), text_colour, 1)
            _text(image, label, (tx - 8, y + h + 20), text_colour, style, 0.4)


def _draw_cursor(image, style: ScreenshotStyle, rng, near) -> None:
    """A crosshair through a map or a mouse pointer, somewhere over the maps."""
    x, y = (int(v + rng.uniform(-0.4, 0.4) * style.disk_px) for v in near)
    if style.cursor == "crosshair":
        colour = LINE_COLOURS[int(rng.integers(len(LINE_COLOURS)))]
        arm = int(style.disk_px * rng.uniform(0.15, 0.7))
        cv2.line(image, (x - arm, y), (x + arm, y), colour, 1)
        cv2.line(image, (x, y - arm), (x, y + arm), colour, 1)
    elif style.cursor == "arrow":
        arrow = np.array([(0, 0), (0, 17), (4, 13), (7, 19), (9, 18), (6, 12), (11, 12)])
        cv2.fillPoly(image, [arrow + (x, y)], (255, 255, 255))
        cv2.polylines(image, [arrow + (x, y)], True, (0, 0, 0), 1)


def _maps_panel(stress, rest, style: ScreenshotStyle, rng) -> np.ndarray:
    """The panel holding the maps, their labels and the colour bar."""
    n = 3 if style.third_map else 2
    d = style.disk_px
    layout = style.layout if (style.layout != "grid" or n == 3) else "side"
    gap, margin = int(rng.integers(15, 50)), int(rng.integers(15, 40))
    label_above = layout != "stacked" or rng.random() < 0.5
    label_w, label_h = (0, 30) if label_above else (110, 0)
    cells = {
        "side": [(i, 0) for i in range(n)],
        "stacked": [(0, i) for i in range(n)],
        "grid": [(0, 0), (1, 0), (0, 1)],
    }[layout]
    cols, rows = max(c for c, _ in cells) + 1, max(r for _, r in cells) + 1
    cell_w, cell_h = label_w + d + gap, label_h + d + gap
    maps_w, maps_h = cols * cell_w - gap, rows * cell_h - gap
    bar_w = int(rng.integers(10, 25))
    bar_len = min(d, maps_h if style.colorbar in ("right", "left") else maps_w)
    pad_x = {"right": (0, bar_w + 60), "left": (bar_w + 60, 0)}.get(style.colorbar, (0, 0))
    pad_y = {"below": (0, bar_w + 40), "above": (bar_w + 40, 0)}.get(style.colorbar, (0, 0))
    width = 2 * margin + pad_x[0] + maps_w + pad_x[1]
    height = 2 * margin + pad_y[0] + maps_h + pad_y[1]
    panel = np.full((height, width, 3), style.background, np.uint8)
    text_colour = _contrast(rng, style.background)
    ox, oy = margin + pad_x[0], margin + pad_y[0]
    titles = ("STRESS", "REST", _THIRD_TITLES.get(style.third_map, ""))
    origins = []
    for (c, r), title, k in zip(cells, titles, range(n), strict=False):
        x0, y0 = ox + c * cell_w + label_w, oy + r * cell_h + label_h
        origins.append((x0, y0))
        if stress is not None:
            uptake = (stress, rest)[k] if k < 2 else _third_uptake(stress, rest, style.third_map)
            paste_disk(panel, uptake, x0, y0, d, style.colormap)
            scores = segment_scores((stress, rest)[k]) if k < 2 else None
            _draw_grid_and_scores(panel, x0, y0, style, scores, rng)
        if style.labels:
            org = (x0 + d // 2 - 50, y0 - 9) if label_above else (x0 - label_w, y0 + d // 2)
            _text(panel, title, org, text_colour, style, 0.6)
    if style.colorbar in ("right", "left"):
        bx = ox + maps_w + 20 if style.colorbar == "right" else margin + 10
        _draw_colorbar(panel, (bx, oy + label_h, bar_w, bar_len), style, text_colour, rng)
    elif style.colorbar:
        by = oy + maps_h + 12 if style.colorbar == "below" else margin + 4
        _draw_colorbar(panel, (ox + label_w, by, bar_len, bar_w), style, text_colour, rng)
    if style.cursor:
        x0, y0 = origins[int(rng.integers(n))]
        _draw_cursor(panel, style, rng, (x0 + d / 2, y0 + d / 2))
    return panel


def _strip(width, height, grey, words, rng, style, *, icons: bool = False) -> np.ndarray:
    """A menu, tool or status strip: a band of one colour with words (and icons)."""
    strip = np.full((height, width, 3), grey, np.uint8)
    colour = _contrast(rng, grey)
    x = 8
    for word in words:
        if icons:  # small coloured buttons, square or round
            c = tuple(int(v) for v in rng.integers(0, 256, 3))
            s = height - 10
            if rng.random() < 0.5:
                cv2.rectangle(strip, (x, 5), (x + s, 5 + s), c, -1)
            else:
                cv2.circle(strip, (x + s // 2, 5 + s // 2), s // 2, c, -1)
            x += s + 8
        else:
            _text(strip, word, (x, height - 6), colour, style, 0.45)
            x += 12 * len(word) + 14
    return strip


def _side_panel(height, width, rng, style, colormap) -> np.ndarray:
    """Text lines, a small curve and a row of small short-axis slices: the other views."""
    grey = int(rng.choice((25, 45, 60, 190, 225, 240)))
    panel = np.full((height, width, 3), grey, np.uint8)
    colour = _contrast(rng, grey)
    y = 24
    for line in _PATIENT_LINES[: int(rng.integers(4, len(_PATIENT_LINES) + 1))]:
        _text(panel, line, (8, y), colour, style, 0.4)
        y += 20
    if y + 70 < height:  # a volume curve
        xs = np.linspace(10, width - 10, 30)
        ys = y + 40 - 25 * np.sin(np.linspace(0, np.pi, 30)) ** 2
        cv2.polylines(panel, [np.stack([xs, ys], 1).astype(np.int32)], False, colour, 1)
        y += 70
    r = int(min(14, (width - 20) // 8))
    for _ in range(3):  # small short-axis slices: rings in the colour table
        if y + 2 * r + 4 > height:
            break
        for j in range(3):
            c = tuple(int(v) for v in colormaps.uptake_to_rgb(rng.uniform(0.6, 1.0), colormap))
            cv2.circle(panel, (10 + r + j * (2 * r + 8), y + r), r, c, max(r // 3, 2))
        y += 2 * r + 8
    return panel


def _window(maps_panel, style: ScreenshotStyle, rng) -> np.ndarray:
    """The maps panel inside a program window: frame, title bar, strips, side panel."""
    h = maps_panel.shape[0]
    side_w = int(rng.integers(140, 241))
    side = _side_panel(h, side_w, rng, style, style.colormap)
    content = [side, maps_panel] if rng.random() < 0.5 else [maps_panel, side]
    body = np.concatenate(content, axis=1)
    w = body.shape[1]
    title_grey = int(rng.choice((40, 200, 225)))
    title = _strip(w, int(rng.integers(22, 31)), title_grey, (), rng, style)
    if rng.random() < 0.5:  # a coloured title bar
        title[:] = ((0, 84, 166), (30, 60, 110), (70, 90, 120))[int(rng.integers(3))]
    _text(title, "Perfusion Review - ANON^0042 - SPECT MPI", (8, title.shape[0] - 8),
          (255, 255, 255) if title.mean() < 128 else (0, 0, 0), style, 0.5)  # fmt: skip
    for k in range(3):  # minimise, maximise, close
        x = w - 22 * (k + 1)
        cv2.rectangle(title, (x, 5), (x + 16, title.shape[0] - 6), (200, 200, 200), 1)
    grey = int(rng.integers(205, 241))
    parts = [
        title,
        _strip(w, 22, grey, ("File", "Edit", "View", "Processing", "Tools", "Help"), rng, style),
    ]
    if rng.random() < 0.7:
        parts.append(_strip(w, int(rng.integers(26, 35)), grey - 15, range(12), rng, style,
                            icons=True))  # fmt: skip
    parts.append(body)
    if rng.random() < 0.7:
        parts.append(_strip(w, 20, grey, ("Ready", "Zoom 100%", "Frame 1/1"), rng, style))
    window = np.concatenate(parts, axis=0)
    border = int(rng.integers(1, 5))
    frame = tuple(
        int(v) for v in ((90, 90, 90), (0, 84, 166), (180, 180, 180))[int(rng.integers(3))]
    )
    return cv2.copyMakeBorder(window, *(border,) * 4, cv2.BORDER_CONSTANT, value=frame)


def render_screenshot(stress, rest, style: ScreenshotStyle, rng: np.random.Generator):
    """(H, W, 3) uint8 RGB screenshot of a study's maps ((S, S) uptake each) in `style`.

    stress=None draws the screen with no study loaded: chrome, panels and an empty maps panel.
    """
    panel = _maps_panel(stress, rest, style, rng)
    return _window(panel, style, rng) if style.chrome else panel


def encode(image: np.ndarray, style: ScreenshotStyle) -> bytes:
    """The screenshot's file bytes: PNG, or JPEG at the style's quality."""
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, style.jpeg_quality] if style.file_format == "jpg" else []
    ok, data = cv2.imencode(f".{style.file_format}", bgr, params)
    if not ok:
        raise ValueError(f"could not encode a {style.file_format} screenshot")
    return data.tobytes()
