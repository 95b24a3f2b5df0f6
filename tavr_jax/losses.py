"""The paper's losses (section 3.2): group BCE, focal visibility loss, masked Wing loss.

Per-element functions in the optax style: pure, hyperparameters keyword-only, an optional
boolean `where=` mask (masked elements give 0 and zero gradient); the caller reduces. The
cross-entropy and the focal loss are optax's, masked; optax has no Wing loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from tavr_jax.schema import KeypointSchema

# The paper's loss: weights of (group BCE, visibility focal, coordinate Wing), focal and Wing
# hyperparameters. `total_loss(config=...)` takes a mapping of the same shape (config.loss).
PAPER_LOSS = {
    "weights": {"group": 1.0, "visibility": 1.0, "coords": 1.0},
    "focal_alpha": 0.25,
    "focal_gamma": 2.0,
    "wing_w": 10.0,
    "wing_eps": 2.0,
}


def _masked(loss: jax.Array, where: ArrayLike | None) -> jax.Array:
    return loss if where is None else jnp.where(where, loss, 0.0)


def group_bce(logits: ArrayLike, labels: ArrayLike, *, where: ArrayLike | None = None) -> jax.Array:
    """Binary cross-entropy on logits, per element; labels in [0, 1]."""
    logits = jnp.asarray(logits)
    loss = optax.sigmoid_binary_cross_entropy(logits, jnp.asarray(labels, logits.dtype))
    return _masked(loss, where)


def sigmoid_focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Focal loss per element: -a y (1-p)^g log p - (1-a)(1-y) p^g log(1-p), p = sigmoid(x)."""
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels, logits.dtype)
    return _masked(optax.sigmoid_focal_loss(logits, labels, alpha=alpha, gamma=gamma), where)


def wing_loss(
    pred: ArrayLike,
    target: ArrayLike,
    *,
    w: float = 10.0,
    eps: float = 2.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Wing loss per element: w ln(1 + |d|/eps) if |d| < w else |d| - C, C = w - w ln(1 + w/eps).

    Meant for errors in pixels (w = 10 px). Masked elements (e.g. invisible points, whose
    targets are arbitrary) are zeroed on the input difference, so their gradient is exactly 0.
    """
    diff = jnp.asarray(pred) - jnp.asarray(target)
    if where is not None:
        diff = jnp.where(where, diff, 0.0)
    a = jnp.abs(diff)
    c = w - w * jnp.log1p(w / eps)
    loss = jnp.where(a < w, w * jnp.log1p(a / eps), a - c)
    return _masked(loss, where)


def total_loss(
    outputs: dict[str, jax.Array],
    batch: dict[str, ArrayLike],
    schema: KeypointSchema,
    *,
    image_size: int | Sequence[int],
    grouped: bool = True,
    config: Mapping | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = l1 L_group + l2 L_keypoint + l3 L_reg for one batch.

    Args:
      outputs: the model's dict: group_logits (B, G), visibility_logits (B, K), coords (B, K, 2)
        normalised to [0, 1].
      batch: visibility (B, K) in {0, 1} and coords (B, K, 2) in pixels of the network input.
      image_size: the network input size S (or (height, width)); coords are scaled by it.
      grouped: False drops L_group (the ablation has no group classifier).
      config: `weights` {group, visibility, coords}, `focal_alpha`, `focal_gamma`, `wing_w`,
        `wing_eps` (config.loss); None is the paper's (`PAPER_LOSS`).
    Returns:
      (total, {"group", "keypoint", "reg", "total"}) scalars; L_group is 0 when not grouped.
    """
    c = PAPER_LOSS if config is None else config
    w = c["weights"]
    visibility = jnp.asarray(batch["visibility"], jnp.float32)  # (B, K)
    target = jnp.asarray(batch["coords"], jnp.float32)  # (B, K, 2)
    size = jnp.broadcast_to(jnp.asarray(image_size, jnp.float32), (2,))  # (height, width)
    pred_px = outputs["coords"].astype(jnp.float32) * size[None, None, ::-1]  # x by w, y by h

    if grouped:
        presence = (visibility @ jnp.asarray(schema.group_matrix).T > 0).astype(jnp.float32)
        loss_group = jnp.mean(group_bce(outputs["group_logits"], presence))
    else:
        loss_group = jnp.zeros((), jnp.float32)
    loss_keypoint = jnp.mean(
        sigmoid_focal_loss(
            outputs["visibility_logits"],
            visibility,
            alpha=c["focal_alpha"],
            gamma=c["focal_gamma"],
        )
    )

    visible = jnp.broadcast_to((visibility > 0)[..., None], target.shape)  # (B, K, 2)
    wing = wing_loss(pred_px, target, w=c["wing_w"], eps=c["wing_eps"], where=visible)
    loss_reg = jnp.sum(wing) / jnp.maximum(jnp.sum(visible), 1)

    total = w["group"] * loss_group + w["visibility"] * loss_keypoint + w["coords"] * loss_reg
    return total, {"group": loss_group, "keypoint": loss_keypoint, "reg": loss_reg, "total": total}
