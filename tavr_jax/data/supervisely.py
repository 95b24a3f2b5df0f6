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
import hashlib
import json
import logging
import math
import os
import pathlib
from collections.abc import Iterable, Sequence

import cv2
import numpy as np

from cardiac_core import images
from cardiac_core.fileio import atomic_write_bytes
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
    visible: np.ndarray  # (K,) bool: annotated and inside the frame
    coords: np.ndarray  # (K, 2) float32 pixels (x, y); 0 where invisible
    pixel_spacing_mm: float | None = None
    stage: str | None = None


@dataclasses.dataclass
class AnnotatedFrame:
    """A frame held in memory, as written by `write_project`."""

    case_id: str
    frame_name: str
    image: np.ndarray  # (H, W) or (H, W, 3) uint8
    visible: np.ndarray  # (K,) bool: annotated and inside the frame
    coords: np.ndarray  # (K, 2) pixels (x, y)
    pixel_spacing_mm: float | None = None
    stage: str | None = None
    point_tags: dict | None = None  # point name -> extra tags [{"name", "value"}] of its object
    frame_tags: list | None = None  # extra tags of the frame


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
    unannotated_cases: list[str] = dataclasses.field(default_factory=list)  # img/ without ann/

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def counts(self) -> dict:
        return {
            "n_cases": len(self.cases),
            "n_frames": len(self.frames),
            "dropped_points": sum(self.dropped_points.values()),
            "ignored_points": sum(self.ignored_points.values()),
            "unannotated_cases": len(self.unannotated_cases),
            "duplicate_points": sum(self.duplicate_points.values()),
            "dropped_per_name": dict(sorted(self.dropped_points.items())),
            "ignored_per_class": dict(sorted(self.ignored_points.items())),
        }

    def load_image(self, index: int) -> np.ndarray:
        """The frame as (H, W) uint8 grayscale."""
        record = self.frames[index]
        image = images.read_gray(record.image_path)
        if image.shape != (record.height, record.width):
            raise ValueError(
                f"{record.image_path}: image is {image.shape[1]}x{image.shape[0]} but its "
                f"annotation says {record.width}x{record.height}"
            )
        return image


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


def _case_dirs(root: pathlib.Path) -> tuple[list[pathlib.Path], list[str]]:
    """(case folders with ann/, names of folders with img/ but no ann/)."""
    cases, unannotated = [], []
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):
            continue  # a writer's hidden temporary (a case still being written), not a case
        if p.is_dir() and (p / "ann").is_dir():
            cases.append(p)
        elif p.is_dir() and (p / "img").is_dir():
            unannotated.append(p.name)
    return cases, unannotated


def _pixel_spacing(value, ann_path: pathlib.Path) -> float | None:
    """The pixel_spacing_mm tag as a positive float; an unusable value costs a warning only.

    A (row, column) pair, as DICOM's PixelSpacing is written, gives its column spacing.
    """
    if value in (None, ""):
        return None
    if isinstance(value, list | tuple) and value:
        value = value[-1]
    try:
        spacing = float(value)
    except (TypeError, ValueError):
        spacing = float("nan")
    if not (math.isfinite(spacing) and spacing > 0):
        logging.warning(
            "%s: ignoring tag pixel_spacing_mm=%r (not a positive number of mm)", ann_path, value
        )
        return None
    return spacing


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
        size = images.header_size(image_path)
        height, width = size if size is not None else images.read_gray(image_path).shape
    if height < 1 or width < 1:
        raise ValueError(f"{ann_path}: image size {width}x{height} is not positive")
    names = {name: k for k, name in enumerate(schema.point_names)}
    visible = np.zeros(schema.num_points, bool)
    coords = np.zeros((schema.num_points, 2), np.float32)
    for n, obj in enumerate(ann["objects"]):
        if not isinstance(obj, dict):
            raise ValueError(
                f'{ann_path}: "objects"[{n}] is {type(obj).__name__} {obj!r:.40}, not an object'
            )
        title = obj.get("classTitle")
        title = title if isinstance(title, str) else repr(title)
        if title not in names or obj.get("geometryType", "point") != "point":
            ignored[str(title)] += 1
            continue
        x, y = _parse_point(obj, ann_path, n)
        k = names[title]
        if visible[k]:
            duplicate[title] += 1
        elif 0 <= x < width and 0 <= y < height:
            visible[k] = True
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
        visible=visible,
        coords=coords,
        pixel_spacing_mm=_pixel_spacing(spacing, ann_path),
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
    case_dirs, unannotated = _case_dirs(root)
    if unannotated:
        logging.warning(
            "%s: skipping %d folder(s) with img/ but no ann/: %s",
            root,
            len(unannotated),
            ", ".join(unannotated[:10]) + (" ..." if len(unannotated) > 10 else ""),
        )
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
        unannotated_cases=unannotated,
    )


