"""Second stage: each detected point refined on a patch of the original, full-size frame.

The first stage sees the frame resized to its input (128-512 px), so on a 1024-px frame one
input pixel spans 2-8 frame pixels. The refiner cuts a small patch around each first-stage
point from the frame itself and finds the point in it, with every point of every frame in one
batched call (a gather and a few convolutions), so it runs inside the same compiled function.

Patches are sampled on a grid of `spacing` frame pixels per sample, `spacing = frame width /
REFERENCE_WIDTH`: a patch covers the same share of any frame, so one refiner serves 512- and
1024-px frames, at full resolution on a REFERENCE_WIDTH-px frame. Coordinates are frame
pixels (x, y) with pixel centres at half-integers, as everywhere in the project.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates

from tavr_jax.models.dense import cell_centres

PATCH = 48  # samples per patch side
REFERENCE_WIDTH = 512  # frame width at which one patch sample is one frame pixel


def patch_spacing(width) -> jax.Array:
    """Frame pixels per patch sample for frames `width` pixels wide."""
    return jnp.asarray(width, jnp.float32) / REFERENCE_WIDTH


def patch_offsets(size: int = PATCH) -> jax.Array:
    """(size,) sample offsets from the patch centre, in samples: symmetric, centre at 0."""
    return jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2.0


def extract_patches(frames, centres, spacing, *, size: int = PATCH) -> jax.Array:
    """(B, K, size, size) float32 bilinear samples of the frames around each centre.

    frames: (B, H, W) any dtype; centres: (B, K, 2) frame pixels (x, y); spacing: frame pixels
    per sample (a scalar or (B,)). Sample (i, j) of a patch lies at centre + (offset_j,
    offset_i) * spacing; samples outside the frame read 0.
    """
    frames = jnp.asarray(frames, jnp.float32)
    centres = jnp.asarray(centres, jnp.float32)
    spacing = jnp.broadcast_to(jnp.asarray(spacing, jnp.float32), frames.shape[:1])
    offsets = patch_offsets(size)

    def one(frame, c, s):  # (H, W), (K, 2), ()
        # pixel centres sit at half-integers, array indices at integers
        xs = c[:, 0:1] - 0.5 + offsets[None, :] * s  # (K, size)
        ys = c[:, 1:2] - 0.5 + offsets[None, :] * s
        rows = jnp.broadcast_to(ys[:, :, None], (c.shape[0], size, size))
        cols = jnp.broadcast_to(xs[:, None, :], (c.shape[0], size, size))
        return map_coordinates(frame, [rows, cols], order=1, mode="constant", cval=0.0)

    return jax.vmap(one)(frames, centres, spacing)


class PatchRefiner(nn.Module):
    """(N, P, P) patches and (N,) point indices -> (N, 2) (x, y) in samples from the centre.

    Each patch is standardised (zero mean, unit SD) so contrast and injection strength do not
    matter; a small convolutional trunk (stride 2, then dilated 3x3 convolutions that see the
    whole patch) gives one heatmap per point type at half the patch resolution, and the
    point's own map is decoded by a soft-argmax.
    """

    num_points: int
    width: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, patches, point_index):
        x = jnp.asarray(patches, jnp.float32)
        mean = x.mean(axis=(1, 2), keepdims=True)
        sd = x.std(axis=(1, 2), keepdims=True)
        x = ((x - mean) / (sd + 1.0))[..., None].astype(self.dtype)
        w = self.width
        x = nn.relu(nn.Conv(w, (3, 3), dtype=self.dtype, name="conv0")(x))
        x = nn.relu(nn.Conv(2 * w, (3, 3), strides=2, dtype=self.dtype, name="conv1")(x))
        for i, d in enumerate((1, 2, 4)):
            x = nn.relu(
                nn.Conv(2 * w, (3, 3), kernel_dilation=d, dtype=self.dtype, name=f"mix{i}")(x)
            )
        maps = nn.Conv(self.num_points, (1, 1), dtype=self.dtype, name="heatmap")(x)
        maps = maps.astype(jnp.float32)  # (N, h, w, K)
        n, hh, ww, _ = maps.shape
        own = jnp.take_along_axis(maps, point_index[:, None, None, None], axis=-1)[..., 0]
        probs = jax.nn.softmax(own.reshape(n, hh * ww), axis=-1).reshape(n, hh, ww)
        size = patches.shape[-1]
        # cell centres in [0, 1] of the patch -> samples from the patch centre
        x_pos = jnp.einsum("nhw,w->n", probs, cell_centres(ww)) * size - size / 2.0
        y_pos = jnp.einsum("nhw,h->n", probs, cell_centres(hh)) * size - size / 2.0
        return jnp.stack([x_pos, y_pos], axis=-1)


def refine_points(refiner, params, frames, coords, *, size: int = PATCH) -> jax.Array:
    """(B, K, 2) refined frame pixels: every point of every frame in one refiner call."""
    b, k, _ = coords.shape
    spacing = patch_spacing(frames.shape[-1])
    patches = extract_patches(frames, coords, spacing, size=size)  # (B, K, P, P)
    index = jnp.broadcast_to(jnp.arange(k), (b, k)).reshape(-1)
    offset = refiner.apply(params, patches.reshape(b * k, size, size), index)
    return coords + offset.reshape(b, k, 2) * spacing
