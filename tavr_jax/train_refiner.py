"""Train the second-stage patch refiner (`tavr_jax.models.refine`), and save and load it.

Training samples are (frame, visible point) pairs of a Supervisely project at full frame
resolution. Each patch is centred on the true point moved by a random error like the first
stage's (Gaussian, `jitter` samples SD, kept inside the patch), and the refiner learns to
find the true point: L1 on the (x, y) offset in patch samples. The first stage is not needed
to train it, so one refiner serves any first-stage run of the same schema.

Saved as W/refiner/: params.msgpack (flax serialization) and refiner.json (config, schema
point names); refiner.json is written last, so a folder without it is incomplete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from tqdm.auto import tqdm

from tavr_jax.fileio import atomic_write_bytes
from tavr_jax.models import refine


@dataclasses.dataclass(frozen=True)
class RefinerConfig:
    patch: int = refine.PATCH
    width: int = 16
    steps: int = 2000
    batch: int = 64
    learning_rate: float = 2e-3
    jitter: float = 8.0  # SD of the simulated first-stage error, in patch samples
    seed: int = 0


def project_arrays(project) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frames (N, H, W) uint8, visibility (N, K) bool, coords (N, K, 2) px) of a project
    whose frames share one size (a clear error names the first frame of another size)."""
    first = project.frames[0]
    for f in project.frames:
        if (f.height, f.width) != (first.height, first.width):
            raise ValueError(
                f"{f.image_path}: {f.width}x{f.height}, but the refiner trains on one frame "
                f"size ({first.width}x{first.height} from {first.image_path})"
            )
    frames = np.stack([project.load_image(i) for i in range(len(project.frames))])
    vis = np.stack([f.visibility for f in project.frames]).astype(bool)
    xy = np.stack([f.coords for f in project.frames]).astype(np.float32)
    return frames, vis, xy


def train_refiner(frames, visibility, coords, config: RefinerConfig = RefinerConfig(),
                  *, progress: bool = True):  # fmt: skip
    """(PatchRefiner, params, per-step losses) trained on the visible points of the frames."""
    frames = jnp.asarray(frames)
    n_points = visibility.shape[1]
    pairs = np.argwhere(visibility)  # (M, 2): frame, point
    if len(pairs) == 0:
        raise ValueError("no visible points to train the refiner on")
    model = refine.PatchRefiner(n_points, width=config.width)
    key = jax.random.PRNGKey(config.seed)
    dummy = jnp.zeros((1, config.patch, config.patch), jnp.float32)
    params = model.init(key, dummy, jnp.zeros((1,), jnp.int32))
    schedule = optax.cosine_onecycle_schedule(config.steps, config.learning_rate)
    optimizer = optax.adam(schedule)
    opt_state = optimizer.init(params)
    spacing = refine.patch_spacing(frames.shape[-1])
    coords = jnp.asarray(coords, jnp.float32)
    limit = config.patch / 2.0 - 4.0
    # Each sample reads a window just larger than its patch, not its whole frame.
    height, width = frames.shape[1:]
    side = min(int(np.ceil(config.patch * float(spacing))) + 4, height, width)

    def window(frame_idx, centre):
        origin = jnp.floor(centre - side / 2.0).astype(jnp.int32)
        ox = jnp.clip(origin[0], 0, width - side)
        oy = jnp.clip(origin[1], 0, height - side)
        crop = jax.lax.dynamic_slice(frames, (frame_idx, oy, ox), (1, side, side))[0]
        return crop, centre - jnp.stack([ox, oy]).astype(jnp.float32)

    @jax.jit
    def step(params, opt_state, frame_idx, point_idx, noise):
        truth = coords[frame_idx, point_idx]  # (N, 2)
        shift = jnp.clip(noise * config.jitter, -limit, limit)  # samples
        crops, centre = jax.vmap(window)(frame_idx, truth + shift * spacing)
        patches = refine.extract_patches(crops, centre[:, None, :], spacing, size=config.patch)
        patches = patches[:, 0]
        target = -shift

        def loss_fn(p):
            return jnp.mean(jnp.abs(model.apply(p, patches, point_idx) - target))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(config.seed)
    losses = []
    for _ in tqdm(range(config.steps), desc="refiner", unit="step", disable=not progress):
        pick = pairs[rng.integers(0, len(pairs), config.batch)]
        noise = rng.standard_normal((config.batch, 2)).astype(np.float32)
        params, opt_state, loss = step(params, opt_state, pick[:, 0], pick[:, 1], noise)
        losses.append(float(loss))
    return model, params, np.asarray(losses)


