"""What a user checks first in a keypoint project: counts, sizes, patterns and a contact sheet."""

from __future__ import annotations

import collections
import json
import os
import pathlib

import cv2
import jax
import numpy as np

from cardiac_core.fileio import atomic_write_bytes
from tavr_jax import visualize
from tavr_jax.data import augment, supervisely
from tavr_jax.schema import KeypointSchema

# A contact sheet is for looking at: beyond 64 tiles of at most 384 px nobody sees more, and
# a sheet of every full-size frame of a project would take gigabytes of memory.
MAX_SHEET_FRAMES = 64
TILE_SIDE = 384
SHOWN_UNREADABLE = 5  # frames listed by path in the report; the count covers all of them


def presence_pattern(visible: np.ndarray, schema: KeypointSchema) -> str:
    """'anatomical+contour'-style name of the groups present in one frame ('none' if empty)."""
    present = schema.group_presence(visible)
    names = [g for g, p in zip(schema.group_names, present, strict=True) if p]
    return "+".join(names) if names else "none"


def project_stats(project: supervisely.Project) -> dict:
    """Counts of one read project (see docs/data.md for the keys)."""
    schema = project.schema
    frames = project.frames
    vis = np.array([f.visible for f in frames], bool).reshape(len(frames), schema.num_points)
    per_name = vis.sum(axis=0)
    per_group = vis.astype(np.int64) @ schema.group_matrix.T.astype(np.int64)
    sizes = collections.Counter(f"{f.height}x{f.width}" for f in frames)
    patterns = collections.Counter(presence_pattern(v, schema) for v in vis)
    stages = collections.Counter(f.stage for f in frames if f.stage is not None)
    counts = project.counts
    return {
        "schema": schema.name,
        "split": project.split,
        "n_cases": len(project.cases),
        "n_frames": len(frames),
        "cases": list(project.cases),
        "image_sizes": dict(sorted(sizes.items())),
        "points_per_name": {n: int(c) for n, c in zip(schema.point_names, per_name, strict=True)},
        "points_per_group": {
            g: int(c) for g, c in zip(schema.group_names, per_group.sum(axis=0), strict=True)
        },
        "frames_per_pattern": dict(sorted(patterns.items())),
        "frames_per_stage": dict(sorted(stages.items())),
        "dropped_points": counts["dropped_points"],
        "ignored_points": counts["ignored_points"],
        "dropped_per_name": counts["dropped_per_name"],
        "ignored_per_class": counts["ignored_per_class"],
        "unannotated_cases": list(project.unannotated_cases),
        "duplicate_frames": supervisely.duplicate_frames(project),
    }


def unreadable_frames(project: supervisely.Project, *, shown: int = SHOWN_UNREADABLE) -> dict:
    """Every frame decoded the way training reads it (`Project.load_image`: the pixel limit,
    truncated or non-image files, the annotation's size), one at a time.

    Returns {"unreadable_frames": count, "unreadable_examples": [{"frame", "path", "reason"}]
    of the first `shown`, "unreadable_indices"}: build_tfds and training refuse these frames,
    so a project is checked here first, before hours of building.
    """
    bad = []
    for i, f in enumerate(project.frames):
        try:
            project.load_image(i)
        except (ValueError, OSError) as e:
            bad.append((i, f, str(e).splitlines()[0] if str(e) else type(e).__name__))
    return {
        "unreadable_frames": len(bad),
        "unreadable_examples": [
            {"frame": f"{f.case_id}/{f.frame_name}", "path": str(f.image_path), "reason": r}
            for _, f, r in bad[:shown]
        ],
        "unreadable_indices": [i for i, _, _ in bad],
    }


def augmentation_erasures(project: supervisely.Project, *, draws: int = 20, seed: int = 0) -> dict:
    """Per point: how many of its visible labels lie within 1 px of their image's edge, and the
    fraction that the training augmentation (the default strengths, the schema's rules for
    entry points) makes invisible over `draws` random draws per frame.

    A point that augmentation erases often beside visible evidence is taught as absent where
    it is present: what the entry-point rule of `augment` is for (docs/training.md).
    """
    schema = project.schema
    vis = np.array([f.visible for f in project.frames], np.float32)
    # frames of any size, scaled to the square the pipeline resizes them to
    scale = np.array([[1.0 / f.width, 1.0 / f.height] for f in project.frames], np.float32)
    side = 512.0
    xy = np.array([f.coords for f in project.frames], np.float32) * scale[:, None] * side
    edge = np.minimum.reduce([xy[..., 0], xy[..., 1], side - xy[..., 0], side - xy[..., 1]])
    on_edge = (vis > 0) & (edge <= side * np.max(scale, axis=1, keepdims=True))  # <= 1 px
    config = augment.AugmentConfig.create(None)
    entry = tuple(int(i) for i in schema.entry_partner)

    @jax.jit
    def erased(key):
        params = augment.sample_params(key, len(vis), (int(side), int(side)), config)

        def one(c, v, s, a, f):
            matrix = augment.affine_matrix(s, a, f)
            return augment.warp_points(c, v, matrix, (side, side), entry)[1]

        kept = jax.vmap(one)(xy, vis, params["scale"], params["angle"], params["flip"])
        return ((vis > 0) & (kept == 0)).sum(axis=0)

    lost = sum(np.asarray(erased(jax.random.key(seed + d))) for d in range(draws))
    visible = vis.sum(axis=0)
    return {
        "on_image_edge_per_name": {
            n: int(c) for n, c in zip(schema.point_names, on_edge.sum(axis=0), strict=True)
        },
        "augmentation_erased_per_name": {
            n: (float(lost[i] / (draws * visible[i])) if visible[i] else None)
            for i, n in enumerate(schema.point_names)
        },
    }


