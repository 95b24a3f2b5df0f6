"""Physics-based simulator of TAVR aortography and fluoroscopy frames with exact keypoints.

What it models (docs/data.md has the details and a picture):
- X-ray transmission by Beer-Lambert, I = I0 exp(-sum mu * length), through a per-case scene:
  a thorax (soft tissue, lungs, heart and diaphragm shadows, spine with vertebral bodies and
  pedicles, ribs), a contrast-filled aortic root (annulus, three sinuses of Valsalva, closed
  leaflets, sinotubular junction, curved ascending aorta, coronary ostia and arteries), a
  pigtail catheter with its loop in a sinus, a guidewire, the delivery system (shaft, capsule
  with marker band, nose cone) and a self-expanding valve frame (diamond lattice) that opens
  from its inflow edge as the capsule retracts.
- Quantum noise: detected counts are Poisson(lambda); we draw them by the normal approximation
  N(lambda, lambda), which is accurate for the counts here (lambda >~ 40 per pixel) and 5x faster
  than numpy's exact sampler. Then detector blur (Gaussian PSF), log display window,
  collimator shutters, image-intensifier vignetting and burned-in text (cv2.putText).
- A case is one patient and view (anatomy, zoom, in- and out-of-plane tilt, left/right mirror,
  dose); its frames are runs of a 15 frames/s cine through the procedure stages `STAGES`, with
  smooth cardiac and respiratory motion, so tracking can be tested on them.

Keypoints are exact by construction (projections of the 3D landmarks through the same transform
as the pixels; docs/data.md defines each); a point is visible when its structure is shown
(contrast for the anatomy, the device present) and it lies inside the exposed field.
Left/right pairs follow "left in the image is 1" in every view, mirrored or not.

Modules: `params` (case parameters, stage schedule), `anatomy` (geometry helpers, aortic
root, thorax), `devices` (catheters, delivery system, valve frame), `render` (one frame),
`truth` (the true guidance readouts of a frame: implantation depth per side, coaxiality angle,
spacing, contrast; a project has them in `GUIDANCE_TRUTH_FILE` at its root, one JSON line per
frame).

Schemas: point names are mapped by name to `SIMULATED_POINTS`. A schema naming points the
simulator cannot draw (e.g. 'reference10': FE1_o, EC1, CT1, ...) raises ValueError listing
them, unless `allow_missing=True`, in which case those points are always invisible.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import pathlib

import cv2
import numpy as np
from tqdm import tqdm

from cardiac_core.fileio import atomic_write_bytes
from tavr_jax.data import supervisely
from tavr_jax.data.simulate.params import (
    CONTRAST_VISIBLE,
    FPS,
    SIMULATED_POINTS,
    STAGES,
    CaseParams,
    FrameState,
    sample_case,
    sample_schedule,
)
from tavr_jax.data.simulate.render import CaseRenderer
from tavr_jax.data.simulate.truth import GUIDANCE_TRUTH_FILE, frame_truth
from tavr_jax.schema import KeypointSchema

__all__ = [
    "CONTRAST_VISIBLE",
    "FPS",
    "GUIDANCE_TRUTH_FILE",
    "SIMULATED_POINTS",
    "STAGES",
    "CaseParams",
    "CaseRenderer",
    "FrameState",
    "sample_case",
    "sample_schedule",
    "frame_truth",
    "simulate_case",
    "simulate_project",
    "write_cines",
]


def _schema_index(schema: KeypointSchema, allow_missing: bool) -> list[str | None]:
    missing = [n for n in schema.point_names if n not in SIMULATED_POINTS]
    if missing and not allow_missing:
        raise ValueError(
            f"schema {schema.name!r} has points the simulator cannot draw: {', '.join(missing)} "
            f"(it draws {', '.join(SIMULATED_POINTS)}); pass allow_missing=True to keep them "
            "always invisible"
        )
    return [n if n in SIMULATED_POINTS else None for n in schema.point_names]


def _to_schema(pts: dict, names: list[str | None], size: int):
    k = len(names)
    vis = np.zeros(k, bool)
    coords = np.zeros((k, 2), np.float32)
    for i, name in enumerate(names):
        if name is None:
            continue
        x, y, v = pts[name]
        if v and 0.0 <= x < size and 0.0 <= y < size:
            vis[i] = True
            coords[i] = x, y
    return vis, coords


def simulate_case(
    rng: np.random.Generator,
    schema: KeypointSchema,
    *,
    frames: int,
    size: int,
    allow_missing: bool = False,
    params: CaseParams | None = None,
    schedule: list[FrameState] | None = None,
    truth: list[dict] | None = None,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, str]]:
    """Simulates one case: a list of (image (S,S) uint8, visible (K,), coords (K,2), stage).

    `params` and `schedule` override the random draws (tests and figures use them). A list
    given as `truth` gets each frame's true guidance readouts appended (`truth.frame_truth`);
    they draw no random numbers, so the frames are the same with or without it.
    """
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    names = _schema_index(schema, allow_missing)
    params = params if params is not None else sample_case(rng, size)
    schedule = schedule if schedule is not None else sample_schedule(rng, frames)
    renderer = CaseRenderer(params, size)
    out = []
    for st in schedule[:frames]:
        img, pts = renderer.render(st, rng)
        vis, coords = _to_schema(pts, names, size)
        out.append((img, vis, coords, st.stage))
        if truth is not None:
            truth.append(frame_truth(renderer, st))
    return out


def simulate_project(
    out: os.PathLike,
    schema: KeypointSchema,
    *,
    cases: int,
    frames: int,
    size: int,
    seed: int,
    allow_missing: bool = False,
    progress: bool = True,
    workers: int = 1,
) -> pathlib.Path:
    """Writes `cases` simulated cases of `frames` frames as a Supervisely project at `out`.

    Case c draws from `np.random.default_rng([seed, c])` alone, so the project is the same
    bytes whatever the number of `workers` (processes, one case at a time each). The frames'
    true guidance readouts go to `out/GUIDANCE_TRUTH_FILE` (one JSON object a line, in case
    and frame order), written once all cases are.
    """
    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    _schema_index(schema, allow_missing)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    writer = supervisely.ProjectWriter(out, schema)
    write = functools.partial(
        _write_case,
        writer,
        frames=frames,
        size=size,
        seed=seed,
        allow_missing=allow_missing,
    )
    truth: dict[int, list[dict]] = {}
    with tqdm(
        total=cases * frames, desc="simulating frames", unit="frame", disable=not progress
    ) as bar:
        if workers == 1:
            for c in range(cases):
                c, rows = write(c)
                truth[c] = rows
                bar.update(len(rows))
        else:
            # spawn: the parent may hold threads (JAX, grain) that a fork would copy mid-state.
            context = multiprocessing.get_context("spawn")
            with context.Pool(
                min(workers, cases), initializer=cv2.setNumThreads, initargs=(1,)
            ) as pool:
                for c, rows in pool.imap_unordered(write, range(cases)):
                    truth[c] = rows
                    bar.update(len(rows))
    lines = [json.dumps(row) + "\n" for c in sorted(truth) for row in truth[c]]
    atomic_write_bytes(writer.root / GUIDANCE_TRUTH_FILE, "".join(lines).encode())
    return writer.root


def _write_case(
    writer, c: int, *, frames: int, size: int, seed: int, allow_missing: bool
) -> tuple[int, list[dict]]:
    """Simulates case c of a project and writes its frames; returns (c, their truth records)."""
    rng = np.random.default_rng([seed, c])  # a case does not depend on how many came before
    case_id = f"sim{seed:04d}_{c:05d}"
    params = sample_case(rng, size)
    truth: list[dict] = []
    case = simulate_case(
        rng,
        writer.schema,
        frames=frames,
        size=size,
        allow_missing=allow_missing,
        params=params,
        truth=truth,
    )
    rows = []
    for f, ((img, vis, coords, stage), row) in enumerate(zip(case, truth, strict=True)):
        frame_name = f"{f:04d}.png"
        writer.add(
            supervisely.AnnotatedFrame(
                case_id=case_id,
                frame_name=frame_name,
                image=img,
                visible=vis,
                coords=coords,
                pixel_spacing_mm=round(params.spacing_mm, 6),
                stage=stage,
            )
        )
        rows.append({"frame": f"{case_id}/img/{frame_name}", "case": case_id, **row})
    return c, rows


def write_cines(root, schema: KeypointSchema, folder) -> list[tuple[pathlib.Path, list[str]]]:
    """Each case of the simulated project at `root` as a DICOM cine in `folder` (its pixel
    spacing and the simulator's frame rate in the header), for the frame sources and the live
    replay: [(path, [the project-relative name of each frame, as the truth file has them])]."""
    from cardiac_core import dicom  # here: the spawned simulator workers need no pydicom

    project = supervisely.read_project(root, schema)
    by_case: dict[str, list[int]] = {}
    for i, frame in enumerate(project.frames):
        by_case.setdefault(frame.case_id, []).append(i)
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cines = []
    for case, rows in sorted(by_case.items()):
        images = np.stack([project.load_image(i) for i in rows])
        spacing = project.frames[rows[0]].pixel_spacing_mm
        path = dicom.write_test_cine(
            folder / f"{case}.dcm", images, frame_time_ms=1000.0 / FPS,
            pixel_spacing=None if spacing is None else (spacing, spacing),
        )  # fmt: skip
        cines.append((path, [f"{case}/img/{project.frames[i].frame_name}" for i in rows]))
    return cines
