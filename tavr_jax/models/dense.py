"""Dense localisation: a feature-pyramid neck to stride-4 heatmaps, and sub-pixel decoding.

Coordinates follow the rest of the project: normalised (x, y) in [0, 1] of the network input,
heatmap cell (i, j) of an h x w map standing for the position ((j + 0.5) / w, (i + 0.5) / h),
so a map of any stride decodes to the same frame of reference as the regression heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision-style initialisation of the neck's convolutions, as in the backbones.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def cell_centres(n: int) -> jax.Array:
    """(n,) normalised centres of n cells along one axis: (j + 0.5) / n."""
    return (jnp.arange(n, dtype=jnp.float32) + 0.5) / n


def local_soft_argmax(heatmaps: jax.Array, *, radius: int = 2) -> jax.Array:
    """(B, h, w, K) logits -> (B, K, 2) normalised (x, y): soft-argmax near the strongest cell.

    The softmax is taken over the (2 radius + 1)^2 cells around each map's argmax only, so
    mass far from the peak (a second candidate, background) cannot pull the estimate, while
    the weighted mean of the window gives a position finer than one cell. Gradients flow to
    the logits of the window; the argmax itself is a constant.
    """
    b, hh, ww, k = heatmaps.shape
    logits = jnp.moveaxis(heatmaps.astype(jnp.float32), -1, 1)  # (B, K, h, w)
    peak = jnp.argmax(logits.reshape(b, k, hh * ww), axis=-1)
    row, col = jax.lax.stop_gradient(peak // ww), jax.lax.stop_gradient(peak % ww)  # (B, K)
    near_row = jnp.abs(jnp.arange(hh)[None, None, :] - row[..., None]) <= radius  # (B, K, h)
    near_col = jnp.abs(jnp.arange(ww)[None, None, :] - col[..., None]) <= radius  # (B, K, w)
    window = near_row[..., :, None] & near_col[..., None, :]  # (B, K, h, w)
    z = jnp.where(window, logits, -jnp.inf).reshape(b, k, hh * ww)
    probs = jax.nn.softmax(z, axis=-1).reshape(b, k, hh, ww)
    x = jnp.einsum("bkhw,w->bk", probs, cell_centres(ww))
    y = jnp.einsum("bkhw,h->bk", probs, cell_centres(hh))
    return jnp.stack([x, y], axis=-1)


class FeaturePyramidNeck(nn.Module):
    """Top-down fusion of backbone stages (fine to coarse) into one map at the finest stride.

    Each stage gets a 1x1 lateral projection to `width` channels; from the coarsest down, the
    running map is upsampled (bilinear) to the next stage's size, added to its lateral and
    mixed by a 3x3 convolution with ReLU. The coarse stages say which structure a point
    belongs to, the fine ones where its edges are.
    """

    width: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, stages: Sequence[jax.Array]) -> jax.Array:
        conv = lambda f, k, name: nn.Conv(  # noqa: E731
            f, (k, k), padding=k // 2, dtype=self.dtype, kernel_init=_conv_init, name=name
        )
        levels = len(stages)
        x = conv(self.width, 1, f"lateral_{levels - 1}")(stages[-1])
        for i in range(levels - 2, -1, -1):
            fine = stages[i]
            b, h, w, _ = fine.shape
            x = jax.image.resize(x, (b, h, w, x.shape[-1]), "bilinear")
            x = x + conv(self.width, 1, f"lateral_{i}")(fine)
            x = nn.relu(conv(self.width, 3, f"smooth_{i}")(x))
        return x
