"""Reading perfusion studies: study folders, single images with two disks, pairs, arrays.

The only perfusion module doing image-file I/O (OpenCV). Every study ends up on the canonical
polar grid of perfusion.geometry: (S, S) with the disk inscribed, apex at the centre.
"""

from __future__ import annotations

import csv
import dataclasses
import os

import cv2
import numpy as np

from perfusion import colormaps, geometry

LABELS = ("normal", "ischemia", "infarction")
_LABEL_SYNONYMS = {"ischaemia": "ischemia", "infarct": "infarction", "mi": "infarction"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


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

    @property
    def size(self) -> int:
        return self.mask.shape[0]


@dataclasses.dataclass(frozen=True)
class Disk:
    """A detected disk: centre (x, y) in pixel coordinates and radius to its edge."""

    cx: float
    cy: float
    radius: float


def _imread_rgb(path: str) -> np.ndarray:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such image")
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: unreadable image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _support(points: np.ndarray, circle) -> float:
    """Fraction of contour points within 2 pixels of the circle (cx, cy, r)."""
    pts = points.reshape(-1, 2).astype(np.float64)
    cx, cy, r = circle
    return float(np.mean(np.abs(np.hypot(pts[:, 0] - cx, pts[:, 1] - cy) - r) < 2.0))


def find_disks(image: np.ndarray, *, min_area_fraction: float = 0.002) -> list[Disk]:
    """Colour-coded disks in an RGB image, largest first.

    Non-background pixels are closed (bridging thin grid lines), split into connected
    components, and each component's min enclosing circle is taken (robust to a dark defect
    eating less than half of the rim). Text (small components), the colour bar (a filled
    elongated rectangle) and anything that does not fill its circle are ignored.
    """
    h, w = image.shape[:2]
    fg = colormaps.foreground_mask(image).astype(np.uint8)
    k = max(3, min(h, w) // 120) | 1
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, np.ones((k, k), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    disks = []
    for i in range(1, n):
        x, y, bw, bh, area = stats[i]
        if area < max(min_area_fraction * h * w, 50):
            continue
        aspect = max(bw, bh) / max(min(bw, bh), 1)
        if aspect > 1.5:  # colour bar, text lines
            continue
        comp = (labels[y : y + bh, x : x + bw] == i).astype(np.uint8)
        contours, _ = cv2.findContours(comp, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        points = np.concatenate(contours, axis=0)
        (cx, cy), r = cv2.minEnclosingCircle(points)
        solid = cv2.drawContours(np.zeros_like(comp), contours, -1, 1, thickness=-1)
        filled = solid.sum()
        # Two candidate circles: the min enclosing one (right when a dark defect eats into the
        # rim) and the largest inscribed one, the distance-transform peak (right when a label or
        # a tick touches the disk). Keep the one more boundary points lie on.
        dist = cv2.distanceTransform(solid, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        iy, ix = np.unravel_index(dist.argmax(), dist.shape)
        inscribed = (float(ix), float(iy), float(dist.max()) - 1.0)
        if _support(points, inscribed) > _support(points, (cx, cy, r)):
            cx, cy, r = inscribed
        if r < 4 or filled < 0.6 * np.pi * r * r:  # text blobs and rings do not fill a disk
            continue
        # contour points are pixel centres: the disk edge lies half a pixel further out
        disks.append((area, Disk(float(cx + x), float(cy + y), float(r + 0.5))))
    disks.sort(key=lambda t: -t[0])
    return [d for _, d in disks]


def _resample_disk(array: np.ndarray, disk: Disk, size: int, interpolation) -> np.ndarray:
    """Sample the disk onto the canonical (size, size) grid (disk inscribed)."""
    idx = (np.arange(size, dtype=np.float32) + 0.5 - size / 2) / (size / 2)
    # stay inside the edge: the anti-aliased rim (about a pixel) blends with the background
    r = max(disk.radius - 2.0, 1.0)
    map_x = np.broadcast_to(disk.cx + idx[None, :] * r, (size, size)).astype(np.float32)
    map_y = np.broadcast_to(disk.cy + idx[:, None] * r, (size, size)).astype(np.float32)
    scale = 2 * r / size
    if scale > 1.5:  # prefilter before downsampling so the grid does not alias
        array = cv2.GaussianBlur(array, (0, 0), sigmaX=0.45 * scale)
    return cv2.remap(array, map_x, map_y, interpolation, borderMode=cv2.BORDER_REPLICATE)


def _orient_table(table: np.ndarray) -> np.ndarray:
    """Low uptake first: the darker end of a bar is low uptake for clinical colormaps."""
    lum = table.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    n = max(len(table) // 20, 1)
    low, high = lum[:n].mean(), lum[-n:].mean()
    return table[::-1] if low - high > 10 else table


def _canonical_maps(image: np.ndarray, disk: Disk, table: np.ndarray, size: int):
    """(rgb (S,S,3) uint8, uptake (S,S) float32) of one disk, black / 0 outside it."""
    mask = geometry.disk_mask(size)
    x0, y0 = max(int(disk.cx - disk.radius - 2), 0), max(int(disk.cy - disk.radius - 2), 0)
    x1 = min(int(disk.cx + disk.radius + 3), image.shape[1])
    y1 = min(int(disk.cy + disk.radius + 3), image.shape[0])
    crop = np.ascontiguousarray(image[y0:y1, x0:x1])
    local = Disk(disk.cx - x0, disk.cy - y0, disk.radius)
    # colour -> uptake at the native resolution, before any interpolation mixes colours
    uptake = colormaps.rgb_to_uptake(crop, table).astype(np.float32)
    uptake = _resample_disk(uptake, local, size, cv2.INTER_LINEAR)
    rgb = _resample_disk(crop, local, size, cv2.INTER_LINEAR)
    rgb[~mask] = 0
    uptake = np.where(mask, np.clip(uptake, 0.0, 1.0), 0.0).astype(np.float32)
    return rgb, uptake


def _colour_table(image, colormap, disk_pixels) -> np.ndarray:
    if colormap is not None:
        return colormaps.get_colormap(colormap)
    table = colormaps.colorbar_from_image(image)
    if table is not None and len(table) >= 16:
        table = _orient_table(table)
        named = colormaps.match_named(table)
        return colormaps.get_colormap(named) if named else table
    return colormaps.get_colormap(colormaps.best_colormap(disk_pixels))


def _disk_pixels(image: np.ndarray, disks) -> np.ndarray:
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    inside = np.zeros(image.shape[:2], bool)
    for d in disks:
        inside |= (xx - d.cx) ** 2 + (yy - d.cy) ** 2 < (0.9 * d.radius) ** 2
    return image[inside]


def _maps_from_image(image: np.ndarray, path: str, expected: int, colormap, size: int):
    disks = find_disks(image)
    if not disks:
        raise ValueError(f"{path}: no disk found")
    if len(disks) < expected:
        raise ValueError(f"{path}: one disk where {expected} (stress and rest) are expected")
    disks = disks[:expected]
    # stress left, rest right (top / bottom when the disks are stacked)
    if expected == 2:
        a, b = disks
        horizontal = abs(a.cx - b.cx) >= abs(a.cy - b.cy)
        disks.sort(key=(lambda d: d.cx) if horizontal else (lambda d: d.cy))
    table = _colour_table(image, colormap, _disk_pixels(image, disks))
    return [_canonical_maps(image, d, table, size) for d in disks]


def read_study_image(path, *, colormap=None, size: int = 128) -> Study:
    """One image holding the stress disk (left) and the rest disk (right).

    Colours map to uptake through the image's colour bar when present, else through the named
    colormap (or table) given, else through the known colormap nearest to the disk colours.
    """
    path = os.fspath(path)
    image = _imread_rgb(path)
    (s_rgb, s_up), (r_rgb, r_up) = _maps_from_image(image, path, 2, colormap, size)
    name = os.path.splitext(os.path.basename(path))[0]
    return Study(name, s_rgb, r_rgb, s_up, r_up, geometry.disk_mask(size).copy(), path=path)


def read_study_pair(stress_path, rest_path, *, colormap=None, size: int = 128) -> Study:
    """A study stored as two files, one disk each."""
    maps = []
    for p in (os.fspath(stress_path), os.fspath(rest_path)):
        maps.append(_maps_from_image(_imread_rgb(p), p, 1, colormap, size)[0])
    (s_rgb, s_up), (r_rgb, r_up) = maps
    name = os.path.splitext(os.path.basename(os.fspath(stress_path)))[0]
    mask = geometry.disk_mask(size).copy()
    return Study(name, s_rgb, r_rgb, s_up, r_up, mask, path=os.fspath(stress_path))


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
    return rgb, u


def study_from_arrays(stress, rest, *, colormap=None, size: int = 128, name="arrays", **meta):
    """A study from numpy arrays: (H,W) uptake polar maps or (H,W,3) RGB images of one disk."""
    s_rgb, s_up = _map_from_array(stress, colormap, size, f"{name} (stress)")
    r_rgb, r_up = _map_from_array(rest, colormap, size, f"{name} (rest)")
    return Study(name, s_rgb, r_rgb, s_up, r_up, geometry.disk_mask(size).copy(), **meta)


def parse_label(value: str, where: str) -> str:
    label = _LABEL_SYNONYMS.get(value.strip().lower(), value.strip().lower())
    if label not in LABELS:
        raise ValueError(f"{where}: unknown label {value!r}; expected one of {LABELS}")
    return label


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").replace(";", "+").split("+") if v.strip()]


def read_labels(labels_csv) -> list[dict]:
    """Rows of labels.csv: filename, label[, territories, segments, sex]; header optional."""
    labels_csv = os.fspath(labels_csv)
    if not os.path.exists(labels_csv):
        raise FileNotFoundError(f"{labels_csv}: no such labels file")
    with open(labels_csv, newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{labels_csv}: empty labels file")
    header = ["filename", "label", "territories", "segments", "sex"]
    if rows[0][0].strip().lower() in ("filename", "file", "image"):
        header = [c.strip().lower() for c in rows[0]]
        rows = rows[1:]
    out = []
    for line, row in enumerate(rows, start=2 if header else 1):
        rec = dict(zip(header, row, strict=False))
        where = f"{labels_csv} line {line}"
        if not rec.get("filename", "").strip() or "label" not in rec:
            raise ValueError(f"{where}: expected filename,label[,territories,segments]")
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
        out.append(
            dict(
                filename=rec["filename"].strip(),
                label=parse_label(rec["label"], where),
                territories=tuple(territories),
                segments=tuple(sorted(segments)),
                sex=sex if sex in ("M", "F") else None,
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


def read_study_folder(root, *, colormap=None, size: int = 128, progress: bool = False):
    """All studies of a folder: images/ + labels.csv (see SPEC.md). Returns list[Study]."""
    root = os.fspath(root)
    images_dir = os.path.join(root, "images")
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"{root}: no images/ folder")
    rows = read_labels(os.path.join(root, "labels.csv"))
    if progress:
        from tqdm import tqdm

        rows = tqdm(rows, desc=f"reading {root}", unit="study")
    studies = []
    for rec in rows:
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
        studies.append(study)
    return studies


def stack_studies(studies) -> dict[str, np.ndarray]:
    """Batch arrays of a list of studies: stress_rgb/rest_rgb (B,S,S,3), uptakes (B,S,S), y."""
    return dict(
        stress_rgb=np.stack([s.stress_rgb for s in studies]),
        rest_rgb=np.stack([s.rest_rgb for s in studies]),
        stress_uptake=np.stack([s.stress_uptake for s in studies]),
        rest_uptake=np.stack([s.rest_uptake for s in studies]),
        label=np.array([LABELS.index(s.label) if s.label else -1 for s in studies]),
    )