def sample_frames(
    project: supervisely.Project, n: int, *, seed: int = 0, skip: frozenset = frozenset()
) -> list[int]:
    """Up to n frame indices, round-robin over presence patterns and cases so all kinds show;
    `skip`: indices never picked (unreadable frames)."""
    rng = np.random.default_rng(seed)
    by_pattern: dict[str, list[int]] = collections.defaultdict(list)
    for i, f in enumerate(project.frames):
        if i in skip:
            continue
        by_pattern[presence_pattern(f.visible, project.schema)].append(i)
    queues = []
    for key in sorted(by_pattern):
        idx = by_pattern[key]
        # one frame per case first, then the rest, each in a seeded order
        order = rng.permutation(len(idx))
        seen, first, rest = set(), [], []
        for j in order:
            case = project.frames[idx[j]].case_id
            (rest if case in seen else first).append(idx[j])
            seen.add(case)
        queues.append(first + rest)
    picked: list[int] = []
    while len(picked) < min(n, len(project.frames) - len(skip)):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return picked


def contact_sheet_image(
    project: supervisely.Project, indices: list[int], *, ncols: int = 4
) -> np.ndarray:
    """RGB grid of frames with their keypoints coloured by group and a group legend.

    Each frame is drawn at full size, then shrunk to at most `TILE_SIDE` pixels a side, so
    the memory it takes is bounded by the sheet, not by the frames.
    """
    tiles, titles = [], []
    for i in indices:
        f = project.frames[i]
        tile = visualize.draw_keypoints(project.load_image(i), f.coords, f.visible, project.schema)
        tile = visualize.draw_legend(tile, project.schema)
        scale = TILE_SIDE / max(tile.shape[:2])
        if scale < 1:
            size = (max(1, round(tile.shape[1] * scale)), max(1, round(tile.shape[0] * scale)))
            tile = cv2.resize(tile, size, interpolation=cv2.INTER_AREA)
        tiles.append(tile)
        titles.append(f"{f.case_id}/{f.frame_name}" + (f" {f.stage}" if f.stage else ""))
    return visualize.contact_sheet(tiles, ncols, titles=titles)


def write_png(path: os.PathLike, rgb: np.ndarray) -> pathlib.Path:
    path = pathlib.Path(path)
    ok, png = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise ValueError(f"{path}: PNG encoding failed")
    atomic_write_bytes(path, png.tobytes())
    return path


def write_contact_sheet(
    project: supervisely.Project,
    path: os.PathLike,
    *,
    n: int = 8,
    ncols: int = 4,
    seed: int = 0,
    skip: frozenset = frozenset(),
) -> pathlib.Path:
    """Writes a contact sheet of `n` (at most `MAX_SHEET_FRAMES`) sample frames as a PNG,
    none of the `skip` indices."""
    if len(project.frames) <= len(skip):
        raise ValueError(f"{project.root}: no frames in split {project.split!r}")
    if n < 1:
        raise ValueError(f"the contact sheet needs at least 1 frame, got {n}")
    n = min(n, MAX_SHEET_FRAMES)
    ncols = max(ncols, round(n**0.5))  # a large sheet stays roughly square
    picked = sample_frames(project, n, seed=seed, skip=skip)
    return write_png(path, contact_sheet_image(project, picked, ncols=ncols))


def write_stats(
    data: os.PathLike,
    out: os.PathLike,
    *,
    schema: KeypointSchema,
    split: str = "all",
    seed: int = 0,
    sheet_frames: int = 8,
    augment_draws: int = 20,
) -> tuple[pathlib.Path, pathlib.Path | None]:
    """Reads a project, writes its stats JSON at `out` and a contact sheet PNG beside it
    (with `augment_draws` > 0, also `augmentation_erasures`). Every frame is decoded: the
    ones training would refuse are counted in "unreadable_frames" (`unreadable_frames`) and
    left off the sheet (None when no frame is readable); the caller reports them."""
    out = pathlib.Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the path of the JSON file to write")
    project = supervisely.read_project(data, schema, split=split, seed=seed)
    if not project.frames:
        raise ValueError(f"{data}: split {split!r} has no frames")
    stats = project_stats(project)
    unreadable = unreadable_frames(project)
    skip = frozenset(unreadable.pop("unreadable_indices"))
    stats.update(unreadable)
    if augment_draws > 0:
        stats.update(augmentation_erasures(project, draws=augment_draws, seed=seed))
    atomic_write_bytes(out, (json.dumps(stats, indent=1) + "\n").encode())
    png = None
    if len(skip) < len(project.frames):  # no sheet of a project none of whose frames read
        png = write_contact_sheet(
            project, out.with_suffix(".png"), n=sheet_frames, seed=seed, skip=skip
        )
    return out, png
