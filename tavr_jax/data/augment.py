"""On-device augmentation of training batches: jit-compiled, vmapped over the batch.

Geometry: one random affine per frame (scale and rotation about the image centre, horizontal
flip) is applied to the image by a single inverse-mapped bilinear sample and to the keypoints
by the forward map; a flip also swaps left/right point indices with `schema.flip_permutation`.
Points that leave the image become invisible (visible 0, coords 0), except the schema's
entry points (where the catheter enters the field of view): the catheter still enters the
zoomed or rotated image, at its edge, so the point moves there along the segment to the next
point of the catheter, as long as that one is in the image.
Photometric: brightness/contrast, Gaussian blur (separable), Gaussian noise.

Coordinates are continuous pixels of the S x S input: pixel (row i, column j) covers
[j, j+1) x [i, i+1), its centre is (j + 0.5, i + 0.5), the image centre is (S/2, S/2) and a
horizontal flip maps x to S - x. A visible point lies in [0, S).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from tavr_jax.schema import KeypointSchema


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths; the defaults are the paper's (section 3.2)."""

    brightness: tuple[float, float] = (0.8, 1.2)  # multiplicative factor range
    contrast: tuple[float, float] = (0.8, 1.2)  # factor range about the frame's mean
    blur_prob: float = 0.3
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels
    noise_prob: float = 0.2
    noise_std: tuple[float, float] = (2.0, 8.0)  # grey levels of 0..255
    scale: float = 0.3  # zoom factor drawn from [1 - scale, 1 + scale]
    rotation_sigma_deg: float = 40.0
    rotation_prob: float = 0.8
    flip_prob: float = 0.5

    @classmethod
    def identity(cls) -> AugmentConfig:
        """A config that changes nothing (useful for evaluation and tests)."""
        return cls(
            brightness=(1.0, 1.0),
            contrast=(1.0, 1.0),
            blur_prob=0.0,
            noise_prob=0.0,
            scale=0.0,
            rotation_prob=0.0,
            flip_prob=0.0,
        )

    @classmethod
    def create(cls, config: AugmentConfig | Mapping | None = None) -> AugmentConfig:
        """From an AugmentConfig, a dict or an ml_collections ConfigDict (unknown keys fail)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        items = dict(config.items()) if hasattr(config, "items") else None
        if items is None:
            raise ValueError(f"augmentation config must be a mapping, got {type(config).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(items) - fields)
        if unknown:
            raise ValueError(
                f"unknown augmentation config keys {unknown}; known: {', '.join(sorted(fields))}"
            )
        items = {
            k: tuple(float(x) for x in v) if isinstance(v, list | tuple) else float(v)
            for k, v in items.items()
        }
        return cls(**items)

    @property
    def blur_radius(self) -> int:
        """Half-width of the fixed blur kernel: 3 sigma of the largest sigma drawn."""
        return max(1, math.ceil(3.0 * self.blur_sigma[1]))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def sample_params(rng: jax.Array, batch_size: int, image_shape: tuple[int, int], config) -> dict:
    """Draws per-frame augmentation parameters: (B,) arrays, and a (B, H, W) noise field."""
    # Three random calls in all: each call site costs seconds of XLA compile time on CPU.
    k_uniform, k_angle, k_noise = jax.random.split(rng, 3)
    u = jax.random.uniform(k_uniform, (9, batch_size))
    between = lambda v, lo_hi: lo_hi[0] + v * (lo_hi[1] - lo_hi[0])
    angle = jnp.deg2rad(config.rotation_sigma_deg) * jax.random.normal(k_angle, (batch_size,))
    return {
        "scale": between(u[0], (1.0 - config.scale, 1.0 + config.scale)),
        "angle": jnp.where(u[1] < config.rotation_prob, angle, 0.0),
        "flip": u[2] < config.flip_prob,
        "brightness": between(u[3], config.brightness),
        "contrast": between(u[4], config.contrast),
        # sigma 0 means no blur: the kernel degenerates to a delta.
        "blur_sigma": jnp.where(u[5] < config.blur_prob, between(u[6], config.blur_sigma), 0.0),
        "noise_std": jnp.where(u[7] < config.noise_prob, between(u[8], config.noise_std), 0.0),
        "noise": jax.random.normal(k_noise, (batch_size, *image_shape)),
    }


def affine_matrix(scale, angle, flip) -> jax.Array:
    """(2, 2) forward linear part: p' = c + A (p - c); flip first, then rotate, then scale."""
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    rotation = jnp.array([[cos, -sin], [sin, cos]])
    mirror = jnp.diag(jnp.array([jnp.where(flip, -1.0, 1.0), 1.0]))
    return scale * rotation @ mirror


