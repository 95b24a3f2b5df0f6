"""Supervisely projects: the format real aortography annotations are exported in.

    PROJECT/meta.json                   optional: the class list
    PROJECT/<case>/img/<name>.png       one frame (grayscale or colour, any size)
    PROJECT/<case>/ann/<name>.png.json  {"size": {"height": H, "width": W}, "objects": [...]}

A point absent from "objects" is invisible. Case folders are patients: every split is by case.
Image size comes from the annotation (or the image itself), never from a constant.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Iterable, Sequence

import cv2
import numpy as np

from tavr_jax import dicom
from tavr_jax.fileio import atomic_write_bytes
from tavr_jax.schema import KeypointSchema

SPLITS = ("all", "train", "val", "test")
_SPLIT_ALIASES = {"validation": "val"}
# One colour per group index (hex), used in meta.json so the Supervisely UI shows groups apart.
_META_COLORS = ("#E69F00", "#56B4E9", "#009E73", "#CC79A7", "#F0E442", "#0072B2", "#D55E00")


@dataclasses.dataclass(frozen=True)
class FrameRecord:
    """One annotated frame; the image itself is read lazily from `image_path`."""

    case_id: str
    frame_name: str  # the image file name, e.g. "0007.png"
    image_path: pathlib.Path
    height: int
    width: int
    visibility: np.ndarray  # (K,) bool
    coords: np.ndarray  # (K, 2) float32 pixels (x, y); 0 where invisible
    pixel_spacing_mm: float | None = None
    stage: str | None = None


@dataclasses.dataclass
class AnnotatedFrame:
    """A frame held in memory, as written by `write_project`."""

    case_id: str
    frame_name: str
    image: np.ndarray  # (H, W) or (H, W, 3) uint8
    visibility: np.ndarray  # (K,) bool
    coords: np.ndarray  # (K, 2) pixels (x, y)
    pixel_spacing_mm: float | None = None
    stage: str | None = None


@dataclasses.dataclass
class Project:
    """The frames of one split of a Supervisely project, with what the reader dropped."""

    root: pathlib.Path
    schema: KeypointSchema
    split: str
    frames: list[FrameRecord]
    cases: list[str]
    dropped_points: collections.Counter  # point name -> points outside their image
    ignored_points: collections.Counter  # class title -> objects not in the schema
    duplicate_points: collections.Counter  # point name -> repeated objects (first kept)

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def counts(self) -> dict:
        return {
            "n_cases": len(self.cases),
            "n_frames": len(self.frames),
            "dropped_points": sum(self.dropped_points.values()),
            "ignored_points": sum(self.ignored_points.values()),
            "duplicate_points": sum(self.duplicate_points.values()),
            "dropped_per_name": dict(sorted(self.dropped_points.items())),
            "ignored_per_class": dict(sorted(self.ignored_points.items())),
        }

    def load_image(self, index: int) -> np.ndarray:
        """The frame as (H, W) uint8 grayscale."""
        record = self.frames[index]
        image = read_gray_image(record.image_path)
        if image.shape != (record.height, record.width):
            raise ValueError(
                f"{record.image_path}: image is {image.shape[1]}x{image.shape[0]} but its "
                f"annotation says {record.width}x{record.height}"
            )
        return image


def to_gray_uint8(image: np.ndarray, path) -> np.ndarray:
    """Any OpenCV-decoded image (gray/BGR/BGRA, 8 or 16 bit) -> (H, W) uint8.

    The one conversion used for training data and for inference inputs alike, so a frame looks
    the same to the network in both. 12/16-bit frames are windowed (robust percentiles), not
    truncated to their high bits.
    """
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.ndim != 2:
        raise ValueError(f"{path}: unexpected image shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    if image.dtype in (np.uint16, np.int16, np.float32):
        return dicom.window_to_uint8(image)
    raise ValueError(f"{path}: unexpected pixel type {image.dtype} (expected 8 or 16 bit)")


def read_gray_image(path: os.PathLike) -> np.ndarray:
    """Reads an image file as (H, W) uint8 grayscale; colour is converted, 16-bit windowed."""
    data = np.fromfile(path, np.uint8) if os.path.exists(path) else None
    if data is None:
        raise FileNotFoundError(f"{path}: image file not found")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise ValueError(f"{path}: unreadable or truncated image")
    return to_gray_uint8(image, path)


def split_cases(
    case_ids: Sequence[str], *, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.0
) -> dict[str, list[str]]:
    """Deterministic split of cases (patients) into train / val / test.

    Each non-zero fraction gets at least one case when there are enough cases to leave one for
    training, so a small project still has a held-out set.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"split fractions must be in [0, 1) and sum below 1: val={val_fraction}, "
            f"test={test_fraction}"
        )
    cases = sorted(set(case_ids))
    order = np.random.default_rng(seed).permutation(len(cases))
    shuffled = [cases[i] for i in order]

    def size(fraction: float, available: int) -> int:
        if fraction == 0 or available <= 1:
            return 0
        return min(max(1, round(fraction * len(cases))), available - 1)

    n_test = size(test_fraction, len(cases))
    n_val = size(val_fraction, len(cases) - n_test)
    return {
        "test": sorted(shuffled[:n_test]),
        "val": sorted(shuffled[n_test : n_test + n_val]),
        "train": sorted(shuffled[n_test + n_val :]),
    }


