"""Reading perfusion studies: study folders, images with two disks, pairs, DICOM, arrays.

The only perfusion module doing image-file I/O. Files come through cardiac_core.images (the size
in the header is checked against a pixel limit before decoding) and DICOM secondary captures
through cardiac_core.dicom. Every study ends up on the canonical polar grid of perfusion.geometry:
(S, S) with the disk inscribed, apex at the centre.

Workstation screenshots are read too: the maps are found among window chrome and panels
(perfusion.panels), and what is drawn over them (segment grid, scores, labels, a cursor) is
masked and filled from the map around it (perfusion.overlays); `Study.masked_fraction` says how
much.

A picture that does not read as a polar map is refused with one line naming the file, rather
than scored: no disk, a missing or an extra disk, disks of different sizes, grey disks
without a grey table chosen on purpose, areas of colours far from the colour table, too much
of a disk drawn over, a flat disk, or a disk whose hottest part is far below 100%.
"""

from __future__ import annotations

import csv
import dataclasses
import os

import cv2
import numpy as np

from cardiac_core import dicom, images
from perfusion import colormaps, geometry, overlays, panels
from perfusion.panels import Disk, find_disks  # the reading API: studies.find_disks

LABELS = ("normal", "ischemia", "infarction")
_LABEL_SYNONYMS = {"ischaemia": "ischemia", "infarct": "infarction", "mi": "infarction"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_EXTENSIONS = (".dcm", ".dicom")


@dataclasses.dataclass
class Study:
    """One stress/rest study on the canonical polar grid of size S."""

    name: str
    stress_rgb: np.ndarray  # (S, S, 3) uint8, black outside the disk
    rest_rgb: np.ndarray  # (S, S, 3) uint8
    stress_uptake: np.ndarray  # (S, S) float32 relative uptake 0-1, 0 outside the disk
    rest_uptake: np.ndarray  # (S, S) float32
    mask: np.ndarray  # (S, S) bool, the disk
    label: str | None = None  # one of LABELS when known
    territories: tuple[str, ...] = ()
    segments: tuple[int, ...] = ()
    sex: str | None = None  # "M" / "F" when known
    path: str = ""
    # of the read disk area hidden by drawings (grid, scores, labels, cursor) and filled from
    # around them: the larger of stress and rest
    masked_fraction: float = 0.0

    @property
    def size(self) -> int:
        return self.mask.shape[0]


def _read_radius(disk: Disk) -> float:
    """The radius read: inside the anti-aliased rim (about a pixel), which blends with the
    background."""
    return max(disk.radius - 2.0, 1.0)


def _resample_disk(array: np.ndarray, disk: Disk, size: int, interpolation) -> np.ndarray:
    """Sample the disk onto the canonical (size, size) grid (disk inscribed)."""
    idx = (np.arange(size, dtype=np.float32) + 0.5 - size / 2) / (size / 2)
    r = _read_radius(disk)
    map_x = np.broadcast_to(disk.cx + idx[None, :] * r, (size, size)).astype(np.float32)
    map_y = np.broadcast_to(disk.cy + idx[:, None] * r, (size, size)).astype(np.float32)
    scale = 2 * r / size
    if scale > 1.5:  # prefilter before downsampling so the grid does not alias
        array = cv2.GaussianBlur(array, (0, 0), sigmaX=0.45 * scale)
    return cv2.remap(array, map_x, map_y, interpolation, borderMode=cv2.BORDER_REPLICATE)


def _read_bar(table: np.ndarray) -> tuple[str | None, np.ndarray]:
    """(name or None, table low uptake first) of a bar's colours read in the usual direction.

    A stretch of a known table says which way it runs (either way round); otherwise the
    darker end is low uptake, as in clinical colormaps (turbo, dark at both ends, is known).
    """
    for oriented in (table, table[::-1]):
        named = colormaps.match_named(oriented)
        if named:
            return named, oriented
    lum = table.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    n = max(len(table) // 20, 1)
    low, high = lum[:n].mean(), lum[-n:].mean()
    return None, (table[::-1] if low - high > 10 else table)


# Reading checks: a picture that is not a polar map in a known table is refused, not scored.
_GREY_SPREAD = 12  # max - min over R, G, B at or below which a pixel counts as grey
_GREY_FRACTION = 0.95  # disks this grey were exported (or converted) without colour
_FAR_FROM_TABLE = 30.0  # RGB distance beyond which a pixel's colour is not in the table
# Areas (wider than any drawn stroke) of off-table colours: the table does not fit. Lines
# and text in off-table colours are drawings, masked instead.
_MAX_FAR_FRACTION = 0.1
# Drawn over, masked and filled: the 17-segment grid with scores covers 5-75% of a map. The
# mask is what is drawn (an anti-aliased line of 1-3 px covers 3-5) and about a pixel of its
# JPEG edge: on simulated screenshots 1.5% of a disk beyond that. 3 px grids with bold scores
# on 140-160 px maps at JPEG 60, whose chroma smears the lines over the cells left between
# them, are 0.55-0.77 masked: read, such studies were 0.009-0.040 off the truth (37 simulated,
# mean 0.018; a clean PNG 0.003) once the fill takes the map from 1 px beyond the strokes
# where little is left beyond 2 (`overlays.mask_and_fill`; from 2 they were off by 0.13-0.19,
# and 60% was the limit). One at 0.85 was off by 0.5: above 80% too little of the map is left
# to say what it is, and the disk is refused.
_MAX_MASKED = 0.8
# Share of a disk's pixels in the map's own colours (`overlays.map_colours`) that the table is
# chosen on; a 3 px grid with bold scores leaves about half, its edges blurred by JPEG.
_MIN_MAP_COLOURS = 0.25
_MIN_HOTTEST = 0.6  # polar maps are normalised to their hottest region (100%)
_HOT_PERCENTILE = 90  # of the map's uptake: most of it, without the grid's specks
_HOTTEST_TIE = 0.05  # tables reading the hottest part this close to each other fit alike
_MIN_UPTAKE_SD = 0.01  # a flat disk of one colour is no perfusion map
_MIN_DISK_RATIO = 0.8  # radii of the stress and rest disks in one export
_EXTRA_DISK_RATIO = 0.5  # a further disk at least this large makes the layout ambiguous


def _inner(disk: Disk, shape) -> tuple[slice, slice, np.ndarray]:
    """The crop around a disk and, inside it, the pixels within 0.9 of the radius."""
    x0, y0 = max(int(disk.cx - disk.radius - 2), 0), max(int(disk.cy - disk.radius - 2), 0)
    x1 = min(int(disk.cx + disk.radius + 3), shape[1])
    y1 = min(int(disk.cy + disk.radius + 3), shape[0])
    inside = overlays.within(disk.cx, disk.cy, 0.9 * disk.radius, y0, y1, x0, x1)
    return slice(y0, y1), slice(x0, x1), inside


def _canonical_maps(image: np.ndarray, disk: Disk, table: np.ndarray, size: int, what: str):
    """(rgb (S,S,3) uint8, uptake (S,S) float32, masked fraction) of one disk, 0 outside it.

    Drawings over the disk are masked and filled from the map around them
    (`overlays.mask_and_fill`). Refuses (ValueError naming `what`) a disk with areas of
    colours far from the table, too much of it drawn over, one flat colour, or whose hottest
    part is far below 100%.
    """
    rows, cols, inside = _inner(disk, image.shape)
    crop = np.ascontiguousarray(image[rows, cols])
    local = Disk(disk.cx - cols.start, disk.cy - rows.start, disk.radius)
    # colour -> uptake at the native resolution, before any interpolation mixes colours
    uptake, distance = colormaps.rgb_to_uptake(crop, table, return_distance=True)
    far = distance > _FAR_FROM_TABLE
    far_area = float(np.mean(overlays.broad(far, disk.radius)[inside]))
    if far_area > _MAX_FAR_FRACTION:
        raise ValueError(
            f"{what}: {far_area:.0%} of the disk is in colours far from the colour table (not "
            "a polar map in a known colormap, or a colour bar that does not belong to it)"
        )
    radius = _read_radius(local)
    uptake, drawn = overlays.mask_and_fill(crop, uptake, far, local.cx, local.cy, radius)
    read = overlays.within(local.cx, local.cy, radius, 0, crop.shape[0], 0, crop.shape[1])
    masked = float(drawn[read].mean())
    if masked > _MAX_MASKED:
        raise ValueError(
            f"{what}: {masked:.0%} of the disk is drawn over or far from the colour table; "
            f"with over {_MAX_MASKED:.0%} masked too little of the map is left to read"
        )
    values = uptake[inside]
    if values.std() < _MIN_UPTAKE_SD:
        raise ValueError(f"{what}: the disk is one flat colour, not a perfusion polar map")
    hottest = float(np.percentile(values, 99))
    if hottest < _MIN_HOTTEST:
        raise ValueError(
            f"{what}: the hottest part of the disk reads {hottest:.0%}; polar maps are "
            "normalised to their hottest region, so the colour table does not fit"
        )
    # drawn pixels take the colour of their filled uptake, so the RGB map agrees with it
    index = np.round(np.clip(uptake, 0, 1) * (len(table) - 1)).astype(np.int64)
    crop[drawn] = table[index[drawn]]
    mask = geometry.disk_mask(size)
    uptake = _resample_disk(uptake.astype(np.float32), local, size, cv2.INTER_LINEAR)
    rgb = _resample_disk(crop, local, size, cv2.INTER_LINEAR)
    rgb[~mask] = 0
    uptake = np.where(mask, np.clip(uptake, 0.0, 1.0), 0.0).astype(np.float32)
    return rgb, uptake, masked


def _bar_table(image, foreground, disk_pixels):
    """(name or None, table) of the colour bar that explains the disks' colours, or (None, None).

    A screenshot may hold several bar-like rectangles (a title bar, a tool strip, a second
    map's bar): the maps' bar is the one whose table holds the most disk pixels (within
    _FAR_FROM_TABLE). A bar that is a stretch of a known table (then named) is a colour bar
    whatever is drawn over the disks and needs to hold a quarter of them; any other rectangle
    half of them.
    """
    pixels = disk_pixels[:: max(len(disk_pixels) // 20000, 1)]
    best, best_share = (None, None), 0.0
    for box in colormaps.find_colorbars(foreground):
        table = colormaps.colorbar_table(image, box)
        if len(table) < 16:
            continue
        named, table = _read_bar(table)
        full = colormaps.get_colormap(named) if named else table
        distance = colormaps.rgb_to_uptake(pixels, full, return_distance=True)[1]
        share = float(np.mean(distance <= _FAR_FROM_TABLE))
        if share > best_share and share >= (0.25 if named else 0.5):
            best, best_share = (named, table), share
    return best


def _colour_table(image, foreground, colormap, disk_pixels, what) -> np.ndarray:
    """The table that maps the disks' colours to uptake; grey disks only on purpose."""
    if colormap is not None:
        return colormaps.get_colormap(colormap)
    spread = disk_pixels.max(axis=-1).astype(np.int16) - disk_pixels.min(axis=-1)
    grey = np.mean(spread <= _GREY_SPREAD) >= _GREY_FRACTION
    named, table = _bar_table(image, foreground, disk_pixels)
    if grey and named != "gray":
        # The luminance of a rainbow table is not monotonic: a colour export converted to grey
        # cannot be read back, and a grey export needs its grey table named.
        raise ValueError(
            f"{what}: the disks are grey; a grey export is read only with colormap 'gray' "
            "chosen on purpose (--colormap=gray), a colour export converted to grey not at all"
        )
    if named:
        return colormaps.get_colormap(named)
    if table is not None:
        return table
    # colour disks: the grey table would read grey drawings over them as map, and a grey
    # export is read only with its table named
    colour_tables = [name for name in colormaps.COLORMAP_NAMES if name != "gray"]
    ranked = colormaps.rank_colormaps(disk_pixels, names=colour_tables)
    sample = disk_pixels[:: max(len(disk_pixels) // 20000, 1)]
    # Tables can share a stretch (the red end of jet is the middle of hot, run the other way).
    # A polar map is normalised to its hottest region: of the tables that fit alike (within
    # twice the best score) and read its hottest part (99th percentile) above _MIN_HOTTEST,
    # the one reading most of the map highest (90th percentile; the 99th is the grid's white
    # specks left by JPEG) is the map's: the first in ranked order within _HOTTEST_TIE of it.
    # Taking merely the first above _MIN_HOTTEST, a jet map of 60-100% uptake (yellow to dark
    # red) without a bar, white grid over it, was read through hot, upside down: off by 0.45-
    # 0.55 or refused as far below 100% (11 of 40 such screenshots, 0 now).
    hottest = []
    for name, score in ranked:
        if score > 2 * ranked[0][1]:
            break
        top, high = np.percentile(colormaps.rgb_to_uptake(sample, name), [99, _HOT_PERCENTILE])
        if top >= _MIN_HOTTEST:
            hottest.append((name, float(high)))
    if hottest:
        best = max(high for _, high in hottest)
        return colormaps.get_colormap(next(n for n, h in hottest if h >= best - _HOTTEST_TIE))
    return colormaps.get_colormap(ranked[0][0])


def _disk_pixels(image: np.ndarray, disks) -> np.ndarray:
    """(N, 3) the map's pixels within 0.9 of each disk's radius, without what is drawn over.

    All of them when fewer than _MIN_MAP_COLOURS of them agree with the median around them
    (no smooth map there at all): the checks then see that. A 3 px grid with bold scores,
    its anti-aliased and JPEG edges, leaves about half of a map in its own colours; taken
    with the grid's colour, the tables are ranked on the grid too, and one holding that
    colour (magenta: gist_rainbow's top) can read it as the hottest part and win.
    """
    parts, maps = [], []
    for d in disks:
        rows, cols, inside = _inner(d, image.shape)
        parts.append(image[rows, cols][inside])
        maps.append(overlays.map_colours(image[rows, cols], inside, d.radius))
    every, agree = np.concatenate(parts), np.concatenate(maps)
    return agree if len(agree) >= _MIN_MAP_COLOURS * len(every) else every


def _maps_from_image(image: np.ndarray, what, expected: int, colormap, size: int):
    """[(rgb, uptake, masked fraction)] of the `expected` disks, stress first."""
    foreground = panels.map_foreground(image)
    disks = find_disks(image, foreground=foreground)
    if not disks:
        raise ValueError(f"{what}: no disk found")
    if len(disks) < expected:
        raise ValueError(f"{what}: one disk where {expected} (stress and rest) are expected")
    smallest = min(d.radius for d in disks[:expected])
    found = [d for d in disks if d.radius >= _EXTRA_DISK_RATIO * smallest]
    radii = [d.radius for d in found]
    # Stress and rest are the first two maps in reading order (left to right, top to bottom);
    # a third map of their size after them (reversibility, difference) is left out.
    third_map = expected == 2 and len(found) == 3 and min(radii) >= _MIN_DISK_RATIO * max(radii)
    if len(found) > expected and not third_map:
        want = "2 (stress and rest)" if expected == 2 else "1"
        raise ValueError(
            f"{what}: {len(found)} disks found where {want} expected; crop the "
            "export to the study's disks"
        )
    disks = panels.reading_order(found)[:expected]
    if expected == 2:
        a, b = disks
        if min(a.radius, b.radius) < _MIN_DISK_RATIO * max(a.radius, b.radius):
            raise ValueError(
                f"{what}: the two disks differ in size (radius {a.radius:.0f} and "
                f"{b.radius:.0f} px), so they are not a stress/rest pair of one export"
            )
    pixels = _disk_pixels(image, disks)
    table = _colour_table(image, foreground, colormap, pixels, what)
    phases = ("stress", "rest") if expected == 2 else ("",)
    return [
        _canonical_maps(image, d, table, size, f"{what} {phase} disk".replace("  ", " "))
        for d, phase in zip(disks, phases, strict=True)
    ]


def _is_dicom(path: str) -> bool:
    return path.lower().endswith(DICOM_EXTENSIONS) or dicom.is_dicom(path)


def _read_rgb(path: str) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, its size checked against the pixel limit first."""
    image = images.read(path, color=True)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _study(name, maps, size, path) -> Study:
    (s_rgb, s_up, s_masked), (r_rgb, r_up, r_masked) = maps
    mask = geometry.disk_mask(size).copy()
    masked = max(s_masked, r_masked)
    return Study(name, s_rgb, r_rgb, s_up, r_up, mask, path=path, masked_fraction=masked)


def read_study_file(path, *, colormap=None, size: int = 128, skipped=None) -> list[Study]:
    """The studies in one file: an image, or a DICOM secondary capture of one or more frames.

    An image holds one study (stress disk left or top, rest right or bottom). In a DICOM file
    each frame holding both disks is a study (named `<stem>#<frame>` when there are several
    frames), and a file of two frames holding one disk each is one study: stress, then rest.
    Colours map to uptake through the export's colour bar when present, else through the named
    colormap (or table) given, else through the known colormap nearest to the disk colours.

    skipped: a list to collect `(name, reason)` of unreadable frames while the good frames are
    still returned; by default the first bad frame raises.
    """
    path = os.fspath(path)
    if not _is_dicom(path):
        maps = _maps_from_image(_read_rgb(path), path, 2, colormap, size)
        return [_study(_stem(path), maps, size, path)]
    cine = dicom.DicomCine(path)
    try:
        n = len(cine)
        if n == 2:
            first = cine.rgb_frame(0)
            disks = find_disks(first)
            if len([d for d in disks if d.radius >= _EXTRA_DISK_RATIO * disks[0].radius]) == 1:
                maps = [
                    _maps_from_image(frame, f"{path} frame {i + 1}", 1, colormap, size)[0]
                    for i, frame in enumerate((first, cine.rgb_frame(1)))
                ]
                return [_study(_stem(path), maps, size, path)]
        out = []
        for i in range(n):
            what = path if n == 1 else f"{path} frame {i + 1}"
            try:
                maps = _maps_from_image(cine.rgb_frame(i), what, 2, colormap, size)
            except ValueError as e:
                if skipped is None:
                    raise
                skipped.append((f"{os.path.basename(path)}#{i + 1}", str(e)))
                continue
            name = _stem(path) if n == 1 else f"{_stem(path)}#{i + 1}"
            out.append(_study(name, maps, size, path))
        return out
    finally:
        cine.close()


def read_study_image(path, *, colormap=None, size: int = 128) -> Study:
    """The one study in an image (or single-study DICOM) file; see `read_study_file`."""
    found = read_study_file(path, colormap=colormap, size=size)
    if len(found) != 1:
        raise ValueError(f"{path}: holds {len(found)} studies; read it with read_study_file")
    return found[0]


def read_study_pair(stress_path, rest_path, *, colormap=None, size: int = 128) -> Study:
    """A study stored as two files, one disk each."""
    maps = []
    for p in (os.fspath(stress_path), os.fspath(rest_path)):
        image = dicom.DicomCine(p).rgb_frame(0) if _is_dicom(p) else _read_rgb(p)
        maps.append(_maps_from_image(image, p, 1, colormap, size)[0])
    return _study(_stem(os.fspath(stress_path)), maps, size, os.fspath(stress_path))


def _map_from_array(array, colormap, size: int, what: str):
    array = np.asarray(array)
    mask = geometry.disk_mask(size)
    if array.ndim == 3 and array.shape[-1] == 3:  # an RGB picture of one disk
        return _maps_from_image(np.ascontiguousarray(array, np.uint8), what, 1, colormap, size)[0]
    if array.ndim != 2:
        raise ValueError(f"{what}: expected (H, W) uptake or (H, W, 3) RGB, got {array.shape}")
    # an uptake polar map on a square grid with the disk inscribed
    u = np.nan_to_num(array.astype(np.float32), nan=0.0)
    if u.shape != (size, size):
        u = cv2.resize(u, (size, size), interpolation=cv2.INTER_LINEAR)
    u = np.where(mask, np.clip(u, 0.0, 1.0), 0.0).astype(np.float32)
    rgb = colormaps.uptake_to_rgb(u, "spectrum" if colormap is None else colormap)
    rgb[~mask] = 0
    return rgb, u, 0.0


def study_from_arrays(stress, rest, *, colormap=None, size: int = 128, name="arrays", **meta):
    """A study from numpy arrays: (H,W) uptake polar maps or (H,W,3) RGB images of one disk."""
    maps = [
        _map_from_array(a, colormap, size, f"{name} ({p})")
        for a, p in ((stress, "stress"), (rest, "rest"))
    ]
    study = _study(name, maps, size, "")
    return dataclasses.replace(study, **meta)


def parse_label(value: str, where: str) -> str:
    label = _LABEL_SYNONYMS.get(value.strip().lower(), value.strip().lower())
    if label not in LABELS:
        raise ValueError(f"{where}: unknown label {value!r}; expected one of {LABELS}")
    return label


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").replace(";", "+").split("+") if v.strip()]


def read_labels(labels_csv) -> list[dict]:
    """Rows of labels.csv: filename, label[, territories, segments, sex, depth]; header optional.

    A header is a first row naming a `filename` (or file / image) and a `label` column, in any
    order; a UTF-8 byte-order mark (what spreadsheet programs write) is ignored. Errors name
    the file and its line number.
    """
    labels_csv = os.fspath(labels_csv)
    if not os.path.exists(labels_csv):
        raise FileNotFoundError(f"{labels_csv}: no such labels file")
    try:
        with open(labels_csv, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, r) for r in reader if r and any(c.strip() for c in r)]
    except UnicodeDecodeError as e:
        raise ValueError(f"{labels_csv}: not UTF-8 text (byte {e.start})") from None
    if not rows:
        raise ValueError(f"{labels_csv}: empty labels file")
    header = ["filename", "label", "territories", "segments", "sex"]
    first = [c.strip().lower() for c in rows[0][1]]
    if "label" in first or first[0] in ("filename", "file", "image"):
        first = ["filename" if c in ("file", "image") else c for c in first]
        if "filename" not in first or "label" not in first:
            raise ValueError(
                f"{labels_csv} line {rows[0][0]}: the header needs filename and label columns, "
                f"got {','.join(first)}"
            )
        header, rows = first, rows[1:]
        if not rows:
            raise ValueError(f"{labels_csv}: no studies listed, only a header row")
    out = []
    for line, row in rows:
        rec = dict(zip(header, row, strict=False))
        where = f"{labels_csv} line {line}"
        if not rec.get("filename", "").strip() or "label" not in rec:
            raise ValueError(f"{where}: expected filename,label[,territories,segments,sex]")
        territories = []
        for t in _split(rec.get("territories")):
            if t.upper() not in geometry.TERRITORIES:
                raise ValueError(f"{where}: unknown territory {t!r}")
            territories.append(t.upper())
        try:
            segments = [int(s) for s in _split(rec.get("segments"))]
        except ValueError:
            raise ValueError(f"{where}: segments must be '+'-joined numbers 1-17") from None
        if any(not 1 <= s <= 17 for s in segments):
            raise ValueError(f"{where}: segment numbers must be 1-17, got {segments}")
        sex = (rec.get("sex") or "").strip().upper()[:1] or None
        try:  # the simulator's defect depth, when the file has it
            depth = float(rec["depth"]) if (rec.get("depth") or "").strip() else None
        except ValueError:
            raise ValueError(f"{where}: depth must be a number, got {rec['depth']!r}") from None
        out.append(
            dict(
                filename=rec["filename"].strip(),
                label=parse_label(rec["label"], where),
                territories=tuple(territories),
                segments=tuple(sorted(segments)),
                sex=sex if sex in ("M", "F") else None,
                depth=depth,
            )
        )
    return out


def _pair_paths(images_dir: str, filename: str):
    """(stress, rest) paths when a study is stored as two files, else None."""
    stem, ext = os.path.splitext(filename)
    exts = [ext] if ext else list(IMAGE_EXTENSIONS)
    for e in exts:
        for s_name, r_name in (
            (f"{stem}_stress{e}", f"{stem}_rest{e}"),
            (f"{stem}-stress{e}", f"{stem}-rest{e}"),
            (os.path.join("stress", f"{stem}{e}"), os.path.join("rest", f"{stem}{e}")),
        ):
            s, r = os.path.join(images_dir, s_name), os.path.join(images_dir, r_name)
            if os.path.exists(s) and os.path.exists(r):
                return s, r
    return None


def read_labelled_study(root, rec: dict, *, colormap=None, size: int = 128) -> Study:
    """The study of one labels.csv row (`read_labels`) of a study folder, labels attached."""
    root = os.fspath(root)
    images_dir = os.path.join(root, "images")
    path = os.path.join(images_dir, rec["filename"])
    if os.path.exists(path):
        study = read_study_image(path, colormap=colormap, size=size)
    else:
        pair = _pair_paths(images_dir, rec["filename"])
        if pair is None:
            raise FileNotFoundError(
                f"{os.path.join(root, 'labels.csv')}: row {rec['filename']!r} has no image "
                f"({path} not found)"
            )
        study = read_study_pair(*pair, colormap=colormap, size=size)
    study.name = os.path.splitext(rec["filename"])[0]
    study.label = rec["label"]
    study.territories = rec["territories"]
    study.segments = rec["segments"]
    study.sex = rec["sex"]
    return study


def read_study_folder(
    root, *, colormap=None, size: int = 128, progress: bool = False, skipped=None
) -> list[Study]:
    """All studies of a folder: images/ + labels.csv (see docs/perfusion.md).

    skipped: a list to collect `(filename, reason)` of unreadable studies while the others are
    still returned; by default the first unreadable study raises.
    """
    root = os.fspath(root)
    if not os.path.isdir(os.path.join(root, "images")):
        raise FileNotFoundError(f"{root}: no images/ folder")
    rows = read_labels(os.path.join(root, "labels.csv"))
    if progress:
        from tqdm import tqdm

        rows = tqdm(rows, desc=f"reading {root}", unit="study")
    studies = []
    for rec in rows:
        try:
            studies.append(read_labelled_study(root, rec, colormap=colormap, size=size))
        except (ValueError, OSError) as e:
            if skipped is None:
                raise
            skipped.append((rec["filename"], str(e)))
    return studies