def duplicate_frames(project: Project) -> list[list[str]]:
    """Groups of frames whose image files are byte-identical across different cases.

    A copied case folder counts as another patient, so its frames could land in training and
    in validation alike; each group lists `case/frame` names, sorted.
    """
    by_hash: dict[str, list[FrameRecord]] = collections.defaultdict(list)
    for f in project.frames:
        try:
            data = f.image_path.read_bytes()
        except OSError:  # a folder or unreadable file: no copy of anything; load_image says why
            continue
        by_hash[hashlib.blake2b(data, digest_size=16).hexdigest()].append(f)
    groups = [
        sorted(f"{f.case_id}/{f.frame_name}" for f in fs)
        for fs in by_hash.values()
        if len({f.case_id for f in fs}) > 1
    ]
    return sorted(groups)


def warn_about_copies(project: Project, split_of_case: dict[str, str]) -> list[list[str]]:
    """Logs (and returns) the groups of identical frames that fall in different splits."""
    leaks = [
        group
        for group in duplicate_frames(project)
        if len({split_of_case.get(name.split("/")[0]) for name in group}) > 1
    ]
    if leaks:
        logging.warning(
            "%s: %d frame(s) appear in more than one split (copied case folders?), e.g. %s; "
            "validation and test figures would count frames seen in training",
            project.root,
            len(leaks),
            " = ".join(leaks[0]),
        )
    return leaks


def meta_json(schema: KeypointSchema, number_tags: Sequence[str] = ()) -> dict:
    """meta.json: the schema's point classes, the stage and spacing tags and `number_tags`."""
    colors = [_META_COLORS[g % len(_META_COLORS)] for g in schema.point_group]
    return {
        "classes": [
            {"title": name, "shape": "point", "color": color}
            for name, color in zip(schema.point_names, colors, strict=True)
        ],
        "tags": [
            {"name": "stage", "value_type": "any_string"},
            {"name": "pixel_spacing_mm", "value_type": "any_number"},
            *({"name": name, "value_type": "any_number"} for name in number_tags),
        ],
        "projectType": "images",
    }


class ProjectWriter:
    """Writes frames into a Supervisely project one at a time (atomic per file)."""

    def __init__(self, root: os.PathLike, schema: KeypointSchema, number_tags: Sequence[str] = ()):
        self.root = pathlib.Path(root)
        self.schema = schema
        self.root.mkdir(parents=True, exist_ok=True)
        meta = meta_json(schema, number_tags)
        atomic_write_bytes(self.root / "meta.json", json.dumps(meta, indent=1).encode())

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
        visible = np.asarray(frame.visible, bool)
        coords = np.asarray(frame.coords, np.float64)
        point_tags = frame.point_tags or {}
        objects = [
            {
                "classTitle": name,
                "geometryType": "point",
                "points": {"exterior": [[float(x), float(y)]], "interior": []},
                **({"tags": point_tags[name]} if name in point_tags else {}),
            }
            for name, vis, (x, y) in zip(self.schema.point_names, visible, coords, strict=True)
            if vis
        ]
        tags = list(frame.frame_tags or [])
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