def _case_dirs(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / "ann").is_dir())


def _parse_point(obj: dict, ann_path: pathlib.Path, n: int) -> tuple[float, float]:
    try:
        exterior = obj["points"]["exterior"]
        x, y = (float(v) for v in exterior[0])
    except (KeyError, IndexError, TypeError, ValueError):
        raise ValueError(
            f"{ann_path}: malformed point in object {n} ({obj.get('classTitle')!r}): expected "
            '"points": {"exterior": [[x, y]]}'
        ) from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"{ann_path}: non-finite point in object {n} ({obj.get('classTitle')!r})")
    return x, y


def _tag(ann: dict, name: str):
    for tag in ann.get("tags", ()) or ():
        if isinstance(tag, dict) and tag.get("name") == name:
            return tag.get("value")
    return None


def read_annotation(
    ann_path: pathlib.Path, schema: KeypointSchema, case_id: str, counters: Sequence
) -> FrameRecord:
    """Parses one `<name>.png.json`; counters = (dropped, ignored, duplicate) Counters."""
    dropped, ignored, duplicate = counters
    frame_name = ann_path.name[: -len(".json")]
    image_path = ann_path.parent.parent / "img" / frame_name
    if not image_path.exists():
        raise FileNotFoundError(f"{ann_path}: its image {image_path} is missing")
    try:
        ann = json.loads(ann_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{ann_path}: unreadable annotation JSON ({e})") from None
    if not isinstance(ann, dict) or not isinstance(ann.get("objects"), list):
        raise ValueError(f'{ann_path}: annotation has no "objects" list')
    try:
        height, width = int(ann["size"]["height"]), int(ann["size"]["width"])
    except (KeyError, TypeError, ValueError):
        height, width = read_gray_image(image_path).shape
    names = {name: k for k, name in enumerate(schema.point_names)}
    visibility = np.zeros(schema.num_points, bool)
    coords = np.zeros((schema.num_points, 2), np.float32)
    for n, obj in enumerate(ann["objects"]):
        title = obj.get("classTitle") if isinstance(obj, dict) else None
        if title not in names or obj.get("geometryType", "point") != "point":
            ignored[str(title)] += 1
            continue
        x, y = _parse_point(obj, ann_path, n)
        k = names[title]
        if visibility[k]:
            duplicate[title] += 1
        elif 0 <= x < width and 0 <= y < height:
            visibility[k] = True
            coords[k] = x, y
        else:
            dropped[title] += 1
    spacing = _tag(ann, "pixel_spacing_mm")
    stage = _tag(ann, "stage")
    return FrameRecord(
        case_id=case_id,
        frame_name=frame_name,
        image_path=image_path,
        height=height,
        width=width,
        visibility=visibility,
        coords=coords,
        pixel_spacing_mm=float(spacing) if spacing not in (None, "") else None,
        stage=str(stage) if stage is not None else None,
    )


def read_project(
    root: os.PathLike,
    schema: KeypointSchema,
    *,
    split: str = "all",
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
) -> Project:
    """Reads the annotations of one split of a Supervisely project (images stay on disk)."""
    root = pathlib.Path(root)
    split = _SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: Supervisely project folder not found")
    case_dirs = _case_dirs(root)
    all_cases = [d.name for d in case_dirs]
    if split != "all":
        selected = set(
            split_cases(
                all_cases, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction
            )[split]
        )
        case_dirs = [d for d in case_dirs if d.name in selected]
    counters = (collections.Counter(), collections.Counter(), collections.Counter())
    frames = [
        read_annotation(ann, schema, d.name, counters)
        for d in case_dirs
        for ann in sorted((d / "ann").glob("*.json"))
    ]
    if not frames and split == "all":
        raise ValueError(f"{root}: empty project (no <case>/ann/*.json annotations found)")
    return Project(
        root=root,
        schema=schema,
        split=split,
        frames=frames,
        cases=sorted({f.case_id for f in frames}),
        dropped_points=counters[0],
        ignored_points=counters[1],
        duplicate_points=counters[2],
    )


def meta_json(schema: KeypointSchema) -> dict:
    colors = [_META_COLORS[g % len(_META_COLORS)] for g in schema.point_group]
    return {
        "classes": [
            {"title": name, "shape": "point", "color": color}
            for name, color in zip(schema.point_names, colors, strict=True)
        ],
        "tags": [
            {"name": "stage", "value_type": "any_string"},
            {"name": "pixel_spacing_mm", "value_type": "any_number"},
        ],
        "projectType": "images",
    }


class ProjectWriter:
    """Writes frames into a Supervisely project one at a time (atomic per file)."""

    def __init__(self, root: os.PathLike, schema: KeypointSchema):
        self.root = pathlib.Path(root)
        self.schema = schema
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(
            self.root / "meta.json", json.dumps(meta_json(schema), indent=1).encode()
        )

    def add(self, frame: AnnotatedFrame) -> None:
        image = np.asarray(frame.image)
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(
                f"frame {frame.case_id}/{frame.frame_name}: expected a uint8 (H, W) or (H, W, 3) "
                f"image, got {image.dtype} {image.shape}"
            )
        case = self.root / frame.case_id
        (case / "img").mkdir(parents=True, exist_ok=True)
        (case / "ann").mkdir(parents=True, exist_ok=True)
        ok, png = cv2.imencode(".png", image)
        if not ok:
            raise ValueError(f"frame {frame.case_id}/{frame.frame_name}: PNG encoding failed")
        atomic_write_bytes(case / "img" / frame.frame_name, png.tobytes())
        visibility = np.asarray(frame.visibility, bool)
        coords = np.asarray(frame.coords, np.float64)
        objects = [
            {
                "classTitle": name,
                "geometryType": "point",
                "points": {"exterior": [[float(x), float(y)]], "interior": []},
            }
            for name, vis, (x, y) in zip(self.schema.point_names, visibility, coords, strict=True)
            if vis
        ]
        tags = []
        if frame.stage is not None:
            tags.append({"name": "stage", "value": frame.stage})
        if frame.pixel_spacing_mm is not None:
            tags.append({"name": "pixel_spacing_mm", "value": float(frame.pixel_spacing_mm)})
        ann = {
            "size": {"height": int(image.shape[0]), "width": int(image.shape[1])},
            "tags": tags,
            "objects": objects,
        }
        atomic_write_bytes(case / "ann" / f"{frame.frame_name}.json", json.dumps(ann).encode())


def write_project(
    root: os.PathLike, schema: KeypointSchema, frames: Iterable[AnnotatedFrame]
) -> pathlib.Path:
    """Writes frames (arrays and keypoints) as a Supervisely project; returns its root."""
    writer = ProjectWriter(root, schema)
    for frame in frames:
        writer.add(frame)
    return writer.root
