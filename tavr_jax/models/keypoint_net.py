"""The grouped keypoint network: backbone + head, uint8 frames in, the output dict out."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cardiac_core.backbones import BACKBONES
from tavr_jax.models.heads import DENSE_VISIBILITY_HEADS, HEADS
from tavr_jax.schema import KeypointSchema

# ImageNet statistics collapsed to one grey channel (mean and std of the RGB means).
GRAY_MEAN = 0.449
GRAY_STD = 0.226


def normalize_images(images: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """(B, H, W) or (B, H, W, C) in 0..255, any dtype -> (B, H, W, C) standardised `dtype`."""
    x = jnp.asarray(images).astype(jnp.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"images must be (B, H, W) or (B, H, W, C), got shape {x.shape}")
    return ((x / 255.0 - GRAY_MEAN) / GRAY_STD).astype(dtype)


class KeypointNet(nn.Module):
    """Hard-parameter-sharing multi-task network of the paper (section 3.1).

    Variables: {"params": {"backbone": ..., "head": ...}, "batch_stats": {"backbone": ...}}.
    Call: `model.apply(variables, images, train=False)`; in training pass
    `rngs={"dropout": key}` and `mutable=["batch_stats"]`.
    """

    schema: KeypointSchema
    backbone: str = "resnet34"
    head: str = "regression"
    grouped: bool = True
    dense_visibility: bool = False  # heads with heatmaps: their evidence joins the visibility
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        head_cls = HEADS[self.head]
        backbone = BACKBONES[self.backbone](
            dtype=self.dtype, return_stages=head_cls.multiscale, name="backbone"
        )
        features = backbone(normalize_images(images, self.dtype), train=train)
        options = {"dense_visibility": True} if self.dense_visibility else {}
        head = head_cls(self.schema, grouped=self.grouped, dtype=self.dtype, name="head", **options)
        return head(features, train=train)


def predictions(outputs: dict[str, jax.Array], *, width, height) -> dict[str, jax.Array]:
    """The network's outputs as what it predicts, in float32, for a `width` x `height` frame.

    Returns `visibility` (B, K) and `group` (B, G) probabilities and `coords` (B, K, 2) in
    pixels (x, y) of that frame. With half-pixel centres, normalised coordinates scale exactly
    by the frame size, so the same call serves the network input and the original frame.
    """
    scale = jnp.stack([jnp.asarray(width, jnp.float32), jnp.asarray(height, jnp.float32)])
    scale = scale.reshape(1, 1, 2)
    return {
        "visibility": jax.nn.sigmoid(outputs["visibility_logits"].astype(jnp.float32)),
        "group": jax.nn.sigmoid(outputs["group_logits"].astype(jnp.float32)),
        "coords": outputs["coords"].astype(jnp.float32) * scale,
    }


def create_model(
    schema: KeypointSchema,
    *,
    backbone: str = "resnet34",
    head: str = "regression",
    grouped: bool = True,
    dense_visibility: bool = False,
    dtype: Any = jnp.float32,
) -> KeypointNet:
    """The keypoint network for `schema`; parameters float32, computation in `dtype`.

    `dense_visibility` adds each heatmap's evidence to its point's visibility logit
    (`heads.heatmap_evidence`); it applies to the heads with heatmaps and is ignored by the
    regression head, which has none.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; known: {', '.join(BACKBONES)}")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; known: {', '.join(HEADS)}")
    return KeypointNet(
        schema,
        backbone=backbone,
        head=head,
        grouped=grouped,
        dense_visibility=bool(dense_visibility) and head in DENSE_VISIBILITY_HEADS,
        dtype=jnp.dtype(dtype),
    )
