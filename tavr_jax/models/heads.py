"""Keypoint heads: the paper's grouped regression head, a DSNT-style integral head and a
dense stride-4 heatmap head.

All return the model's output dict (see docs/architecture.md):
`group_logits (B, G)`, `visibility_logits (B, K)`, `coords (B, K, 2)` in [0, 1]; the heatmap
head adds `heatmap_logits (B, h, w, K)` for its loss. Heads with `multiscale = True` take the
backbone's stages (fine to coarse) instead of its last feature map.

The two heads with heatmaps can add each point's heatmap evidence to its visibility logit
(`dense_visibility`, `heatmap_evidence`): the pooled branch alone left a small instrument
(the deployed frame's edges) at its prior in CPU-scale training, while its heatmap already
found it (docs/accuracy.md).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tavr_jax.models.dense import FeaturePyramidNeck, local_soft_argmax
from tavr_jax.schema import KeypointSchema

SHARED_WIDTH = 512
HEAD_WIDTH = 256
DROPOUT = 0.3


def padded_to_points(schema: KeypointSchema) -> np.ndarray:
    """(K,) int: the flat position `g * M + m` of each point in the padded (G, M) layout."""
    index, valid = schema.padded_index
    flat = np.zeros(schema.num_points, np.int32)
    flat[index[valid]] = np.flatnonzero(valid)
    return flat


def group_max(point_logits: jax.Array, schema: KeypointSchema) -> jax.Array:
    """(B, K) -> (B, G): the largest logit among each group's points (groups are never empty)."""
    member = jnp.asarray(schema.group_matrix > 0)  # (G, K)
    return jnp.max(jnp.where(member[None], point_logits[:, None, :], -jnp.inf), axis=-1)


class SharedBlock(nn.Module):
    """Linear(512) + LayerNorm + ReLU + Dropout(0.3), shared by all tasks (paper 3.1)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pooled, train: bool = False):
        h = nn.Dense(SHARED_WIDTH, dtype=self.dtype, name="dense")(pooled)
        h = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(h)  # torch's eps
        h = nn.relu(h)
        return nn.Dropout(DROPOUT, deterministic=not train)(h)


class PointHead(nn.Module):
    """Linear(256) -> ReLU -> Linear(out): one group's head (or the single ungrouped head)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        h = nn.relu(nn.Dense(HEAD_WIDTH, dtype=self.dtype, name="hidden")(h))
        return nn.Dense(self.features, dtype=self.dtype, name="out")(h)


def _group_heads(num_groups: int):
    # One module whose parameters carry a leading group axis (G, ...); every group sees the
    # same shared features (in_axes=None) and the outputs stack on axis 1: (B, G, features).
    return nn.vmap(
        PointHead,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=None,
        out_axes=1,
        axis_size=num_groups,
    )


class PointOutputs(nn.Module):
    """Per-point outputs from the shared features: `per_point` numbers for each of the K points.

    grouped=True: one vmapped head per group, each giving `per_point * M` numbers (groups
    padded to the largest size M; padded slots are computed and dropped by the gather).
    grouped=False: one head giving `per_point * K` numbers.
    Returns (B, K, per_point).
    """

    schema: KeypointSchema
    per_point: int
    grouped: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        b = h.shape[0]
        if not self.grouped:
            out = PointHead(self.per_point * self.schema.num_points, self.dtype, name="point_head")(
                h
            )
            return out.reshape(b, self.schema.num_points, self.per_point)
        g, m = self.schema.num_groups, self.schema.max_group_size
        out = _group_heads(g)(self.per_point * m, self.dtype, name="group_heads")(h)  # (B, G, pM)
        out = out.reshape(b, g * m, self.per_point)
        return out[:, padded_to_points(self.schema)]


class RegressionHead(nn.Module):
    """The paper's head: (visibility logit, x, y) per point regressed from the pooled vector."""

    multiscale = False
    schema: KeypointSchema
    grouped: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features, train: bool = False):
        pooled = jnp.mean(features, axis=(1, 2))
        h = SharedBlock(self.dtype, name="shared")(pooled, train)
        out = PointOutputs(self.schema, 3, self.grouped, self.dtype, name="points")(h)
        out = out.astype(jnp.float32)
        visibility = out[..., 0]
        # Sigmoid keeps predictions inside the frame, where every supervised (visible) point
        # lies, and starts training at the image centre with bounded pixel errors, which keeps
        # the Wing loss (tuned for pixel errors) in its sensible range from the first step.
        coords = nn.sigmoid(out[..., 1:3])
        return _outputs(h, visibility, coords, self.schema, self.grouped, self.dtype)


def soft_argmax(heatmaps: jax.Array) -> jax.Array:
    """(B, h, w, K) logits -> (B, K, 2) expected (x, y) in [0, 1] under a spatial softmax.

    Cell (i, j) stands for the pixel-centre position ((j + 0.5) / w, (i + 0.5) / h), so a
    one-hot heatmap gives the centre of its cell in normalised image coordinates.
    """
    b, hh, ww, k = heatmaps.shape
    probs = jax.nn.softmax(heatmaps.astype(jnp.float32).reshape(b, hh * ww, k), axis=1)
    probs = probs.reshape(b, hh, ww, k)
    xs = (jnp.arange(ww, dtype=jnp.float32) + 0.5) / ww
    ys = (jnp.arange(hh, dtype=jnp.float32) + 0.5) / hh
    x = jnp.einsum("bhwk,w->bk", probs, xs)
    y = jnp.einsum("bhwk,h->bk", probs, ys)
    return jnp.stack([x, y], axis=-1)