def _inverse_2x2(m: jax.Array) -> jax.Array:
    det = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
    return jnp.array([[m[1, 1], -m[0, 1]], [-m[1, 0], m[0, 0]]]) / det


def warp_image(image: jax.Array, matrix: jax.Array) -> jax.Array:
    """(S, S) image warped by p' = c + A (p - c) with one bilinear inverse-mapped sample."""
    h, w = image.shape
    centre = jnp.array([[[w / 2.0, h / 2.0]]])  # (1, 1, 2)
    ys, xs = jnp.meshgrid(jnp.arange(h) + 0.5, jnp.arange(w) + 0.5, indexing="ij")
    out_xy = jnp.stack([xs, ys], -1) - centre  # (S, S, 2) output pixel centres
    src_xy = out_xy @ _inverse_2x2(matrix).T + centre
    # map_coordinates indexes pixel centres at integers: subtract the half pixel.
    rows, cols = src_xy[..., 1] - 0.5, src_xy[..., 0] - 0.5
    return jax.scipy.ndimage.map_coordinates(image, [rows, cols], order=1, mode="constant")


def warp_points(
    coords: jax.Array,
    visible: jax.Array,
    matrix: jax.Array,
    size: tuple[int, int],
    entry_partner: tuple[int, ...] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(K, 2) coords under the same affine; points leaving [0, W) x [0, H) become invisible.

    entry_partner: (K,) the next point along the curve of each entry point, -1 for others
    (`KeypointSchema.entry_partner`). An entry point that leaves while its partner stays in
    the image moves to where the segment between them crosses the image's edge.
    """
    h, w = size
    centre = jnp.array([[w / 2.0, h / 2.0]])  # (1, 2)
    moved = (coords - centre) @ matrix.T + centre
    inside = (moved[:, 0] >= 0) & (moved[:, 0] < w) & (moved[:, 1] >= 0) & (moved[:, 1] < h)
    kept = (visible > 0) & inside
    if entry_partner is not None and max(entry_partner) >= 0:
        partner = jnp.maximum(jnp.asarray(entry_partner), 0)
        pushed_out = (jnp.asarray(entry_partner) >= 0) & (visible > 0) & ~inside
        pushed_out = pushed_out & kept[partner]
        # the smallest t in [0, 1] that puts p + t (q - p) inside, per axis, then over both
        p, d = moved, moved[partner] - moved
        last = jnp.array([[w, h]], moved.dtype) - 1e-3  # (1, 2): inside is < w, < h
        step = jnp.where(d == 0, 1.0, d)  # d is not 0 on an axis where p is out and q is in
        below, above = jnp.where(p < 0, -p / step, 0.0), jnp.where(p > last, (last - p) / step, 0.0)
        t = jnp.maximum(below, above)
        edge = p + jnp.clip(t.max(axis=-1), 0.0, 1.0)[:, None] * d
        moved = jnp.where(pushed_out[:, None], edge, moved)
        kept = kept | pushed_out
    return jnp.where(kept[:, None], moved, 0.0), kept.astype(jnp.float32)


def gaussian_blur(image: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
    """Separable Gaussian blur with a fixed (2 radius + 1)-tap kernel, edges replicated.

    sigma <= 0 returns the image unchanged (the kernel is a delta), so the blur decision can be
    data-dependent under jit.
    """
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    safe = jnp.maximum(sigma, 1e-3)
    kernel = jnp.exp(-0.5 * (taps / safe) ** 2)
    kernel = jnp.where(sigma > 0, kernel, (taps == 0).astype(jnp.float32))
    kernel = kernel / kernel.sum()
    h, w = image.shape
    padded = jnp.pad(image, radius, mode="edge")
    # A short sum of shifted copies fuses into one elementwise pass: 36x faster on CPU than a
    # grouped convolution with per-frame kernels, and vmaps trivially.
    rows = sum(kernel[t] * padded[t : t + h, :] for t in range(2 * radius + 1))
    return sum(kernel[t] * rows[:, t : t + w] for t in range(2 * radius + 1))


def brightness_contrast(image: jax.Array, brightness, contrast) -> jax.Array:
    """Contrast about the frame's mean grey level, then a brightness factor."""
    mean = image.mean()
    return ((image - mean) * contrast + mean) * brightness


def _augment_one(params, image, visible, coords, *, flip_perm, entry_partner, radius):
    image = image.astype(jnp.float32)
    matrix = affine_matrix(params["scale"], params["angle"], params["flip"])
    image = warp_image(image, matrix)
    coords, visible = warp_points(coords, visible, matrix, image.shape, entry_partner)
    # Point i of a flipped frame is point flip_perm[i] of the original (AA1 <-> AA2 ...).
    perm = jnp.where(params["flip"], jnp.asarray(flip_perm), jnp.arange(len(flip_perm)))
    coords, visible = coords[perm], visible[perm]
    image = brightness_contrast(image, params["brightness"], params["contrast"])
    image = gaussian_blur(image, params["blur_sigma"], radius)
    image = image + params["noise_std"] * params["noise"]
    return jnp.clip(image, 0.0, 255.0), visible, coords


@functools.partial(jax.jit, static_argnames=("flip_perm", "entry_partner", "radius"))
def apply_augmentation(
    batch: dict,
    params: dict,
    *,
    flip_perm: tuple[int, ...],
    radius: int,
    entry_partner: tuple[int, ...] | None = None,
):
    """Applies given per-frame parameters (from `sample_params`) to a batch."""
    one = functools.partial(
        _augment_one, flip_perm=flip_perm, entry_partner=entry_partner, radius=radius
    )
    image, visible, coords = jax.vmap(one)(
        params, batch["image"], batch["visible"], batch["coords"]
    )
    return {**batch, "image": image, "visible": visible, "coords": coords}


@functools.partial(jax.jit, static_argnames=("flip_perm", "entry_partner", "config"))
def _augment_batch(rng, batch, *, flip_perm, entry_partner, config):
    params = sample_params(rng, batch["image"].shape[0], batch["image"].shape[1:], config)
    return apply_augmentation(batch, params, flip_perm=flip_perm, radius=config.blur_radius,
                              entry_partner=entry_partner)  # fmt: skip


_AUGMENTED = ("image", "visible", "coords")


def augment_batch(
    rng: jax.Array,
    batch: Mapping,
    schema: KeypointSchema,
    config: AugmentConfig | Mapping | None = None,
) -> dict:
    """Randomly augments a training batch on the device.

    Args:
      rng: a JAX PRNG key (fold in the step number for a new draw each step).
      batch: dict with image (B, S, S) uint8 or float, visible (B, K), coords (B, K, 2);
        other keys pass through unchanged.
      schema: gives the horizontal-flip permutation of the points and its entry points.
      config: AugmentConfig, dict or ConfigDict (None: the paper's defaults).

    Returns:
      The batch with image (B, S, S) float32 in 0..255, visible (B, K) float32 and
      coords (B, K, 2) float32 transformed.
    """
    config = AugmentConfig.create(config)
    flip_perm = tuple(int(i) for i in np.asarray(schema.flip_permutation))
    entry = tuple(int(i) for i in schema.entry_partner)
    # Only the augmented arrays enter the computation; ids or sizes pass through untouched.
    arrays = {key: batch[key] for key in _AUGMENTED}
    augmented = _augment_batch(rng, arrays, flip_perm=flip_perm, entry_partner=entry, config=config)
    return {**batch, **augmented}
