"""Train the second-stage patch refiner (`tavr_jax.models.refine`).

Training samples are (frame, visible point) pairs of a Supervisely project at full frame
resolution. Each patch is centred on the true point moved by a random error like the first
stage's (Gaussian, `jitter` samples SD, kept inside the patch), and the refiner learns to
find the true point: L1 on the (x, y) offset in patch samples. The first stage is not needed
to train it, so one refiner serves any first-stage run of the same schema.

Its folder in a run is written and read by `tavr_jax.run.refiner`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from tavr_jax.models import refine
from tavr_jax.run.refiner import RefinerConfig


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
    visible = np.stack([f.visible for f in project.frames]).astype(bool)
    xy = np.stack([f.coords for f in project.frames]).astype(np.float32)
    return frames, visible, xy


def train_refiner(frames, visible, coords, config: RefinerConfig = RefinerConfig(),
                  *, progress: bool = True):  # fmt: skip
    """(PatchRefiner, params, per-step losses) trained on the visible points of the frames."""
    frames = jnp.asarray(frames)
    n_points = visible.shape[1]
    pairs = np.argwhere(visible)  # (M, 2): frame, point
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