def heatmap_evidence(heatmaps: jax.Array) -> jax.Array:
    """(B, h, w, K) logits -> (B, K): the log-mean-exp of each point's map over its cells.

    Added to a visibility logit, it makes the heatmap say whether its point is there as well
    as where: the localisation loss sees only the softmax (the map's shape), so the level of
    the map is free to carry presence, and a map that fires anywhere (the max-like end of
    log-sum-exp) raises it. A flat map of zeros gives exactly 0, so at initialisation the
    visibility is the pooled branch's alone.
    """
    b, hh, ww, k = heatmaps.shape
    flat = heatmaps.astype(jnp.float32).reshape(b, hh * ww, k)
    return jax.nn.logsumexp(flat, axis=1) - np.log(hh * ww)


class IntegralHead(nn.Module):
    """Integral (soft-argmax) regression: one heatmap per point from the last feature map.

    Group and visibility logits come from the pooled branch exactly as in `RegressionHead`;
    coordinates are the expectation of a spatial softmax over a heatmap made by a 3x3 conv,
    one 2x bilinear upsampling (finer grid than the backbone's stride) and a 1x1 conv to K maps.
    """

    multiscale = False
    schema: KeypointSchema
    grouped: bool = True
    hidden: int = 128
    upsample: int = 2
    dense_visibility: bool = False  # add `heatmap_evidence` to the visibility logits
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features, train: bool = False):
        pooled = jnp.mean(features, axis=(1, 2))
        h = SharedBlock(self.dtype, name="shared")(pooled, train)
        visibility = PointOutputs(self.schema, 1, self.grouped, self.dtype, name="points")(h)
        visibility = visibility[..., 0].astype(jnp.float32)

        x = nn.Conv(
            self.hidden, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="heatmap_conv"
        )(features)
        x = nn.relu(x)
        if self.upsample > 1:
            b, hh, ww, c = x.shape
            x = jax.image.resize(x, (b, hh * self.upsample, ww * self.upsample, c), "bilinear")
        heatmaps = nn.Conv(self.schema.num_points, (1, 1), dtype=self.dtype, name="heatmap_out")(x)
        coords = soft_argmax(heatmaps)
        if self.dense_visibility:
            visibility = visibility + heatmap_evidence(heatmaps)
        return _outputs(h, visibility, coords, self.schema, self.grouped, self.dtype)


class HeatmapHead(nn.Module):
    """Stride-4 heatmaps from a feature-pyramid neck over the backbone's stages.

    Group and visibility logits come from the pooled last stage exactly as in
    `RegressionHead` (shared block, group classifier, one head per group), plus each
    heatmap's evidence with `dense_visibility`. Coordinates are
    decoded inside the model by a soft-argmax over the (2 radius + 1)^2 cells around each
    heatmap's peak, so they are finer than the stride; `heatmap_logits` goes to the loss,
    which asks for a spatial softmax shaped like a Gaussian around each visible point.
    """

    multiscale = True
    schema: KeypointSchema
    grouped: bool = True
    width: int = 64  # neck channels
    levels: int = 4  # the coarsest stages fused: four ResNet stages give stride 4
    radius: int = 2  # decoding window half-width, in cells
    dense_visibility: bool = False  # add `heatmap_evidence` to the visibility logits
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, stages, train: bool = False):
        if not isinstance(stages, tuple | list):
            raise ValueError("the heatmap head takes the backbone's stages (return_stages=True)")
        pooled = jnp.mean(stages[-1], axis=(1, 2))
        h = SharedBlock(self.dtype, name="shared")(pooled, train)
        visibility = PointOutputs(self.schema, 1, self.grouped, self.dtype, name="points")(h)
        visibility = visibility[..., 0].astype(jnp.float32)

        x = FeaturePyramidNeck(self.width, self.dtype, name="neck")(stages[-self.levels :])
        heatmaps = nn.Conv(self.schema.num_points, (1, 1), dtype=self.dtype, name="heatmap_out")(x)
        heatmaps = heatmaps.astype(jnp.float32)
        coords = local_soft_argmax(heatmaps, radius=self.radius)
        if self.dense_visibility:
            visibility = visibility + heatmap_evidence(heatmaps)
        out = _outputs(h, visibility, coords, self.schema, self.grouped, self.dtype)
        return {**out, "heatmap_logits": heatmaps}


def _outputs(h, visibility, coords, schema, grouped, dtype) -> dict[str, jax.Array]:
    if grouped:
        group_logits = nn.Dense(schema.num_groups, dtype=dtype, name="group_classifier")(h)
        group_logits = group_logits.astype(jnp.float32)
    else:
        # No group classifier in the ablation; a group is as present as its likeliest point,
        # so downstream code (metrics, gating) reads the same fields either way.
        group_logits = group_max(visibility, schema)
    return {
        "group_logits": group_logits,
        "visibility_logits": visibility,
        "coords": coords.astype(jnp.float32),
    }


HEADS = {"regression": RegressionHead, "integral": IntegralHead, "heatmap": HeatmapHead}
# The heads whose visibility can take their heatmaps' evidence (`dense_visibility`).
DENSE_VISIBILITY_HEADS = ("integral", "heatmap")