def save_refiner(directory, params, config: RefinerConfig, point_names, *, validation=None):
    """Writes the refiner folder; `validation`: {"mean_error_before", "mean_error_after"} of
    the first stage's validation cases (px at 1024), which `workdir_refiner` warns on."""
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "refiner.json").unlink(missing_ok=True)
    atomic_write_bytes(d / "params.msgpack", serialization.to_bytes(params))
    meta = {"config": dataclasses.asdict(config), "points": list(point_names)}
    if validation is not None:
        meta["validation"] = validation
    atomic_write_bytes(d / "refiner.json", json.dumps(meta, indent=1).encode())


def load_refiner(directory, point_names=None):
    """(PatchRefiner, params, RefinerConfig) from `save_refiner`'s folder; `point_names`, when
    given, must be the schema's the refiner was trained on."""
    return _load(directory, point_names)[:3]


def _load(directory, point_names):
    """`load_refiner`'s three, and refiner.json's `validation` ({} when absent)."""
    d = pathlib.Path(directory)
    if not (d / "refiner.json").is_file():
        raise FileNotFoundError(f"{d}: no refiner.json (not a refiner folder, or incomplete)")
    try:
        meta = json.loads((d / "refiner.json").read_text())
        config = RefinerConfig(**meta["config"])
        validation = meta.get("validation") or {}
        before, after = validation.get("mean_error_before"), validation.get("mean_error_after")
        if not all(v is None or isinstance(v, int | float) for v in (before, after)):
            raise TypeError(f"validation errors {before!r}, {after!r} are not numbers")
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{d / 'refiner.json'}: unreadable ({e}); retrain the refiner") from None
    if point_names is not None and list(point_names) != meta["points"]:
        raise ValueError(f"{d}: refiner trained for points {meta['points']}, not {point_names}")
    model = refine.PatchRefiner(len(meta["points"]), width=config.width)
    dummy = jnp.zeros((1, config.patch, config.patch), jnp.float32)
    template = model.init(jax.random.PRNGKey(0), dummy, jnp.zeros((1,), jnp.int32))
    try:
        params = serialization.from_bytes(template, (d / "params.msgpack").read_bytes())
    except OSError:
        raise
    except Exception as e:  # msgpack and flax raise their own types for a broken file
        raise ValueError(f"{d / 'params.msgpack'}: unreadable ({e}); retrain the refiner") from None
    return model, params, config, validation


def workdir_refiner(workdir, point_names) -> tuple:
    """(PatchRefiner, params, patch size) of W/refiner, as `KeypointEngine(refiner=...)` takes.

    Warns when the refiner made the error of this workdir's first stage worse on its
    validation cases: a first stage that is already finer than the refiner's own floor.
    """
    d = pathlib.Path(workdir) / "refiner"
    model, params, config, check = _load(d, point_names)
    before, after = check.get("mean_error_before"), check.get("mean_error_after")
    if before is not None and after is not None and after >= before:
        logging.warning(
            "%s: on the first stage's validation cases the refiner raised the mean error "
            "(%.1f -> %.1f px at 1024); this first stage does better without --refine",
            d, before, after,
        )  # fmt: skip
    return model, params, config.patch
